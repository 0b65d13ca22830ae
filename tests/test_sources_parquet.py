"""Hugging Face parquet snapshots: both file layouts, class names from the schema metadata, from
dataset_infos.json or the label ids, rejected rows named by file and row, hf:// without the hub."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")

from fastalex.cli import main
from fastalex.config import PackConfig
from fastalex.pack import pack
from fastalex.shards import iter_shard, read_index, read_manifest
from fastalex.sources import detect_source
from fastalex.synth import encode_jpeg

NAMES = ["n01443537", "n01629819", "n01641577"]
GREY = (30, 130, 230)  # label -> the grey level of its images


def image_bytes(label: int, fmt: str = "JPEG") -> bytes:
    pixels = np.full((24, 20, 3), GREY[label], np.uint8)
    if fmt == "JPEG":
        return encode_jpeg(pixels, False, 95)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def write_parquet(
    path: Path, labels, metadata: bool, images=None, with_label: bool = True, names=NAMES
):
    """One file of the Hub's Image + ClassLabel schema, in row groups of 4 rows. Every test writes
    one first, so without pyarrow each test skips here, and the module still collects."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = images if images is not None else [image_bytes(label) for label in labels]
    columns = {
        "image": pa.array(
            [{"bytes": data, "path": f"{i}.jpg"} for i, data in enumerate(images)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    }
    if with_label:
        columns["label"] = pa.array(labels, pa.int64())
    table = pa.table(columns)
    if metadata:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        hf = json.dumps({"info": {"features": features}})
        table = table.replace_schema_metadata({"huggingface": hf})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)


def hub_snapshot(root: Path, metadata: bool = True) -> Path:
    """zh-plus/tiny-imagenet's layout: 2 train files (21 rows, one corrupt, one PNG), 1 valid
    file (6 rows), 1 unlabelled test file (5 rows)."""
    train_labels = [i % 3 for i in range(21)]
    images = [image_bytes(label) for label in train_labels]
    images[6] = b"\xff\xd8\xff\xe0 not really a jpeg"
    images[9] = image_bytes(train_labels[9], "PNG")
    write_parquet(
        root / "data/train-00000-of-00002.parquet", train_labels[:12], metadata, images[:12]
    )
    write_parquet(
        root / "data/train-00001-of-00002.parquet", train_labels[12:], metadata, images[12:]
    )
    write_parquet(root / "data/valid-00000-of-00001.parquet", [0, 1, 2, 2, 1, 0], metadata)
    write_parquet(root / "data/test-00000-of-00001.parquet", [0] * 5, metadata, with_label=False)
    return root


def stored(out: Path, split: str) -> list[tuple[int, int]]:
    """(label, grey level at the centre) of every stored sample of `split`."""
    manifest = read_manifest(out)
    found = []
    for shard in manifest.splits[split].shards:
        for data, label in iter_shard(out / shard.name, read_index(out / shard.index_name)):
            with Image.open(io.BytesIO(data)) as image:
                found.append((label, image.convert("L").getpixel((10, 12))))
    return found


def pack_snapshot(src: Path, out: Path, **settings):
    config = PackConfig(shard_size=5, workers=2, **settings)
    return pack(detect_source(src), out, config, progress=False)[0]


def assert_labels_follow_pixels(out: Path, split: str, count: int) -> None:
    samples = stored(out, split)
    assert len(samples) == count
    for label, grey in samples:
        assert abs(grey - GREY[label]) < 8, (label, grey)


def test_hub_layout_with_metadata_packs_counts_labels_and_names(tmp_path):
    src = hub_snapshot(tmp_path / "tiny-imagenet")
    assert detect_source(src).layout == "parquet"
    manifest = pack_snapshot(src, tmp_path / "shards")
    assert [name for name, _ in manifest.classes] == NAMES
    assert manifest.splits["train"].samples == 20  # 21 rows, one corrupt
    assert manifest.splits["train"].transcoded == 1  # the PNG row
    assert manifest.splits["val"].samples == 6
    assert_labels_follow_pixels(tmp_path / "shards", "train", 20)
    assert_labels_follow_pixels(tmp_path / "shards", "val", 6)
    assert [r["path"] for r in manifest.rejected] == ["data/train-00000-of-00002.parquet row 6"]
    assert any("test: 5 unlabelled" in line for line in manifest.skipped)
    assert manifest.source["layout"] == "parquet"


def test_converter_layout_takes_names_from_dataset_infos_json(tmp_path):
    src = tmp_path / "converted"
    write_parquet(src / "default/train/0000.parquet", [2, 1, 0, 2, 1, 0, 2], metadata=False)
    write_parquet(src / "default/validation/0000.parquet", [0, 1, 2], metadata=False)
    infos = {"default": {"features": {"label": {"names": ["cat", "dog", "fox"]}}}}
    (src / "dataset_infos.json").write_text(json.dumps(infos))
    manifest = pack_snapshot(src, tmp_path / "shards")
    assert [name for name, _ in manifest.classes] == ["cat", "dog", "fox"]
    assert (manifest.splits["train"].samples, manifest.splits["val"].samples) == (7, 3)
    assert_labels_follow_pixels(tmp_path / "shards", "train", 7)


def test_without_metadata_the_classes_are_the_label_ids(tmp_path):
    src = hub_snapshot(tmp_path / "bare", metadata=False)
    manifest = pack_snapshot(src, tmp_path / "shards")
    assert [name for name, _ in manifest.classes] == ["0", "1", "2"]
    assert_labels_follow_pixels(tmp_path / "shards", "val", 6)


def test_no_valid_split_holds_out_val_fraction(tmp_path):
    src = tmp_path / "trainonly"
    write_parquet(src / "data/train-00000-of-00001.parquet", [i % 3 for i in range(15)], True)
    with pytest.raises(Exception, match="--val-fraction"):
        pack_snapshot(src, tmp_path / "refused")
    manifest = pack_snapshot(src, tmp_path / "shards", val_fraction=0.2)
    assert (manifest.splits["train"].samples, manifest.splits["val"].samples) == (12, 3)
    assert sorted(label for label, _ in stored(tmp_path / "shards", "val")) == [0, 1, 2]


def test_cli_packs_a_snapshot_and_hf_without_the_hub_says_how_to_install(tmp_path, monkeypatch):
    src = hub_snapshot(tmp_path / "snap")
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(src), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "skipped test: 5 unlabelled" in result.output
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    result = runner.invoke(main, ["pack", "hf://zh-plus/tiny-imagenet", str(tmp_path / "hub")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "pip install huggingface_hub" in result.output


def test_each_row_group_is_read_once_and_shards_still_mix_the_classes(tmp_path, monkeypatch):
    """A file sorted by class (as Hub files often are), 30 row groups of 4, shards of 10: each row
    group is read once in all (not once per shard touching it), and shuffled row groups give
    shards of mixed classes in an order that is not the file's."""
    labels = [i // 40 for i in range(120)]  # 40 rows of class 0, then 1, then 2
    write_parquet(tmp_path / "snap/data/train-00000-of-00001.parquet", labels, True)
    write_parquet(tmp_path / "snap/data/valid-00000-of-00001.parquet", [0, 1, 2, 0, 1, 2], True)
    pq = pytest.importorskip("pyarrow.parquet")
    log = tmp_path / "reads.log"
    read_row_group = pq.ParquetFile.read_row_group

    def logged(self, group, *args, **kwargs):  # the forked workers inherit it
        with open(log, "a") as f:
            f.write(f"{self.metadata.num_rows} {group}\n")
        return read_row_group(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", logged)
    out = tmp_path / "shards"
    manifest, _ = pack(detect_source(tmp_path / "snap"), out, PackConfig(shard_size=10), False)
    reads = log.read_text().splitlines()
    assert sorted(reads) == sorted([f"120 {g}" for g in range(30)] + ["6 0", "6 1"])
    assert len(manifest.splits["train"].shards) == 12
    assert_labels_follow_pixels(out, "train", 120)
    order = [label for label, _ in stored(out, "train")]
    assert order != sorted(order)
    first_shard = order[: manifest.splits["train"].shards[0].samples]
    assert len(set(first_shard)) > 1


CONFIG_NAMES = {"birds": ["finch", "robin", "wren"], "cats": ["lynx", "puma"]}


def two_config_snapshot(root: Path) -> Path:
    """The Hub's layout of a dataset with two configs, `<config>/<split>-*.parquet`; each config's
    schema metadata names its own classes. birds: 9 train + 3 valid rows; cats: 4 + 2."""
    for config, train, valid in (("birds", 9, 3), ("cats", 4, 2)):
        names = CONFIG_NAMES[config]
        for split, rows in (("train", train), ("valid", valid)):
            labels = [i % len(names) for i in range(rows)]
            path = root / config / f"{split}-00000-of-00001.parquet"
            write_parquet(path, labels, True, names=names)
    return root


def test_a_snapshot_of_two_configs_is_refused_naming_them_and_one_packs_alone(tmp_path):
    src = two_config_snapshot(tmp_path / "snap")
    runner = CliRunner()
    result = runner.invoke(main, ["pack", str(src), str(tmp_path / "both"), "--workers", "1"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "2 configs (birds, cats)" in result.output and "--config" in result.output
    assert not (tmp_path / "both").exists()
    result = runner.invoke(
        main, ["pack", str(src), str(tmp_path / "cats"), "--config", "cats", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "cats")
    assert [name for name, _ in manifest.classes] == CONFIG_NAMES["cats"]
    assert (manifest.splits["train"].samples, manifest.splits["val"].samples) == (4, 2)
    assert manifest.source["root"] == "cats/"
    birds = pack_snapshot(src / "birds", tmp_path / "birds")  # or the config's own directory
    assert [name for name, _ in birds.classes] == CONFIG_NAMES["birds"]
    assert (birds.splits["train"].samples, birds.splits["val"].samples) == (9, 3)


def fake_hub(monkeypatch, snapshot: Path, files: list[str]) -> list[dict]:
    """huggingface_hub as far as snapshot_hub uses it: the repo's file list, and a download that
    records its arguments and returns the snapshot on disk."""
    import types

    calls = []

    def snapshot_download(repo, **kwargs):
        calls.append({"repo": repo, **kwargs})
        return str(snapshot)

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = snapshot_download
    hub.list_repo_files = lambda repo, repo_type: files
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", hub)
    return calls


def test_hf_with_two_configs_is_refused_before_download_and_hf_config_fetches_one(
    tmp_path, monkeypatch
):
    from fnmatch import fnmatch

    src = two_config_snapshot(tmp_path / "snap")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.parquet"))
    files += ["README.md", "dataset_infos.json"]
    calls = fake_hub(monkeypatch, src, files)
    runner = CliRunner()
    cache = ["--cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    result = runner.invoke(main, ["pack", "hf://someone/pets", str(tmp_path / "both"), *cache])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "hf://someone/pets/birds, hf://someone/pets/cats" in result.output
    assert calls == []  # nothing fetched
    out = tmp_path / "cats"
    result = runner.invoke(main, ["pack", "hf://someone/pets/cats", str(out), *cache])
    assert result.exit_code == 0, result.output
    patterns = calls[0]["allow_patterns"]
    fetched = [f for f in files if any(fnmatch(f, p) for p in patterns)]
    assert [f for f in fetched if f.endswith(".parquet")] == [
        "cats/train-00000-of-00001.parquet",
        "cats/valid-00000-of-00001.parquet",
    ]
    assert [name for name, _ in read_manifest(out).classes] == CONFIG_NAMES["cats"]
