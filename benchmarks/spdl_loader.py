"""SPDL, the second peer of the loader group: SPDL's thread pipeline and FFmpeg image decoding over
the pack's JPEGs, doing the train loaders' work; yields fastalex `Batch`es, as FfcvLoader does.

The only module that imports spdl; nothing in fastalex does. Install (Debian 12; spdl-io 0.8's
extension loads FFmpeg 4-9 shared libraries, Debian's are FFmpeg 5):
``apt-get install --no-install-recommends libavutil57 libavcodec59 libavformat59 libavdevice59
libavfilter8`` then ``pip install spdl==0.8.0`` (spdl-io, spdl-core; numpy only, no torch).
Per sample: random-resized-crop box and flip drawn as every fastalex backend draws them, then
SPDL's demux + decode with an FFmpeg filter graph that crops, scales (bilinear) and flips; per
batch: SPDL's convert_frames, handed over as fastalex's loaders hand theirs: (N, 3, S, S) uint8
pixels, channels_last (on CUDA copied from pinned memory to the device); the model normalises.
What differs from the fastalex rows, and why: RESULTS.md, "The spdl row".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import spdl.io
import torch
from spdl.pipeline import PipelineBuilder

from fastalex.config import TrainConfig
from fastalex.loaders import Batch, Placement, augment_for, open_pack, plan_share
from fastalex.loaders.base import epoch_generator
from fastalex.loaders.decode import SampleTable, jpeg_size

SCALE_FLAGS = "bilinear"  # swscale's; widened to the input/output ratio when it downscales
ERROR_CHARS = 300  # of spdl's own message, in the ImportError


def load_ffmpeg() -> None:
    """spdl.io loads its FFmpeg extension at first use; load it now, so that a machine without
    the FFmpeg libraries fails this module's import (the row is skipped), not a timed window."""
    try:
        spdl.io.demux_config()
    except RuntimeError as e:
        raise ImportError(
            f"spdl.io finds no FFmpeg 4-9 shared libraries (libavutil, libavcodec, ...): "
            f"{str(e)[:ERROR_CHARS]}"
        ) from None


load_ffmpeg()


def filter_desc(box: tuple[int, int, int, int], flip: bool, size: int) -> str:
    """The FFmpeg filter graph of one sample: crop the (x0, y0, w, h) box (exact: odd offsets
    kept, the 4:2:0 chroma then starts at the pixel below), scale it to size x size, RGB, flip."""
    x0, y0, w, h = box
    return (
        f"crop={w}:{h}:{x0}:{y0}:exact=1,scale={size}:{size}:flags={SCALE_FLAGS},"
        "format=pix_fmts=rgb24" + (",hflip" if flip else "")
    )


class Epochs:
    """The pipeline's source: each ``iter`` is the next epoch's samples, in a fresh random order
    of full batches (the short last one dropped), each with its crop box and flip drawn from the
    epoch's generator for the whole batch at once."""

    def __init__(self, loader: SpdlLoader, first_epoch: int = 0) -> None:
        self.loader = loader
        self.epoch = first_epoch

    def __iter__(self):
        loader, table = self.loader, self.loader.table
        generator = epoch_generator(loader.seed, self.epoch, 0)
        self.epoch += 1
        start, stop, steps, _ = loader.share
        order = torch.randperm(stop - start, generator=generator)[: steps * loader.batch_size]
        for ids in (order + start).split(loader.batch_size):
            boxes, flips = loader.augment.draw(loader.heights[ids], loader.widths[ids], generator)
            for i, box, flip in zip(ids.tolist(), boxes.int().tolist(), flips.tolist()):
                yield table.shard_ids[i], table.offsets[i], table.sizes[i], i, box, flip


class SpdlLoader:
    """SPDL's PipelineBuilder over the pack's train split, yielding fastalex `Batch`es: `workers`
    threads demux and decode (with the per-sample filter graph) and collate; one epoch per
    ``__iter__``, ``len()`` batches each; ``close()`` stops the pipeline."""

    backend = "spdl"

    def __init__(self, cfg: TrainConfig, device: torch.device, workers: int) -> None:
        self.device = torch.device(device)
        placement = Placement(self.device)
        manifest = open_pack(cfg, "train", placement)
        self.table = SampleTable(Path(cfg.shards), manifest, "train", cfg.image_size)
        self.augment = augment_for(cfg, "train")
        self.batch_size, self.seed, self.size = cfg.batch_size, cfg.seed, cfg.image_size
        self.share = plan_share(manifest.splits["train"].samples, cfg.batch_size, placement, True)
        self.tars = [np.memmap(path, dtype=np.uint8, mode="r") for path in self.table.paths]
        # Each image's size from its JPEG header, once (FFCV's .beton stores them too): the boxes
        # of a batch are drawn together, before its images are decoded.
        sizes = torch.tensor(
            [jpeg_size(self.jpeg(s, o, n)) for s, o, n in self._locations()], dtype=torch.int64
        ).view(-1, 2)
        self.heights, self.widths = sizes[:, 0], sizes[:, 1]
        self.hands_over = "uint8 pixels, channels_last" + (
            "" if self.device.type == "cpu" else ", copied to the device from pinned memory"
        )
        self.epochs, self.workers, self.prefetch = Epochs(self), workers, cfg.prefetch
        self.pipeline = None
        self.start()
        self.samples = self.share.steps * cfg.batch_size

    def start(self) -> None:
        """Build and start the pipeline (on the next epoch of its source)."""
        self.pipeline = (
            PipelineBuilder()
            .add_source(self.epochs, continuous=True)
            .pipe(self._decode, concurrency=self.workers, name="decode")
            .aggregate(self.batch_size, drop_last=True)
            .pipe(self._collate, name="collate")
            .add_sink(buffer_size=self.prefetch)  # prefetch as deep as the fastalex rows'
            .build(num_threads=self.workers, report_stats_interval=-1)
        )
        self.pipeline.start()

    def pause(self) -> None:
        """Stop the pipeline's threads until the next ``iter``, which starts a new pipeline.
        The benchmark pauses the row after each of its windows: left running, even idle, they
        slowed the other rows' OpenMP work (`resident` at 64 px: 23-31k images/s beside them,
        44-49k without, on the 2-core EPYC)."""
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline = None

    def _locations(self):
        table = self.table
        return zip(table.shard_ids.tolist(), table.offsets.tolist(), table.sizes.tolist())

    def jpeg(self, shard: int, offset: int, size: int) -> np.ndarray:
        return self.tars[shard][offset : offset + size]  # a view of the mmap: no copy

    def _decode(self, sample):
        shard, offset, size, index, box, flip = sample
        packets = spdl.io.demux_image(self.jpeg(shard, offset, size))
        return spdl.io.decode_packets(packets, filter_desc(box, flip, self.size)), index

    def _collate(self, decoded) -> tuple[torch.Tensor, torch.Tensor]:
        frames, ids = zip(*decoded)
        pixels = spdl.io.to_numpy(spdl.io.convert_frames(list(frames)))  # (N, S, S, 3) uint8
        pixels = torch.from_numpy(pixels)
        if self.device.type != "cpu":
            pixels = pixels.pin_memory()
        return pixels, self.table.labels[list(ids)]

    def __len__(self) -> int:
        return self.share.steps

    def __iter__(self):
        if self.pipeline is None:
            self.start()
        for pixels, labels in self.pipeline.get_iterator():
            images = pixels.permute(0, 3, 1, 2)  # (N, 3, S, S) uint8, channels_last strides
            if self.device.type != "cpu":  # .to keeps the strides (preserve_format)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield Batch(images, labels)

    def close(self) -> None:
        self.pause()
