"""The staging area of a pack: a shard's record is kept only while its tar and index hash as the
killed run recorded them; a fingerprint changes with anything that changes the shards."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fastalex.shards import write_shard
from fastalex.staging import ShardResult, fingerprint, read_record, write_record


def staged_shard(folder: Path) -> tuple[Path, ShardResult]:
    tar = folder / "train-000000.tar"
    info = write_shard(tar, [(f"{i:08d}", b"\xff\xd8 not decoded here", i % 3) for i in range(5)])
    result = ShardResult("train", info, [{"path": "a.jpg", "reason": "empty file"}], (64, 48), {})
    write_record(tar, result)
    return tar, result


def test_a_record_is_kept_while_its_tar_and_index_hash_as_recorded(tmp_path):
    tar, result = staged_shard(tmp_path)
    assert read_record(tar) == result
    data = bytearray(tar.read_bytes())
    data[600] ^= 1  # same size, another byte
    tar.write_bytes(bytes(data))
    assert read_record(tar) is None
    tar, result = staged_shard(tmp_path)
    index = tar.with_suffix(".idx")
    index.write_text(index.read_text().replace("jpg", "JPG", 1))
    assert read_record(tar) is None
    tar, result = staged_shard(tmp_path)
    tar.with_suffix(".json").unlink()  # a tar renamed in place, killed before its record
    assert read_record(tar) is None


class Shard(NamedTuple):
    split: str
    number: int
    items: list


def test_the_fingerprint_changes_with_each_items_place_label_or_name(tmp_path):
    plan = [Shard("train", 0, [(0, "a.jpg", 1), (1, "b.jpg", 0)])]
    base = fingerprint({"path": "/src"}, {"seed": 0}, plan)
    assert base == fingerprint({"path": "/src"}, {"seed": 0}, list(plan))
    for other in (
        [Shard("train", 0, [(0, "b.jpg", 0), (1, "a.jpg", 1)])],
        [Shard("train", 0, [(0, "a.jpg", 2), (1, "b.jpg", 0)])],
        [Shard("train", 0, [(0, "a.png", 1), (1, "b.jpg", 0)])],
    ):
        assert fingerprint({"path": "/src"}, {"seed": 0}, other) != base
    assert fingerprint({"path": "/src"}, {"seed": 1}, plan) != base
