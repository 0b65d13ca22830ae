"""The loader group: images/s out of each loader, no model, all rows timed side by side.

Rows: ``reference`` (the blog's pipeline rebuilt in reference.py: ImageFolder + PIL + DataLoader
with 2 workers); one row per entry of ``fastalex.loaders.BACKENDS``, each built by `build_loader`
from a TrainConfig (``cpu`` with its default ``--decode auto``); each VARIANTS row
(``cpu-threads``: decoding in threads of the main process); and two peers doing the same work, each
skipped with the reason where it does not import: ``ffcv``, FFCV's own writer and loader
(ffcv_loader.py), and ``spdl``, SPDL's thread pipeline and FFmpeg decoding (spdl_loader.py). Each
row is one continuous stream of batches (epoch restarts count where they fall) of what its model
reads: uint8 pixels for fastalex and the peers, the blog's normalised float32 for the reference.
Imports fastalex's loaders and the benchmark's own modules.
"""

from __future__ import annotations

import dataclasses
import time

from bench_data import Data, base_config, need
from harness import Skip, Subject, endless, log, plural

# Rows of a backend under other config fields: name -> (backend, fields).
VARIANTS = {"cpu-threads": ("cpu", {"decode": "threads"})}
# What each row's loader hands to its model, in the row's note: every fastalex backend's batch
# contract (fastalex.loaders.Batch); the peers hand over the same, the reference its own floats.
MODEL_NORMALISES = " (the model normalises: its first op)"
HANDS_OVER = f"uint8 pixels, channels_last{MODEL_NORMALISES}"


def rows(args, data: Data, size: int, device) -> dict:
    """name -> builder of the row's Subject, in table order."""
    from fastalex.loaders import BACKENDS

    builders = {"reference": lambda: reference_row(args, data, size, device)}
    for name in BACKENDS:
        builders[name] = lambda name=name: backend_row(args, data, name, size, device)
    for row, (name, fields) in VARIANTS.items():
        builders[row] = lambda name=name, fields=fields: backend_row(
            args, data, name, size, device, **fields
        )
    builders["ffcv"] = lambda: ffcv_row(args, data, size, device)
    builders["spdl"] = lambda: spdl_row(args, data, size, device)
    return builders


def stream_subject(loader, note: str, args, cfg=None, pause_between_windows=False) -> Subject:
    """A Subject that takes the loader's next batch per call; --batches 0 = one epoch a window.
    `pause_between_windows`: after each window the stream is dropped and `loader.pause()` called
    (the next call starts a new stream: its start-up falls in the untimed lead-in)."""
    stream = None

    def advance() -> int:
        nonlocal stream
        if stream is None:
            stream = endless(loader)
        return len(next(stream).labels)

    def pause() -> None:
        nonlocal stream
        if stream is not None:
            stream.close()
            stream = None
        loader.pause()

    def close() -> None:
        if stream is not None:
            stream.close()
        loader.close()

    window = args.batches or len(loader)
    note += (
        f"; >= {plural(window, 'batch')} of {args.batch_size} per window, {len(loader)} per epoch"
    )
    return Subject(
        advance=advance,
        close=close,
        pause=pause if pause_between_windows else None,
        window_calls=window,
        info={
            "batch_size": args.batch_size,
            "note": note,
            "config": dataclasses.asdict(cfg) if cfg else None,
        },
    )


def reference_row(args, data: Data, size: int, device) -> Subject:
    from reference import ReferenceLoader

    loader = ReferenceLoader(need(data, "tree") / "train", size, args.batch_size, device)
    note = (
        "blog pipeline (reference.py): ImageFolder + PIL decode, RandomResizedCrop(64)"
        f"{'' if size == 64 else f' + Resize({size})'} + flip + ToTensor + Normalize, "
        "DataLoader(2 workers), .to(device); torchvision transforms re-implemented with "
        "PIL + torch (torchvision not installable beside this torch); hands over float32 NCHW, "
        "normalised by the loader (the blog's model takes it as it is)"
    )
    return stream_subject(loader, note, args)


def backend_row(args, data: Data, name: str, size: int, device, **fields) -> Subject:
    from fastalex.loaders import Placement, build_loader

    cfg = base_config(args, data, size, loader=name, batch_size=args.batch_size, **fields)
    need(data, "shards")
    loader = build_loader(cfg, "train", Placement(device))
    if loader.backend != name:
        loader.close()
        raise Skip(f"build_loader(loader={name!r}) ran {loader.backend!r}")
    note = f"build_loader(loader={name!r}{''.join(f', {k}={v!r}' for k, v in fields.items())})"
    if name == "cpu":
        note += f", decode in {loader.decode}"
    if name == "dali":
        note += ", DALI " + ("GPU (mixed decode)" if device.type == "cuda" else "CPU-only mode")
    note += f"; hands over {HANDS_OVER}"
    return stream_subject(loader, note, args, cfg)


def ffcv_row(args, data: Data, size: int, device) -> Subject:
    try:
        import ffcv_loader
    except ImportError as e:
        raise Skip(
            f"ffcv is not installed here ({e}); README, Benchmarks, says how to get this row"
        ) from None
    from fastalex.config import default_workers
    from fastalex.loaders import Placement, loader_workers

    shards = need(data, "shards")
    # The fastalex rows' config: same crop ranges, batch, seed and worker count.
    cfg = base_config(args, data, size, loader="cpu", batch_size=args.batch_size)
    workers = loader_workers(cfg, Placement(device))
    path = ffcv_loader.beton_path(shards, "train", data.scratch or shards.parent)
    if not path.exists():
        log(f"[loader] ffcv: writing {path} with FFCV's DatasetWriter")
        start = time.perf_counter()
        ffcv_loader.write_beton(shards, "train", path, default_workers())
        log(f"[loader] ffcv: wrote it in {time.perf_counter() - start:.1f} s")
    loader = ffcv_loader.FfcvLoader(cfg, path, device, workers)
    note = (
        f"FFCV {ffcv_version()} Loader over {path.name} (FFCV's writer, JPEG quality "
        f"{ffcv_loader.JPEG_QUALITY}), {workers} workers; RandomResizedCrop decoder at the "
        f"config's ranges + flip; hands over {loader.hands_over}{MODEL_NORMALISES}"
    )
    return stream_subject(loader, note, args, cfg)


def spdl_row(args, data: Data, size: int, device) -> Subject:
    try:
        import spdl_loader
    except ImportError as e:
        raise Skip(
            f"spdl is not importable here ({e}); benchmarks/spdl_loader.py says how to install it"
        ) from None
    from fastalex.loaders import Placement, loader_workers

    need(data, "shards")
    # The fastalex rows' config: same crop ranges, batch, seed and worker count.
    cfg = base_config(args, data, size, loader="cpu", batch_size=args.batch_size)
    workers = loader_workers(cfg, Placement(device))
    loader = spdl_loader.SpdlLoader(cfg, device, workers)
    note = (
        f"SPDL {package_version('spdl-io')} PipelineBuilder over the pack's JPEGs, {workers} "
        "threads: demux + FFmpeg decode with a per-image filter graph (crop at the config's "
        f"RandomResizedCrop box, {spdl_loader.SCALE_FLAGS} scale, flip) + convert_frames; "
        f"hands over {loader.hands_over}{MODEL_NORMALISES}; its pipeline stopped after each "
        "window (spdl_loader.SpdlLoader.pause)"
    )
    return stream_subject(loader, note, args, cfg, pause_between_windows=True)


def ffcv_version() -> str:
    return package_version("ffcv")


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"
