"""Your own data: ImageFolder trees (dir or zip), images of any format and size, --max-side,
--val-fraction, header bombs rejected undecoded, and docs/data.md's "Your own data" commands."""

from __future__ import annotations

import hashlib
import io
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")

from fastalex.cli import main
from fastalex.config import PackConfig
from fastalex.errors import UserError
from fastalex.images import Rejected, check_image_header, prepare_image
from fastalex.pack import pack, verify_pack
from fastalex.shards import iter_shard, read_index, read_manifest
from fastalex.sources import detect_source, read_layout

DATA_DOC = Path(__file__).resolve().parent.parent / "docs" / "data.md"
BAD = {"train/dog/broken.png"}  # the fixture's one corrupt image


def pack_tree(src, out, **settings):
    return pack(detect_source(src), out, PackConfig(shard_size=8, workers=2, **settings), False)[0]


def stored(out: Path, split: str) -> list[tuple[bytes, int]]:
    manifest = read_manifest(out)
    return [
        sample
        for shard in manifest.splits[split].shards
        for sample in iter_shard(out / shard.name, read_index(out / shard.index_name))
    ]


def centre_grey(jpeg: bytes) -> int:
    with Image.open(io.BytesIO(jpeg)) as image:
        grey = image.convert("L")
        return grey.getpixel((grey.width // 2, grey.height // 2))


def tree_images(root: Path, split: str) -> dict[str, list[str]]:
    """{class directory: [image paths]} as the tree itself lists them, corrupt file and
    non-images left out."""
    return {
        folder.name: [
            p.relative_to(root).as_posix()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".txt" and p.relative_to(root).as_posix() not in BAD
        ]
        for folder in sorted((root / split).iterdir())
    }


def zip_tree(root: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as z:
        for path in sorted(root.rglob("*")):
            z.write(path, f"{root.name}/{path.relative_to(root).as_posix()}")
    return zip_path


@pytest.fixture(scope="module")
def folder_pack(folder_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("folderpack") / "shards"
    pack_tree(folder_tree.path, out)
    return out


def test_every_format_packs_with_labels_from_the_directory_names(folder_tree, folder_pack):
    manifest = read_manifest(folder_pack)
    class_dirs = sorted(p.name for p in (folder_tree.path / "train").iterdir())
    assert [wnid for wnid, _ in manifest.classes] == class_dirs
    assert dict(manifest.classes) == {name: folder_tree.names.get(name, "") for name in class_dirs}
    level_dir = {level: name for name, level in folder_tree.levels.items()}
    for split in ("train", "val"):
        expected = tree_images(folder_tree.path, split)
        samples = stored(folder_pack, split)
        assert manifest.splits[split].samples == len(samples) == sum(map(len, expected.values()))
        per_label = np.bincount([label for _, label in samples], minlength=len(class_dirs))
        assert per_label.tolist() == [len(expected[name]) for name in class_dirs]
        for jpeg, label in samples:  # each image's pixels say which directory it came from
            grey = centre_grey(jpeg)
            nearest = min(level_dir, key=lambda level: abs(level - grey))
            assert abs(nearest - grey) <= 8 and class_dirs.index(level_dir[nearest]) == label
    # 2 PNGs, WebP, BMP, TIFF, GIF and 16-bit PNG of each class, and val's PNG of each class
    assert manifest.splits["train"].transcoded == 7 * 3 and manifest.splits["val"].transcoded == 3
    assert manifest.splits["train"].resized == 1 and manifest.splits["val"].resized == 0
    assert manifest.splits["train"].image_px == (256, 512)  # the 2000 x 1000 JPEG, downscaled
    assert [r["path"] for r in manifest.rejected] == ["train/dog/broken.png"]
    assert "does not decode" in manifest.rejected[0]["reason"]
    assert any(
        "1 files that are not images" in note and "notes.txt" in note for note in manifest.skipped
    )
    assert manifest.source["layout"] == "imagefolder" and manifest.pack["max_side"] == 512
    assert verify_pack(folder_pack) == []


def test_alpha_is_composited_on_white(folder_tree):
    image = prepare_image((folder_tree.path / "train/zebra/alpha.PNG").read_bytes())
    with Image.open(io.BytesIO(image.jpeg)) as decoded:
        grey = decoded.convert("L")
        assert grey.getpixel((2, 20)) >= 250 and abs(grey.getpixel((30, 20)) - 40) <= 4
    assert image.transcoded and not image.resized


def test_jpegs_within_max_side_are_stored_byte_identical(folder_tree, folder_pack):
    packed = {hashlib.sha256(jpeg).hexdigest() for jpeg, _ in stored(folder_pack, "train")}
    for name in folder_tree.levels:
        for rel in ("gray.jpg", "sub/nested.jpeg", "cmyk.jpg"):
            source = (folder_tree.path / "train" / name / rel).read_bytes()
            assert hashlib.sha256(source).hexdigest() in packed
    big = hashlib.sha256((folder_tree.path / "train/dog/big.JPEG").read_bytes()).hexdigest()
    assert big not in packed


def test_a_dir_and_its_zip_give_identical_packs(folder_tree, folder_pack, tmp_path):
    manifest = pack_tree(zip_tree(folder_tree.path, tmp_path / "photos.zip"), tmp_path / "z")
    assert manifest.source["kind"] == "zip" and manifest.source["root"] == "photos/"
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            for name in (shard.name, shard.index_name):
                assert (tmp_path / "z" / name).read_bytes() == (folder_pack / name).read_bytes()
    from_dir = read_manifest(folder_pack)
    assert (from_dir.splits, from_dir.classes, from_dir.skipped) == (
        manifest.splits,
        manifest.classes,
        manifest.skipped,
    )
    assert [r["path"] for r in manifest.rejected] == ["photos/train/dog/broken.png"]


def test_max_side_bounds_the_longer_side_and_zero_keeps_originals(folder_tree, tmp_path):
    small = pack_tree(folder_tree.path, tmp_path / "small", max_side=48)
    assert max(small.splits["train"].image_px) == 48 and small.pack["max_side"] == 48
    sizes = []
    for jpeg, _ in stored(tmp_path / "small", "train"):
        with Image.open(io.BytesIO(jpeg)) as image:
            sizes.append(image.size)
    assert max(max(size) for size in sizes) == 48 and (48, 24) in sizes  # big.JPEG: aspect kept
    assert (20, 20) in sizes and (30, 20) in sizes  # smaller images untouched
    full = pack_tree(folder_tree.path, tmp_path / "full", max_side=0)
    assert full.splits["train"].image_px == folder_tree.big_px and full.splits["train"].resized == 0
    packed = {jpeg for jpeg, _ in stored(tmp_path / "full", "train")}
    assert (folder_tree.path / "train/dog/big.JPEG").read_bytes() in packed


def test_val_fraction_holds_out_each_class_seeded(folder_tree, tmp_path):
    tree = tmp_path / "noval"
    shutil.copytree(folder_tree.path, tree, ignore=shutil.ignore_patterns("val"))
    with pytest.raises(UserError, match="--val-fraction"):
        read_layout(detect_source(tree))
    with pytest.raises(UserError, match="drop --val-fraction"):
        read_layout(detect_source(folder_tree.path), val_fraction=0.2)
    layout = read_layout(detect_source(tree), val_fraction=0.2, seed=0)
    files = {name: len(paths) for name, paths in tree_images(tree, "train").items()}
    files["dog"] += 1  # the broken PNG is still a file of the tree
    for label, name in enumerate(sorted(files)):
        val = [rel for rel, lab in layout.val if lab == label]
        train = [rel for rel, lab in layout.train if lab == label]
        assert len(val) == round(files[name] * 0.2) and len(train) + len(val) == files[name]
        assert all(rel.startswith(f"train/{name}/") for rel in val + train)
    assert not set(layout.val) & set(layout.train)
    assert read_layout(detect_source(tree), val_fraction=0.2, seed=0) == layout
    assert read_layout(detect_source(tree), val_fraction=0.2, seed=1).val != layout.val
    manifest = pack_tree(tree, tmp_path / "out", val_fraction=0.2)
    assert manifest.splits["val"].samples == 2 + 2 + 2 and manifest.pack["val_fraction"] == 0.2


def test_a_header_bomb_is_rejected_without_decoding(monkeypatch, tmp_path, folder_tree, bomb_jpeg):
    data = bomb_jpeg()
    assert len(data) < 1000

    def no_decoding(*args, **kwargs):
        raise AssertionError("a pixel was decoded")

    with monkeypatch.context() as patch:
        import simplejpeg

        patch.setattr(simplejpeg, "decode_jpeg", no_decoding)
        patch.setattr(Image.Image, "load", no_decoding)
        patch.setattr(Image.Image, "draft", no_decoding)
        for check in (check_image_header, prepare_image):
            with pytest.raises(
                Rejected, match=r"60000x60000 pixels .* over the limit .*not decoded"
            ):
                check(data)
    tree = tmp_path / "tree"
    shutil.copytree(folder_tree.path, tree)
    (tree / "train/Cat/bomb.jpg").write_bytes(data)
    manifest = pack_tree(tree, tmp_path / "out")
    reasons = {r["path"]: r["reason"] for r in manifest.rejected}
    assert "60000x60000 pixels" in reasons["train/Cat/bomb.jpg"]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_other_formats_are_checked_against_max_pixels_from_the_header(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(buffer, fmt)
    assert check_image_header(buffer.getvalue()) == (200, 300, fmt)
    with pytest.raises(Rejected, match="300x200 pixels"):
        prepare_image(buffer.getvalue(), max_pixels=300 * 200 - 1)


def test_no_transcode_rejects_other_formats_with_the_reason(folder_tree, tmp_path):
    manifest = pack_tree(folder_tree.path, tmp_path / "out", transcode=False)
    reasons = {r["path"]: r["reason"] for r in manifest.rejected}
    assert reasons["train/zebra/rgb.png"] == "not a JPEG (PNG data)"
    assert reasons["train/zebra/photo.webp"] == "not a JPEG (WEBP data)"
    assert manifest.splits["train"].transcoded == 0
    assert manifest.splits["train"].samples == 3 * 3 + 1  # the JPEGs: 3 per class and big.JPEG


def test_an_exif_rotated_jpeg_is_stored_upright():
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 10, 20))  # blue on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise: blue ends on top
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    result = prepare_image(buffer.getvalue())
    assert result.reoriented and (result.height, result.width) == (40, 20)
    with Image.open(io.BytesIO(result.jpeg)) as upright:
        assert upright.size == (20, 40) and upright.getpixel((10, 3))[2] > 150


def test_layout_errors_name_the_problem(folder_tree, tmp_path):
    with pytest.raises(UserError, match="Tiny ImageNet .* or ImageFolder"):
        detect_source(tmp_path)
    tree = tmp_path / "tree"
    shutil.copytree(folder_tree.path, tree)
    shutil.copytree(tree / "train/dog", tree / "train/emu")
    with pytest.raises(UserError, match="class 'emu' has images in train/ but none in val/"):
        read_layout(detect_source(tree))
    shutil.rmtree(tree / "train/emu")
    (tree / "val/Cat/readme.txt").write_text("x")
    for image in (tree / "val/Cat").glob("*.*g"):
        image.unlink()
    with pytest.raises(UserError, match="val/Cat/ holds no images"):
        read_layout(detect_source(tree))


def test_pack_again_with_other_settings_names_them(folder_tree, folder_pack, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(folder_pack, out)
    assert pack(detect_source(folder_tree.path), out, PackConfig(shard_size=8), False)[1] is False
    with pytest.raises(UserError, match=r"max_side 512 -> 256.*--overwrite"):
        pack(detect_source(folder_tree.path), out, PackConfig(shard_size=8, max_side=256), False)


def test_a_source_tree_given_for_a_pack_says_how_to_pack_it(folder_tree, synth_tree):
    with pytest.raises(UserError, match=r"source tree \(ImageFolder layout\).*fastalex pack"):
        read_manifest(folder_tree.path)
    with pytest.raises(UserError, match=r"source tree \(Tiny ImageNet layout\).*fastalex pack"):
        read_manifest(synth_tree)


def test_cli_user_errors_are_one_line_and_exit_2(folder_tree, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for args in (
        ("synth", tmp_path / "file" / "tree", "--classes", 1),  # under a file: cannot write
        ("synth", tmp_path / "file", "--classes", 1),
        ("pack", tmp_path / "empty", tmp_path / "out"),
        ("pack", folder_tree.path, tmp_path / "out", "--val-fraction", 1.5),
        ("pack", folder_tree.path, tmp_path / "out", "--val-fraction", 0.1),
    ):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def readme_commands() -> list[str]:
    section = DATA_DOC.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [
        line.split("  #", 1)[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip()
    ]


def test_readme_your_own_data_commands_run(folder_tree, tmp_path, monkeypatch):
    commands = readme_commands()
    assert commands and all(c.startswith("fastalex ") for c in commands)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(folder_tree.path, data / "photos")
    zip_tree(data / "photos", data / "photos.zip")
    shutil.copytree(folder_tree.path, data / "flowers", ignore=shutil.ignore_patterns("val"))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        result = CliRunner().invoke(
            main,
            shlex.split(command)[1:] + ["--workers", "2"]
            if " pack " in f" {command} "
            else shlex.split(command)[1:],
        )
        assert result.exit_code == 0, (command, result.output)
    for out in Path("data").glob("*shards*"):
        assert verify_pack(out) == []
