"""loaders/decode.py: decoding into bounded canvases, threads and processes alike, and a sample
that does not decode named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import batches_of, make


def test_an_image_larger_than_the_canvas_is_scaled_to_fit_as_it_is_decoded():
    import io

    from PIL import Image

    from fastalex.loaders.decode import decode_to_fit, jpeg_size

    rows = np.linspace(0, 255, 1000)[:, None] * np.ones((1, 2000))
    photo = np.stack([rows, rows[::-1], np.full_like(rows, 90)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    assert jpeg_size(data) == (1000, 2000)
    fitted = decode_to_fit(data, jpeg_size(data), 128, 128)
    assert fitted.shape == (64, 128, 3) and fitted.dtype == np.uint8  # aspect kept
    expected = np.asarray(Image.fromarray(photo).resize((128, 64), Image.BILINEAR)).astype(int)
    assert np.abs(fitted.astype(int) - expected).mean() < 3  # the same picture, smaller


def test_decode_threads_and_processes_give_identical_batches(synth_pack):
    """--decode threads and processes run the same decoder into the same canvases: equal pixels
    and labels, train (two epochs, then a resumed pass) and val."""
    runs = {}
    for mode in ("threads", "processes"):
        batches = []
        for split, fields in (("train", {}), ("train", {"first_epoch": 1}), ("val", {})):
            loader = make(synth_pack, "cpu", split, batch_size=32, decode=mode, **fields)
            assert loader.decode == mode
            passes = 2 if split == "train" and not fields else 1
            batches += [batch for _ in range(passes) for batch in batches_of(loader)]
            loader.close()
        runs[mode] = batches
    assert len(runs["threads"]) == len(runs["processes"]) == 2 * 7 + 7 + 2
    for (images, labels), (want_images, want_labels) in zip(runs["threads"], runs["processes"]):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_sample_that_does_not_decode_is_named(coded_pack, tmp_path, mode):
    """A JPEG damaged after the pack was checked (here zeroed once the loader is built) ends the
    pass with UndecodableSample naming the shard and the sample, from a thread or a process."""
    from fastalex.loaders.decode import UndecodableSample

    copy = tmp_path / "shards"
    shutil.copytree(coded_pack.path, copy)
    loader = make(copy, "cpu", "val", batch_size=32, decode=mode)
    table = loader.table
    sample = 40  # in the second batch
    shard = table.paths[table.shard_ids[sample]]
    with open(shard, "r+b") as tar:
        tar.seek(int(table.offsets[sample]))
        tar.write(bytes(int(table.sizes[sample])))
    with pytest.raises(UndecodableSample, match=rf"{shard}: sample {sample} .*fastalex verify"):
        for _ in loader:
            pass
    loader.close()
