#!/usr/bin/env python
"""Images/s of each stage of fastalex, side by side with the reference blog's pipeline.

    python benchmarks/throughput.py          # synthetic stand-in, every group, 64 and 227 px
    python benchmarks/throughput.py --data shards/ --tree tiny-imagenet-200/ --json out.json

Groups, one row per variant and image size:

- ``loader`` (images/s out of the loader, no model): ``reference`` is the blog's pipeline rebuilt
  (reference.py: ImageFolder + PIL + DataLoader with 2 workers); then one row per entry of
  ``fastalex.loaders.BACKENDS``, each built by ``build_loader`` from a TrainConfig.
- ``model`` (train steps on synthetic tensors already on the device, built by fastalex.train itself):
  ``eager-fp32`` (NCHW, fp32, eager: the reference's set-up), ``channels-last``, ``amp`` (plus
  channels-last) and ``compiled`` (the full default stack on this device).
- ``e2e`` (loader + real training steps): the ``reference`` stack (blog loader, eager fp32 NCHW, the
  reference recipe's batch) against the ``fastalex`` default stack, same arch at each size; with the
  epoch time implied for Tiny ImageNet's 100,000 training images.
- ``pack`` (images/s of ``fastalex.pack.pack`` over a source tree).

Method (each row): the measured thing is set up (``setup_s``), run for warm-up batches or steps
(``warmup_s``; it holds loader start-up and, for compiled rows, compilation, ``compile_s`` being the
first step), then timed over ``--repeats`` consecutive windows of ``--batches`` batches / ``--steps``
steps, the device synchronised (torch.cuda.synchronize) at both ends of each window. A row gives
the median images/s of its windows, with their min and max. Loaders run as a continuous stream:
epoch restarts count where they fall (every len(loader) batches). A row that cannot run here (no
CUDA, no DALI, a backend not written yet) is kept, with images_per_s null and the reason in its
note; it is never dropped and never estimated.

Data: ``--data`` is a pack; the reference and pack rows read a source tree, ``--tree`` (a directory,
or the official zip, extracted to a temporary directory for the reference), or else the pack
unpacked to a temporary tree. Without ``--data`` a synthetic stand-in (200 classes, 64 train images
each) is generated and packed in a temporary directory, and the output says so.

Output: a table and the ratios against each group's reference row on stdout; with ``--json PATH``
one object ``{"machine", "settings", "rows", "complete"}`` (rewritten after every row, so a run
killed part-way leaves what it measured); and, unless ``--no-record``, every row with the machine
info appended to ``benchmarks/results/throughput.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # reference.py sits beside this script

from fastalex.config import RECIPES, PackConfig, TrainConfig, default_workers  # noqa: E402
from fastalex.errors import UserError  # noqa: E402

GROUPS = ("loader", "model", "e2e", "pack")
RESULTS = HERE / "results" / "throughput.jsonl"
EPOCH_IMAGES = 100_000  # Tiny ImageNet's train split
NUM_CLASSES = 200  # Tiny ImageNet; the model rows' fc8 width
# Stand-in data when no --data is given: 200 classes as Tiny ImageNet, fewer images per class.
STANDIN = dict(classes=200, train_per_class=64, val_per_class=8)
QUICK_STANDIN = dict(classes=2, train_per_class=16, val_per_class=4)
# --quick: a smoke test of every row (tests/test_benchmarks.py), not a measurement. On the 2-core dev
# box a step of the 59M-parameter model takes ~1-2 s even at batch 4 (the SGD update dominates), and
# compiling the step 35-60 s (60 s from a cold inductor cache), so windows are one step and
# the compiled variants are left out (the model row skipped, the e2e row run with compile off).
QUICK = dict(batch_size=4, steps=1, batches=0, repeats=3, warmup=1)  # batches 0 = one epoch
MODEL_ROWS = {  # name -> TrainConfig fields; each adds one thing to the one before
    "eager-fp32": dict(channels_last="off", amp="off", compile=False),
    "channels-last": dict(channels_last="on", amp="off", compile=False),
    "amp": dict(channels_last="on", amp="auto", compile=False),
    "compiled": dict(channels_last="auto", amp="auto", compile=True),  # the defaults: `fastalex train`
}
REFERENCE_ROW = {"loader": "reference", "model": "eager-fp32", "e2e": "reference"}


class Skip(Exception):
    """This row cannot run here; the message says why."""


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=HERE.parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    """What a number depends on: CPU, GPU, driver, library versions, code version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            cpu = next(names, cpu)
    except OSError:
        pass
    versions = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali") or name in ("pillow", "simplejpeg", "numpy"):
            versions[name] = dist.version
    cuda = device.type == "cuda"
    driver = None
    if cuda:
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = driver.splitlines()[0] if driver else None
    status = _run(["git", "status", "--porcelain"])
    return {
        "cpu": cpu,
        "cores": default_workers(),  # usable: the affinity mask, not the machine's count
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": driver,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": next((v for k, v in versions.items() if k.startswith("nvidia-dali")), None),
        "pillow": versions.get("pillow"),
        "simplejpeg": versions.get("simplejpeg"),
        "git_sha": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": status is None or bool(status),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA sync point: the clock is read after the device is done


def time_windows(advance: Callable[[], int], device, warmup: int, window: int,
                 repeats: int) -> dict:
    """Call `advance` (one batch or step; returns the images it handled) `warmup` times, then time
    `repeats` windows of `window` calls each. Returns images/s per window and the warm-up times."""
    start = time.perf_counter()
    first_s = None
    for i in range(warmup):
        advance()
        if i == 0:
            synchronize(device)
            first_s = time.perf_counter() - start
    synchronize(device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        images = sum(advance() for _ in range(window))
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return {"rates": rates, "warmup_s": warmup_s, "first_s": first_s}


def endless(loader) -> Iterator:
    """The loader's batches, epoch after epoch (each `iter` is the next epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"{loader.backend}: an epoch yielded no batch")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("ch") else "s")


def measured(rates: list[float], **extra) -> dict:
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": len(rates), **extra}


def run_row(rows: list, save: Callable, group: str, name: str, size: int, device, body) -> None:
    """Run one row's body; a Skip or ImportError becomes a skipped row, any other failure a failed
    row (reported, and the exit status becomes 1), so one broken variant never hides the others."""
    row = {"group": group, "name": name, "image_size": size, "device": str(device)}
    print(f"[{group}] {name} @ {size} px ...", file=sys.stderr, flush=True)
    try:
        row.update(body())
        row["status"] = "ok"
    except (Skip, ImportError) as e:
        reason = str(e) if isinstance(e, Skip) else f"not importable here ({e})"
        row.update(images_per_s=None, min=None, max=None, repeats=0, status="skipped",
                   note=f"skipped: {reason}")
    except Exception as e:  # noqa: BLE001 - a UserError or a bug: report it, go on with the rest
        row.update(images_per_s=None, min=None, max=None, repeats=0, status="failed",
                   note=f"failed: {type(e).__name__}: {e}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append(row)
    save()


@dataclasses.dataclass
class Data:
    shards: Path | None = None  # a finished pack, for the fastalex loaders
    tree: Path | None = None  # a Tiny-ImageNet-layout directory, for the reference rows
    source: Path | None = None  # what the pack row packs: the tree, or the official zip as given
    description: str = ""
    problem: str | None = None  # why there is no data (rows that need it are skipped with this)


def extract_zip(ref, out: Path) -> Path:
    """The train/ and val/ files of a Tiny ImageNet zip, extracted to `out` (the reference reads
    files from a directory, as torchvision's ImageFolder does)."""
    import zipfile

    with zipfile.ZipFile(ref.path) as archive:
        wanted = (ref.root + "train/", ref.root + "val/", ref.root + "wnids.txt")
        members = [n for n in archive.namelist() if n.startswith(wanted)]
        archive.extractall(out, members)
    return out / ref.root


def unpack_shards(shards: Path, out: Path) -> Path:
    """Write the pack back out as a Tiny-ImageNet-layout tree (the reference reads files)."""
    from fastalex.shards import iter_shard, read_index, read_manifest

    manifest = read_manifest(shards)
    wnids = [wnid for wnid, _ in manifest.classes]
    (out / "val" / "images").mkdir(parents=True)
    (out / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (out / "words.txt").write_text("".join(f"{w}\t{words}\n" for w, words in manifest.classes))
    for wnid in wnids:
        (out / "train" / wnid / "images").mkdir(parents=True)
    annotations = []
    for split, info in manifest.splits.items():
        for shard in info.shards:
            index = read_index(shards / shard.index_name)
            for key, (data, label) in zip(index.names, iter_shard(shards / shard.name, index)):
                if split == "train":
                    (out / "train" / wnids[label] / "images" / f"{key}.JPEG").write_bytes(data)
                else:
                    (out / "val" / "images" / f"{key}.JPEG").write_bytes(data)
                    annotations.append(f"{key}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    (out / "val" / "val_annotations.txt").write_text("".join(annotations))
    return out


def prepare_data(args, workdir: Path) -> Data:
    from fastalex.tinyimagenet import open_source

    if args.data:
        data = Data(shards=Path(args.data), description=f"pack {args.data}")
        if args.tree:
            ref = open_source(args.tree)
            data.source = Path(args.tree)
            data.description += f"; source {args.tree}"
            if ref.is_zip:
                print(f"extracting {args.tree} for the reference rows", file=sys.stderr, flush=True)
                data.tree = extract_zip(ref, workdir / "tree")
            else:
                data.tree = Path(ref.path) / ref.root
        else:
            print(f"unpacking {args.data} into a temporary tree for the reference and pack rows",
                  file=sys.stderr)
            data.tree = data.source = unpack_shards(data.shards, workdir / "tree")
            data.description += " (unpacked to a tree for the reference and pack rows)"
        return data
    from fastalex.tinyimagenet import synth

    counts = QUICK_STANDIN if args.quick else STANDIN
    description = (
        f"SYNTHETIC stand-in (not Tiny ImageNet): {counts['classes']} classes x "
        f"{counts['train_per_class']} train + {counts['val_per_class']} val 64x64 JPEGs"
    )
    print(f"no --data: writing a {description} in {workdir}", file=sys.stderr, flush=True)
    data = Data(tree=workdir / "tree", source=workdir / "tree", description=description)
    synth(data.tree, seed=0, workers=default_workers(), progress=False, **counts)
    try:
        from fastalex.pack import pack

        shards = workdir / "shards"
        pack(open_source(data.tree), shards, PackConfig(shard_size=16 if args.quick else 5000),
             progress=False)
        data.shards = shards
    except ImportError as e:
        data.problem = f"cannot pack the stand-in ({e})"
    return data


def need(data: Data, what: str) -> Path:
    path = getattr(data, what)
    if path is None:
        raise Skip(data.problem or f"no {what} given")
    return path


def arch_for(image_size: int) -> str:
    """The paper layout for upsampled input (227 px, as the blog), the 64 px layout for native-size
    input (model.py); 128 px, twice Tiny ImageNet's size, splits the two."""
    return "alexnet" if image_size >= 128 else "alexnet64"


def base_config(args, data: Data, size: int, recipe: str = "fast", **fields) -> TrainConfig:
    """The recipe's config at this image size on this device, with `fields` replaced."""
    return dataclasses.replace(RECIPES[recipe], shards=str(data.shards or ""), image_size=size,
                               arch=arch_for(size), device=args.device, **fields)


def bench_loader(args, data: Data, name: str, size: int, device) -> dict:
    from fastalex.loaders import Placement, build_loader
    from reference import ReferenceLoader

    window = args.batches
    start = time.perf_counter()
    if name == "reference":
        loader = ReferenceLoader(need(data, "tree") / "train", size, args.batch_size, device)
        cfg = None
        note = ("blog pipeline (reference.py): ImageFolder + PIL decode, RandomResizedCrop(64)"
                f"{'' if size == 64 else f' + Resize({size})'} + flip + ToTensor + Normalize, "
                "DataLoader(2 workers), .to(device); torchvision transforms re-implemented with "
                "PIL + torch (torchvision not installable beside this torch)")
    else:
        cfg = base_config(args, data, size, loader=name, batch_size=args.batch_size)
        need(data, "shards")
        loader = build_loader(cfg, "train", Placement(device))
        if loader.backend != name:
            loader.close()
            raise Skip(f"build_loader(loader={name!r}) ran {loader.backend!r}")
        note = f"build_loader(loader={name!r})"
        if name == "dali":
            note += ", DALI " + ("GPU (mixed decode)" if device.type == "cuda" else "CPU-only mode")
    setup_s = time.perf_counter() - start
    try:
        window = window or len(loader)
        stream = endless(loader)
        timing = time_windows(lambda: len(next(stream).labels), device, args.warmup, window,
                              args.repeats)
        stream.close()
    finally:
        loader.close()
    note += f"; {plural(window, 'batch')} of {args.batch_size} per repeat, {len(loader)} per epoch"
    return measured(timing["rates"], batch_size=args.batch_size, setup_s=setup_s,
                    warmup_s=timing["warmup_s"], note=note,
                    config=dataclasses.asdict(cfg) if cfg else None)


def build_step(cfg: TrainConfig, num_classes: int, steps_per_epoch: int):
    """fastalex.train's own model, optimizer, schedule and step for `cfg` (never a copy of the
    loop): returns (advance(images, labels), runtime); advance runs one step and steps the LR
    schedule, leaving the results on the device."""
    try:
        from fastalex import train
    except ImportError as e:
        raise Skip(f"fastalex.train not available ({e})") from None
    runtime = train.resolve_runtime(cfg)
    training = train.build_training(cfg, num_classes, runtime, steps_per_epoch)
    step = train.make_train_step(training.model, training.optimizer, training.scaler, cfg, runtime)

    def advance(images: torch.Tensor, labels: torch.Tensor) -> None:
        step(images, labels)
        training.schedule.step()

    return advance, runtime


def describe_runtime(runtime) -> str:
    compiled = "off"
    if runtime.compile:
        compiled = "whole step" if getattr(runtime, "compile_whole_step", False) else "model"
    return (f"amp {runtime.amp}, {'channels_last' if runtime.channels_last else 'NCHW'}, "
            f"compile {compiled}")


def bench_model(args, name: str, size: int, device) -> dict:
    fields = dict(MODEL_ROWS[name])
    note = ""
    if name == "amp" and device.type == "cpu":
        from fastalex.train import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            raise Skip("this CPU has no native bf16 (AVX512-BF16/AMX): autocast would only emulate "
                       "it; amp=auto is off on the CPU")
        fields["amp"] = "bf16"
        note = "bf16 autocast on the CPU (native here, so amp=auto picks it too); "
    if name == "compiled" and args.quick:
        raise Skip("compile skipped in --quick (compiling the step takes 35-60 s on a 2-core CPU)")
    cfg = base_config(args, Data(), size, batch_size=args.model_batch_size, **fields)
    start = time.perf_counter()
    step, runtime = build_step(cfg, NUM_CLASSES, EPOCH_IMAGES // cfg.batch_size)
    memory_format = runtime.memory_format
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device, generator=generator)
    images = images.contiguous(memory_format=memory_format)  # (N, 3, S, S) float32
    labels = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=device, generator=generator)
    setup_s = time.perf_counter() - start

    def advance() -> int:
        step(images, labels)
        return cfg.batch_size

    timing = time_windows(advance, device, args.warmup, args.steps, args.repeats)
    result = measured(timing["rates"], batch_size=cfg.batch_size, setup_s=setup_s,
                      warmup_s=timing["warmup_s"], config=dataclasses.asdict(cfg),
                      note=f"{note}{cfg.arch}, {plural(args.steps, 'step')} per repeat; "
                           f"{describe_runtime(runtime)}")
    if cfg.compile:
        result["compile_s"] = timing["first_s"]
        torch._dynamo.reset()
    return result


def bench_e2e(args, data: Data, name: str, size: int, device) -> dict:
    from fastalex.loaders import Placement, build_loader
    from fastalex.shards import read_manifest
    from reference import ReferenceLoader

    shards = need(data, "shards")
    num_classes = read_manifest(shards).num_classes
    recipe = RECIPES["reference" if name == "reference" else "fast"]
    batch_size = args.e2e_batch_size or recipe.batch_size
    if name == "reference":
        cfg = base_config(args, data, size, recipe="reference", batch_size=batch_size,
                          **MODEL_ROWS["eager-fp32"])
    else:
        cfg = base_config(args, data, size, batch_size=batch_size, compile=not args.quick)
    start = time.perf_counter()
    step, runtime = build_step(cfg, num_classes, EPOCH_IMAGES // batch_size)
    if name == "reference":
        loader = ReferenceLoader(need(data, "tree") / "train", size, batch_size, device)
        note = ("blog loader (reference.py) + eager fp32 NCHW steps of fastalex's model (the blog's "
                "layer sizes at 227 px), the blog's batch")
    else:
        loader = build_loader(cfg, "train", Placement(device))
        note = f"loader {loader.backend} + default stack"
        if not cfg.compile:
            note += " (compile off in --quick)"
    setup_s = time.perf_counter() - start
    try:
        stream = endless(loader)

        def advance() -> int:
            images, labels = next(stream)
            # The step's contract: images in the runtime's memory format (a no-op when they match).
            step(images.contiguous(memory_format=runtime.memory_format), labels)
            return len(labels)

        timing = time_windows(advance, device, args.warmup, args.steps, args.repeats)
        stream.close()
    finally:
        loader.close()
        if cfg.compile:
            torch._dynamo.reset()
    result = measured(timing["rates"], batch_size=batch_size, setup_s=setup_s,
                      warmup_s=timing["warmup_s"], config=dataclasses.asdict(cfg))
    result["epoch_s_100k"] = EPOCH_IMAGES / result["images_per_s"]
    result["note"] = (f"{note}, {cfg.arch}, batch {batch_size}, {plural(args.steps, 'step')} per "
                      f"repeat; {describe_runtime(runtime)}")
    if cfg.compile:
        result["compile_s"] = timing["first_s"]
    return result


def bench_pack(args, data: Data, workdir: Path, device) -> dict:
    from fastalex.pack import pack
    from fastalex.tinyimagenet import open_source

    ref = open_source(need(data, "source"))
    cfg = PackConfig(shard_size=16 if args.quick else PackConfig.shard_size)
    rates, warmup_s = [], 0.0
    for repeat in range(args.repeats + 1):  # the first run warms the page cache
        out = workdir / f"pack-{repeat}"
        start = time.perf_counter()
        manifest, _ = pack(ref, out, cfg, progress=False)
        seconds = time.perf_counter() - start
        images = sum(split.samples for split in manifest.splits.values()) + len(manifest.rejected)
        shutil.rmtree(out)
        if repeat == 0:
            warmup_s = seconds
        else:
            rates.append(images / seconds)
    return measured(rates, warmup_s=warmup_s, config=dataclasses.asdict(cfg),
                    note=f"{images} images (train + val) from a {'zip' if ref.is_zip else 'directory'},"
                         f" {cfg.processes} processes; every JPEG fully decoded, written and hashed")


def ratio(row: dict, rows: list[dict]) -> float | None:
    name = REFERENCE_ROW.get(row["group"])
    base = next((r for r in rows if r["group"] == row["group"] and r["name"] == name
                 and r["image_size"] == row["image_size"]), None)
    if base and base["images_per_s"] and row["images_per_s"]:
        return row["images_per_s"] / base["images_per_s"]
    return None


def format_table(rows: list[dict]) -> str:
    head = f"{'group':<7} {'name':<14} {'px':>4} {'images/s':>10} {'min':>10} {'max':>10} " \
           f"{'x ref':>6} {'setup':>7} {'warm-up':>8} {'compile':>8}  note"
    lines = [head, "-" * len(head)]
    for row in rows:
        x = ratio(row, rows)
        cells = [f"{row[key]:.1f}" if row.get(key) is not None else "-"
                 for key in ("images_per_s", "min", "max")]
        if row["images_per_s"] is None:
            cells[0] = row["status"]
        setup, warmup, compile_ = (f"{row[key]:.1f} s" if row.get(key) is not None else ""
                                   for key in ("setup_s", "warmup_s", "compile_s"))
        lines.append(
            f"{row['group']:<7} {row['name']:<14} {row['image_size'] or '':>4} {cells[0]:>10} "
            f"{cells[1]:>10} {cells[2]:>10} {f'{x:.2f}' if x else '':>6} {setup:>7} {warmup:>8} "
            f"{compile_:>8}  {row.get('note', '')}"
        )
    return "\n".join(lines)


def format_ratios(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        x = ratio(row, rows)
        if x and row["name"] != REFERENCE_ROW.get(row["group"]):
            lines.append(f"  {row['group']} {row['image_size']} px: {row['name']} is {x:.2f}x "
                         f"{REFERENCE_ROW[row['group']]}")
    head = "images/s against the reference row of each group and size"
    return head + (":\n" + "\n".join(lines) if lines else ": none (no pair of rows both measured)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a pack (fastalex pack OUT); default: synthesize and pack a "
                                  "stand-in")
    p.add_argument("--tree", help="the source tree of --data, for the reference and pack rows "
                                  "(default: unpack --data into a temporary tree)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--image-size", type=int, action="append", dest="image_sizes",
                   help="px, repeatable (default: 64 and 227; --quick: 64)")
    p.add_argument("--only", choices=GROUPS, action="append",
                   help="run only this group (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny data and runs: for the tests")
    p.add_argument("--json", type=Path, help="also write the results as one JSON object here")
    p.add_argument("--batch-size", type=int,
                   help="loader rows (default 256); also the model and e2e rows when given (default: "
                        "the fast recipe's 256 for model rows, each recipe's own for e2e rows)")
    p.add_argument("--batches", type=int, help="batches per timed loader window (default 24)")
    p.add_argument("--steps", type=int,
                   help="steps per timed model/e2e window (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed batches/steps before the first window "
                                              "(default 3 on CUDA, 2 on CPU)")
    p.add_argument("--repeats", type=int,
                   help="timed windows per row, >= 3 (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--record-to", type=Path, default=RESULTS,
                   help="JSON-lines file the rows are appended to "
                        f"(default {RESULTS.relative_to(HERE.parent)})")
    p.add_argument("--no-record", action="store_true", help="do not append the rows anywhere")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda"
    if args.quick:
        defaults = QUICK
    elif cuda:  # warm-up 3 as train.WARMUP_STEPS: compile, first momentum buffers, cudnn.benchmark
        defaults = dict(batch_size=256, batches=24, steps=20, repeats=5, warmup=3)
    else:  # a step takes seconds on a CPU (~20 s at 227 px on 2 cores): fewer, still >= 3 repeats
        defaults = dict(batch_size=256, batches=24, steps=2, repeats=3, warmup=2)
    args.model_batch_size = args.batch_size or (
        QUICK["batch_size"] if args.quick else RECIPES["fast"].batch_size)
    args.e2e_batch_size = args.batch_size or (QUICK["batch_size"] if args.quick else None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 3:
        p.error("--repeats must be >= 3 (a median needs several repeats)")
    if min(args.batch_size, args.steps, args.warmup + 1) < 1 or args.batches < 0:
        p.error("--batch-size, --steps and --batches must be >= 1, --warmup >= 0")
    args.image_sizes = args.image_sizes or ([64] if args.quick else [64, 227])
    args.only = args.only or list(GROUPS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    machine = machine_info(device)
    run_id = machine["date_utc"].replace("-", "").replace(":", "") + f"-{os.getpid()}"
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "no_record", "record_to")}
    rows: list[dict] = []
    output = {"run_id": run_id, "machine": machine, "settings": settings, "rows": rows,
              "complete": False}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".part")
            tmp.write_text(json.dumps(output, indent=1) + "\n")
            os.replace(tmp, args.json)

    from fastalex.loaders import BACKENDS

    with tempfile.TemporaryDirectory(prefix="fastalex-bench-") as tmp:
        workdir = Path(tmp)
        data = Data()
        if {"loader", "e2e", "pack"} & set(args.only):
            try:
                data = prepare_data(args, workdir)
            except (UserError, ImportError, OSError) as e:
                data = Data(problem=f"no data: {e}")
        settings["source"] = data.description
        for size in args.image_sizes:
            if "loader" in args.only:
                for name in ("reference", *BACKENDS):
                    run_row(rows, save, "loader", name, size, device,
                            lambda: bench_loader(args, data, name, size, device))
            if "model" in args.only:
                for name in MODEL_ROWS:
                    run_row(rows, save, "model", name, size, device,
                            lambda: bench_model(args, name, size, device))
            if "e2e" in args.only:
                for name in ("reference", "fastalex"):
                    run_row(rows, save, "e2e", name, size, device,
                            lambda: bench_e2e(args, data, name, size, device))
        if "pack" in args.only:
            run_row(rows, save, "pack", "pack", None, device,
                    lambda: bench_pack(args, data, workdir, device))
    output["complete"] = True
    save()
    print(f"data: {settings['source']}")
    sha = (machine["git_sha"] or "uncommitted")[:7] + (" (dirty)" if machine["git_dirty"] else "")
    print(f"machine: {machine['gpu'] or 'no GPU'}; {machine['cpu']} x{machine['cores']}; torch "
          f"{machine['torch']}, CUDA {machine['cuda']}, DALI {machine['dali']}; git {sha}")
    print(format_table(rows))
    print(format_ratios(rows))
    if not args.no_record:
        args.record_to.parent.mkdir(parents=True, exist_ok=True)
        with open(args.record_to, "a") as f:
            for row in rows:
                f.write(json.dumps({"run_id": run_id, "unit": "images/s", "machine": machine,
                                    "settings": settings, **row}) + "\n")
        print(f"appended {len(rows)} rows to {args.record_to}")
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
