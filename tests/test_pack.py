"""pack and verify: every image once with its label, readable by tarfile / webdataset / DALI,
deterministic, bad files rejected with reasons, atomic under SIGKILL, tampering caught."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import signal
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from helpers import descendants
from PIL import Image

pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")

from fastalex.config import PackConfig
from fastalex.errors import UserError
from fastalex.pack import pack, verify_pack
from fastalex.shards import (
    MANIFEST,
    check_shard,
    decode_label,
    iter_shard,
    read_index,
    read_manifest,
    write_manifest,
    write_shard,
)
from fastalex.sources.tinyimagenet import open_source
from fastalex.synth import synth


def source_images(tree: Path) -> dict[str, int]:
    """sha256 of every labelled image of a Tiny ImageNet tree -> its label, read from the tree's
    own files (not the layout reader the packer uses): a label is the class's position in the
    sorted wnids.txt; train images take their folder's class, val images their annotation's."""
    wnids = sorted((tree / "wnids.txt").read_text().split())

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    labels = {}
    for label, wnid in enumerate(wnids):
        for path in (tree / "train" / wnid / "images").iterdir():
            labels[digest(path)] = label
    for line in (tree / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        labels[digest(tree / "val" / "images" / name)] = wnids.index(wnid)
    assert len(labels) == 300  # the synth tree's 240 + 60 images, all distinct
    return labels


def packed_samples(pack_dir: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label) of every sample, read with the standard library's tarfile."""
    manifest = read_manifest(pack_dir)
    samples = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(pack_dir / shard.name) as tar:
            members = tar.getmembers()
            for jpg, cls in zip(members[::2], members[1::2]):
                key = jpg.name.rsplit(".", 1)[0]
                assert jpg.name == key + ".jpg" and cls.name == key + ".cls"
                samples.append(
                    (key, tar.extractfile(jpg).read(), decode_label(tar.extractfile(cls).read()))
                )
    return samples


def test_pack_keeps_every_image_once_with_its_label(synth_tree, synth_pack):
    expected = source_images(synth_tree)
    manifest = read_manifest(synth_pack)
    seen = {}
    for split, count in (("train", 240), ("val", 60)):
        samples = packed_samples(synth_pack, split)
        assert len(samples) == count == manifest.splits[split].samples
        assert len({key for key, _, _ in samples}) == count
        for _, data, label in samples:
            digest = hashlib.sha256(data).hexdigest()
            assert digest not in seen, "an image was packed twice"
            seen[digest] = label
    assert seen == expected  # every image, bytes unchanged, right label, in both splits
    assert manifest.num_classes == 6 and manifest.rejected == ()
    assert manifest.skipped == ("test: 5 unlabelled images, not packed",)
    assert manifest.splits["train"].image_px == (64, 64)
    assert len(manifest.splits["train"].shards) == 4  # 240 / 64 per shard
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            data = (synth_pack / shard.name).read_bytes()
            assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
            assert len(read_index(synth_pack / shard.index_name)) == shard.samples


def test_train_is_shuffled_across_classes(synth_pack):
    labels = [label for _, _, label in packed_samples(synth_pack, "train")]
    assert labels != sorted(labels)
    assert len(set(labels[:64])) == 6  # the first shard already holds every class


def test_webdataset_library_reads_the_shards(synth_pack):
    webdataset = pytest.importorskip("webdataset")
    manifest = read_manifest(synth_pack)
    urls = [str(synth_pack / s.name) for s in manifest.splits["val"].shards]
    dataset = webdataset.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "jpg", "cls")
    read = [(key, data, int(cls)) for key, data, cls in dataset]
    assert read == packed_samples(synth_pack, "val")


def test_dali_reads_the_shards_with_the_packers_index(synth_pack, capfd):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    manifest = read_manifest(synth_pack)
    shards = manifest.splits["train"].shards

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def read_pipe():
        jpg, cls = fn.readers.webdataset(
            paths=[str(synth_pack / s.name) for s in shards],
            index_paths=[str(synth_pack / s.index_name) for s in shards],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            dtypes=[types.UINT8, types.UINT8],
        )
        return jpg, cls, fn.decoders.image(jpg, device="cpu", output_type=types.RGB)

    pipe = read_pipe()
    pipe.build()
    got = []
    for _ in range(240 // 16):
        jpgs, clss, images = pipe.run()
        for i in range(len(jpgs)):
            got.append((bytes(jpgs.at(i)), decode_label(bytes(clss.at(i)))))
            assert images.at(i).shape == (64, 64, 3)
    expected = [(data, label) for _, data, label in packed_samples(synth_pack, "train")]
    assert got == expected
    assert "Index file not provided" not in capfd.readouterr().err


def test_dir_and_zip_give_byte_identical_shards(synth_tree, synth_pack, tmp_path):
    zip_path = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for path in sorted(synth_tree.rglob("*")):
            z.write(path, "tiny-imagenet-200/" + path.relative_to(synth_tree).as_posix())
    manifest, wrote = pack(open_source(zip_path), tmp_path / "z", PackConfig(shard_size=64), False)
    assert wrote and manifest.source["kind"] == "zip"
    for split in ("train", "val"):
        for shard in manifest.splits[split].shards:
            assert (tmp_path / "z" / shard.name).read_bytes() == (
                synth_pack / shard.name
            ).read_bytes()
            assert (tmp_path / "z" / shard.index_name).read_bytes() == (
                synth_pack / shard.index_name
            ).read_bytes()


@pytest.fixture
def corrupt_tree(synth_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(synth_tree, tree)
    wnid = sorted((tree / "train").iterdir())[0].name
    images = tree / "train" / wnid / "images"
    good = (images / f"{wnid}_0.JPEG").read_bytes()
    (images / f"{wnid}_1.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    (images / f"{wnid}_2.JPEG").write_bytes(b"")  # zero bytes
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    (images / f"{wnid}_3.JPEG").write_bytes(png.getvalue())  # a PNG named .JPEG
    (images / "notes.txt").write_text("not an image\n")  # a text file
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(cmyk, "JPEG")
    (images / f"{wnid}_4.JPEG").write_bytes(cmyk.getvalue())  # CMYK: kept
    return tree, wnid


def test_corrupt_files_are_rejected_with_reasons_and_the_rest_packed(corrupt_tree, tmp_path):
    tree, wnid = corrupt_tree
    config = PackConfig(shard_size=64, transcode=False)  # the PNG is rejected, not transcoded
    manifest, _ = pack(open_source(tree), tmp_path / "out", config, False)
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in manifest.rejected}
    assert set(reasons) == {f"{wnid}_1.JPEG", f"{wnid}_2.JPEG", f"{wnid}_3.JPEG", "notes.txt"}
    assert "does not decode" in reasons[f"{wnid}_1.JPEG"]
    assert reasons[f"{wnid}_2.JPEG"] == "empty file"
    assert reasons[f"{wnid}_3.JPEG"] == "not a JPEG (PNG data)"
    assert reasons["notes.txt"].startswith("not a JPEG")
    assert manifest.splits["train"].samples == 240 - 3  # 3 replaced files rejected, CMYK kept
    assert verify_pack(tmp_path / "out") == []


def test_a_png_named_jpeg_is_transcoded_by_default_and_non_images_listed(corrupt_tree, tmp_path):
    """docs/data.md's Tiny ImageNet section: every image is decoded whatever its extension."""
    tree, wnid = corrupt_tree
    manifest, _ = pack(open_source(tree), tmp_path / "out", PackConfig(shard_size=64), False)
    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in manifest.rejected}
    assert set(reasons) == {f"{wnid}_1.JPEG", f"{wnid}_2.JPEG", "notes.txt"}
    assert reasons["notes.txt"].startswith("not an image")
    assert manifest.splits["train"].transcoded == 1  # the PNG named .JPEG
    assert manifest.splits["train"].samples == 240 - 2


def test_strict_fails_naming_the_file_and_writes_nothing(corrupt_tree, tmp_path):
    tree, wnid = corrupt_tree
    with pytest.raises(UserError, match=rf"{wnid}_\d.JPEG|notes.txt"):
        pack(open_source(tree), tmp_path / "out", PackConfig(shard_size=64, strict=True), False)
    assert not (tmp_path / "out").exists()


def test_out_holding_another_pack_is_refused_unless_overwrite(synth_tree, synth_pack, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(synth_pack, out)
    _, wrote = pack(open_source(synth_tree), out, PackConfig(shard_size=64), False)
    assert not wrote  # the same pack: nothing to do
    with pytest.raises(UserError, match="--overwrite"):
        pack(open_source(synth_tree), out, PackConfig(shard_size=100), False)
    manifest, wrote = pack(
        open_source(synth_tree), out, PackConfig(shard_size=100, overwrite=True), False
    )
    assert wrote and len(manifest.splits["train"].shards) == 3
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert verify_pack(out) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a pack"):
        pack(open_source(synth_tree), foreign, PackConfig(), False)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


def test_unwritable_out_is_a_clear_error(synth_tree, tmp_path):
    """OUT where nobody, root included, can make a directory: under a regular file."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        pack(open_source(synth_tree), tmp_path / "file" / "out", PackConfig(), False)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_out_is_a_clear_error(synth_tree, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="cannot write"):
        pack(open_source(synth_tree), locked / "out", PackConfig(), False)


def test_out_on_a_file_is_a_clear_error(synth_tree, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        pack(open_source(synth_tree), tmp_path / "file", PackConfig(), False)


@pytest.mark.slow  # trains or starts processes
def test_sigkill_part_way_leaves_no_manifest_and_a_rerun_completes(tmp_path, launch):
    tree = tmp_path / "tree"
    synth(tree, classes=4, train_per_class=1500, val_per_class=50, workers=2, progress=False)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "fastalex",
        "pack",
        tree,
        out,
        "--shard-size",
        "200",
        "--workers",
        "1",
    ]
    first = launch(command)  # its own process group: the pack and its pool die together
    deadline = time.monotonic() + 60
    while not list(out.glob(".staging/*.tar")) and time.monotonic() < deadline:
        time.sleep(0.01)
    first.kill_group()  # SIGKILL to the whole group
    stdout, stderr = first.communicate(timeout=10)
    assert list(out.glob(".staging/*.tar")), f"no shard staged, or none left:\n{stdout}{stderr}"
    assert not (out / MANIFEST).exists()
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(out)
    rerun = launch(command)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stdout + stderr
    assert verify_pack(out) == []
    assert read_manifest(out).splits["train"].samples == 6000
    assert not (out / ".staging").exists()


def test_verify_catches_a_flipped_byte_a_truncated_tar_and_a_deleted_shard(synth_pack, tmp_path):
    assert verify_pack(synth_pack) == []
    manifest = read_manifest(synth_pack)
    first, second, third = (s.name for s in manifest.splits["train"].shards[:3])
    bad = tmp_path / "bad"
    shutil.copytree(synth_pack, bad)
    data = bytearray((bad / first).read_bytes())
    data[3000] ^= 0x01
    (bad / first).write_bytes(bytes(data))
    with open(bad / second, "r+b") as f:
        f.truncate(5000)
    (bad / third).unlink()
    problems = verify_pack(bad)
    assert any(first in p and "sha256" in p for p in problems)
    assert any(second in p and "bytes" in p for p in problems)
    assert any(second.replace(".tar", ".idx") in p and "beyond the end" in p for p in problems)
    assert any(third in p and "missing" in p for p in problems)


def rewrite_shard(pack_dir: Path, split: str, number: int, change) -> str:
    """Rewrite shard `number` of `split` with change(jpeg, label) -> (jpeg, label) applied to every
    sample, and make the manifest agree (bytes, sha256): a fault only verify's decode and label
    checks can find. Returns the shard's name."""
    manifest = read_manifest(pack_dir)
    shard = manifest.splits[split].shards[number]
    index = read_index(pack_dir / shard.index_name)
    samples = [
        (key, *change(jpeg, label))
        for key, (jpeg, label) in zip(index.names, iter_shard(pack_dir / shard.name, index))
    ]
    info = write_shard(pack_dir / shard.name, samples)
    shards = list(manifest.splits[split].shards)
    shards[number] = info
    splits = {
        **manifest.splits,
        split: dataclasses.replace(manifest.splits[split], shards=tuple(shards)),
    }
    write_manifest(pack_dir, dataclasses.replace(manifest, splits=splits))
    assert check_shard(pack_dir, info) == []  # size, sha256 and index all agree
    return shard.name


def test_verify_decodes_every_sampled_image_in_full(synth_pack, tmp_path):
    """JPEGs whose headers are intact but whose image data stops two thirds of the way, behind a
    correct sha256: only a full decode finds them."""
    bad = tmp_path / "bad"
    shutil.copytree(synth_pack, bad)
    name = rewrite_shard(bad, "train", 1, lambda jpeg, label: (jpeg[: len(jpeg) * 2 // 3], label))
    problems = verify_pack(bad)
    assert len(problems) == 32, problems  # each of the 32 images sampled from that shard
    assert all(p.startswith(f"{name}: sample ") and "does not decode" in p for p in problems)


def test_verify_finds_labels_outside_the_class_range(synth_pack, tmp_path):
    """Labels one past the last class (6 of 6), behind a correct sha256."""
    bad = tmp_path / "bad"
    shutil.copytree(synth_pack, bad)
    classes = read_manifest(bad).num_classes
    name = rewrite_shard(bad, "val", 0, lambda jpeg, label: (jpeg, classes))
    problems = verify_pack(bad)
    assert len(problems) == 32, problems
    assert all(
        p.startswith(f"{name}: sample ") and p.endswith(f"label {classes}") for p in problems
    )


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """3,200 images: enough shards of 100 for a pack to be caught part-way."""
    tree = tmp_path_factory.mktemp("big") / "tree"
    synth(tree, classes=4, train_per_class=750, val_per_class=50, workers=2, progress=False)
    return tree


def pack_command(tree: Path, out: Path, *options) -> list:
    return [sys.executable, "-m", "fastalex", "pack", tree, out, "--shard-size", "100", *options]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s} s")
        time.sleep(0.005)


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow  # starts processes
def test_a_worker_killed_mid_pack_ends_it_within_seconds_with_one_line(big_tree, tmp_path, launch):
    out = tmp_path / "out"
    with launch(pack_command(big_tree, out, "--workers", "2")) as run:
        wait_for(lambda: list(out.glob(".staging/*.tar")), 60, "shard staged")
        workers = descendants(run.process.pid)
        assert workers, "no worker processes"
        os.kill(workers[-1], signal.SIGKILL)  # as the OOM killer would
        killed = time.monotonic()
        stdout, stderr = run.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    assert run.returncode == 2
    assert_one_line_error(stderr, "worker died")
    assert not (out / ".staging").exists() and not (out / MANIFEST).exists()
    assert descendants(run.process.pid) == []


@pytest.mark.slow  # starts processes
def test_strict_pack_with_one_bad_file_exits_within_seconds_naming_it(big_tree, tmp_path, launch):
    tree = tmp_path / "tree"
    shutil.copytree(big_tree, tree)
    wnid = sorted((tree / "train").iterdir())[2].name
    (tree / "train" / wnid / "images" / f"{wnid}_7.JPEG").write_bytes(b"\xff\xd8 truncated")
    for attempt in range(3):  # a hang was intermittent: a few runs in a row
        out = tmp_path / f"out{attempt}"
        run = launch(pack_command(tree, out, "--workers", "2", "--strict"))
        started = time.monotonic()
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 2 and time.monotonic() - started < 10, stderr[-2000:]
        assert_one_line_error(stderr, f"{wnid}_7.JPEG", "--strict")
        assert not out.exists()


def shard_hashes(out: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.glob("*-*.*"))
    }


@pytest.mark.slow  # starts processes
def test_a_pack_killed_at_70_percent_resumes_to_the_uninterrupted_packs_bytes(
    big_tree, tmp_path, launch
):
    whole = tmp_path / "whole"
    pack(open_source(big_tree), whole, PackConfig(shard_size=100, workers=2), False)
    total = len(read_manifest(whole).splits["train"].shards) + 2
    out = tmp_path / "out"
    first = launch(pack_command(big_tree, out, "--workers", "1"))
    wait_for(lambda: len(list(out.glob(".staging/*.json"))) > 0.7 * total, 120, "70 % staged")
    first.kill_group()
    finished = {p.stem for p in out.glob(".staging/*-*.json")}
    assert not (out / MANIFEST).exists() and len(finished) < total
    rerun = launch(pack_command(big_tree, out, "--workers", "1"))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-2000:]
    assert f"resuming, {len(finished)} of {total} shards kept" in stderr
    assert (out / MANIFEST).read_text() == (whole / MANIFEST).read_text()
    assert shard_hashes(out) == shard_hashes(whole)


@pytest.mark.slow  # starts processes
def test_a_changed_option_starts_a_killed_pack_over_saying_why(big_tree, tmp_path, launch):
    out = tmp_path / "out"
    first = launch(pack_command(big_tree, out, "--workers", "1"))
    wait_for(lambda: list(out.glob(".staging/*-*.json")), 60, "shard staged")
    first.kill_group()
    rerun = launch(pack_command(big_tree, out, "--workers", "1", "--jpeg-quality", "90"))
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-2000:]
    why = [line for line in stderr.splitlines() if "starting over" in line]
    assert len(why) == 1 and "jpeg_quality" in why[0], stderr[-2000:]
    assert "resuming" not in stderr
    assert verify_pack(out) == []


def test_each_file_of_a_zip_is_read_once(synth_tree, tmp_path, monkeypatch):
    from fastalex.sources import tree as tree_module

    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(synth_tree.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(synth_tree).as_posix())
    log = tmp_path / "reads.log"
    read = tree_module.TreeReader.read

    def logged(self, rel):  # the forked workers inherit it
        with open(log, "a") as f:
            f.write(rel + "\n")
        return read(self, rel)

    monkeypatch.setattr(tree_module.TreeReader, "read", logged)
    manifest, _ = pack(open_source(archive), tmp_path / "out", PackConfig(shard_size=16), False)
    images = [line for line in log.read_text().splitlines() if "/images/" in line]
    assert len(images) == len(set(images)) == 300
    assert sum(split.samples for split in manifest.splits.values()) == 300


def test_a_full_disk_ends_the_pack_with_one_error_and_no_staging(synth_tree, tmp_path, monkeypatch):
    import errno

    import fastalex.pack

    def full_after_one(path, samples):  # the forked workers inherit it
        if list(Path(path).parent.glob("*.tar")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_shard(path, samples)

    monkeypatch.setattr(fastalex.pack, "write_shard", full_after_one)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="cannot write a shard .No space left on device"):
        pack(open_source(synth_tree), out, PackConfig(shard_size=16, workers=2), False)
    assert not out.exists()
