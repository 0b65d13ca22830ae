"""Shared fixtures: small synthetic Tiny-ImageNet trees and packs, a checkpoint trained on one,
written once per session; processes a test launches."""

from __future__ import annotations

import http.server
import os
import threading

import pytest
import torch
from helpers import Launched, torchrun_command, train_cli, without_timing

from fastalex.config import PackConfig
from fastalex.synth import synth


@pytest.fixture(scope="session", autouse=True)
def probe_cache_in_tmp(tmp_path_factory):
    """The `auto` probes cache their figures under $XDG_CACHE_HOME: a temporary one for every
    test (and the processes tests start), never the user's real cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def own_probe_cache(tmp_path_factory, monkeypatch):
    """Each test (and every process it starts) keeps `auto`'s probe figures in a cache of its own:
    what one test measured never decides another's run, whatever the order tests run in."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("probe-cache")))


# Fixtures that train a model while they are set up: a test using one trains.
TRAINING_FIXTURES = {"checkpoint", "edited_checkpoint", "compiled_run", "straight_ddp_rows"}
ALLOWED_COMMANDS = {"git", "nvidia-smi", "g++", "gcc", "cc", "c++"}  # look-ups, a C++ compile


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(
            f"these tests train (a trained fixture): mark them slow: {unmarked}"
        )


@pytest.fixture(autouse=True)
def slow_if_it_trains_or_spawns(request, monkeypatch):
    """A test not marked `slow` that trains (a train step) or starts a process (a command line, a
    torchrun, torch.multiprocessing.spawn) fails saying so, so `-m "not slow"` stays a quick loop.
    Loader tests' decode workers are part of the code under test and allowed."""
    if request.node.get_closest_marker("slow"):
        return
    import subprocess
    import traceback

    import torch.multiprocessing

    from fastalex.train import Trainer

    def refuse(what: str):
        raise AssertionError(f"this test {what}: mark it @pytest.mark.slow")

    class Popen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            words = args.split() if isinstance(args, str) else [str(a) for a in args]
            compiling = any(  # torch.compile's own probes and compiler, not the test's
                "torch/_inductor" in frame.filename for frame in traceback.extract_stack()
            )
            if os.path.basename(words[0]) not in ALLOWED_COMMANDS and not compiling:
                refuse(f"starts a process ({words[0]})")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setattr(Trainer, "train_epoch", lambda *a: refuse("trains (Trainer.train_epoch)"))
    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda *a, **k: refuse("spawns processes"))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible CUDA device of the given compute capability; torch's own bf16 check says yes
    whatever the capability, as it does for GPUs that only emulate bf16."""

    def install(capability: tuple[int, int], name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return install


@pytest.fixture
def native_bf16(monkeypatch):
    """Set whether this CPU computes bf16 natively, whatever the machine running the tests has:
    `native_bf16(True)` lets `auto` probe bf16 as it does on an AVX512-BF16 or AMX CPU."""

    def install(native: bool) -> None:
        monkeypatch.setattr("fastalex.runtime.cpu_has_native_bf16", lambda: native)

    return install


# Small enough that the whole suite stays fast on 2 cores, big enough for several shards per split.
TREE = dict(classes=6, train_per_class=40, val_per_class=10, test_images=5, seed=0)


def pack_tree(root, out, **fields) -> None:
    """`fastalex pack` of a tree written by a fixture. The packer's decode check needs simplejpeg:
    without it (a GPU box that lacks the wheel) the tests that need a pack skip, saying so, and
    every test module still collects."""
    pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")
    from fastalex.pack import pack
    from fastalex.sources import detect_source

    pack(detect_source(root), out, PackConfig(**fields), progress=False)


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """A 6-class synthetic tree: 240 train, 60 val, 5 test images."""
    root = tmp_path_factory.mktemp("tree") / "tiny-imagenet-200"
    synth(root, workers=2, progress=False, **TREE)
    return root


@pytest.fixture(scope="session")
def synth_pack(synth_tree, tmp_path_factory):
    """The synth tree packed with 64 samples per shard (4 train shards, 1 val shard)."""
    out = tmp_path_factory.mktemp("pack") / "shards"
    pack_tree(synth_tree, out, shard_size=64, workers=2)
    return out


# --- packs whose pixels say what each image is (loader tests) -----------------------------------


def write_tree(root, classes: int, train_per_class: int, val_per_class: int, render) -> None:
    """A Tiny-ImageNet-layout tree of RGB JPEGs: `render(image_id, label) -> (H, W, 3) uint8`.
    Train images get ids 0.., val images the ids after them; label = id % classes."""
    from fastalex.synth import encode_jpeg, synth_wnids

    wnids = synth_wnids(classes)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for image_id in range(label, classes * train_per_class, classes):
            jpeg = encode_jpeg(render(image_id, label), False, 95)
            (folder / f"{image_id}.JPEG").write_bytes(jpeg)
    first_val = classes * train_per_class
    lines = []
    for image_id in range(first_val, first_val + classes * val_per_class):
        label = image_id % classes
        (root / "val" / "images" / f"{image_id}.JPEG").write_bytes(
            encode_jpeg(render(image_id, label), False, 95)
        )
        lines.append(f"{image_id}.JPEG\t{wnids[label]}\t0\t0\t1\t1\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


CODE_LEVELS = 8  # per channel: 8**3 = 512 distinguishable solid colours
CODE_STEP = 32  # grey levels between neighbouring codes (JPEG moves a flat colour by 1-3)


def code_colour(image_id: int) -> tuple[int, int, int]:
    digits = (image_id, image_id // CODE_LEVELS, image_id // CODE_LEVELS**2)
    return tuple(CODE_STEP // 2 + CODE_STEP * (d % CODE_LEVELS) for d in digits)


@pytest.fixture(scope="session")
def coded_pack(tmp_path_factory):
    """A 7-class pack of flat-colour images whose colour encodes a unique image id (label =
    id % 7), of mixed sizes 12..24 px, so every backend's output can be traced to its source.
    280 train images (rank shares of 93/93/94 for 3 ranks), 70 val.

    Returns a namespace: ``path``; ``ids[split]``, the image ids in the split's global order (shard
    order, then index order), read back from the shards; ``classes``; and ``decode(images)``, which
    maps a (N, 3, S, S) batch of pixels (the loaders' uint8) to its (N,) image ids."""
    import types

    import numpy as np

    simplejpeg = pytest.importorskip("simplejpeg", reason="fastalex pack needs simplejpeg")

    from fastalex.shards import iter_shard, read_index, read_manifest

    classes = 7

    def render(image_id, label):
        h, w = 12 + image_id * 7 % 13, 12 + image_id * 5 % 13
        return np.broadcast_to(np.array(code_colour(image_id), np.uint8), (h, w, 3)).copy()

    root = tmp_path_factory.mktemp("coded") / "tree"
    write_tree(root, classes, train_per_class=40, val_per_class=10, render=render)
    out = tmp_path_factory.mktemp("codedpack") / "shards"
    pack_tree(root, out, shard_size=48, workers=1)

    def decode_colours(rgb):  # (N, 3) 0..255 -> (N,) ids
        digits = np.clip(np.rint((np.asarray(rgb, np.float64) - CODE_STEP // 2) / CODE_STEP), 0, 7)
        return (digits @ np.array([1, CODE_LEVELS, CODE_LEVELS**2])).astype(np.int64)

    def decode(images):
        return decode_colours(images.float().cpu().mean(dim=(2, 3)).numpy())

    manifest = read_manifest(out)
    ids = {}
    for split, info in manifest.splits.items():
        found = []
        for shard in info.shards:
            for jpeg, label in iter_shard(out / shard.name, read_index(out / shard.index_name)):
                colour = simplejpeg.decode_jpeg(jpeg).reshape(-1, 3).mean(0)
                found.append(decode_colours(colour)[()])
                assert found[-1] % classes == label, "the pack changed a label"
        ids[split] = np.array(found)
    return types.SimpleNamespace(path=out, ids=ids, classes=classes, decode=decode)


RAMP_SLOPE = 3  # grey levels per pixel: red rises along x, green along y


@pytest.fixture(scope="session")
def ramp_pack(tmp_path_factory):
    """A 2-class pack of 300 identical 64x64 images, red = 30 + 3x and green = 30 + 3y (blue flat),
    so a training crop's box and flip can be read back from its pixels. Returns a namespace:
    ``path`` and ``slope`` (grey levels per pixel)."""
    import types

    import numpy as np

    ramp = 30 + RAMP_SLOPE * np.arange(64, dtype=np.uint8)
    image = np.stack(
        [
            np.broadcast_to(ramp, (64, 64)),
            np.broadcast_to(ramp[:, None], (64, 64)),
            np.full((64, 64), 128, np.uint8),
        ],
        axis=-1,
    )
    root = tmp_path_factory.mktemp("ramp") / "tree"
    write_tree(root, 2, train_per_class=150, val_per_class=1, render=lambda i, label: image)
    out = tmp_path_factory.mktemp("ramppack") / "shards"
    pack_tree(root, out, shard_size=100, workers=1)
    return types.SimpleNamespace(path=out, slope=RAMP_SLOPE)


# --- a pack a few epochs of training learn (train tests) ----------------------------------------

HUE_LABELS = (0, 1, 2, 3)  # synth classes of one shape and texture, hues 0.0/0.2/0.4/0.6


@pytest.fixture(scope="session")
def hue_pack(tmp_path_factory):
    """A 4-class pack of synth images that differ by hue only (same striped disc): 256 train, 128
    val. Three epochs at batch 32 (24 steps) take alexnet64 from 25 % to ~80-98 % val top-1, where
    classes that differ by shape alone need ~10 epochs."""
    import numpy as np

    from fastalex.synth import render_image

    def render(image_id, label):
        return render_image(HUE_LABELS[label], np.random.default_rng([7, image_id]))[0]

    root = tmp_path_factory.mktemp("hue") / "tree"
    write_tree(root, 4, train_per_class=64, val_per_class=32, render=render)
    out = tmp_path_factory.mktemp("huepack") / "shards"
    pack_tree(root, out, shard_size=128, workers=1)
    return out


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload` at any path, honouring a `Range: bytes=N-` header; can drop mid-way."""

    payload = b""
    drop_after: int | None = None

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        body = self.payload[start:]
        if start and start >= len(self.payload):  # as real servers answer a range past the end
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.drop_after is not None and not start:
            self.wfile.write(body[: self.drop_after])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on loopback; set `server.RequestHandlerClass.payload` to what it serves."""
    handler = type("Handler", (RangeHandler,), {"payload": b"", "drop_after": None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


# --- processes a test launches (helpers.Launched) ------------------------------------------------


@pytest.fixture
def launch():
    """launch(command, **popen_kwargs) -> Launched; every group still alive at teardown is
    killed."""
    started = []

    def start(command, **kwargs):
        started.append(Launched(command, **kwargs))
        return started[-1]

    yield start
    for launched in started:
        launched.kill_group()


# --- an ImageFolder tree of every format pack reads (imagefolder tests) ---------------------------

FOLDER_LEVELS = {"zebra": 40, "Cat": 120, "dog": 200}  # class directory -> flat grey level
FOLDER_NAMES = {"zebra": "striped horse", "Cat": "house cat"}  # classes.txt; dog has no name
BIG_PX = (1000, 2000)  # (height, width) of the one large JPEG, train/dog/big.JPEG


def write_folder_images(folder, level: int) -> list[str]:
    """One file of each kind pack reads, every one a flat grey `level` at its centre, sizes 20 px
    to 80 px; returns the names written."""
    import io

    import numpy as np
    from PIL import Image

    def save(name, image, fmt, **kwargs):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        path.write_bytes(buffer.getvalue())
        return name

    folder.mkdir(parents=True, exist_ok=True)
    grey = (level,) * 3
    rgba = Image.new("RGBA", (40, 40), (*grey, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 40))  # left quarter fully transparent
    palette = Image.new("P", (36, 36), 1)
    palette.putpalette([0, 0, 0, *grey, 255 - level, 255 - level, 255 - level] + [0] * 759)
    palette.paste(0, (0, 0, 6, 6))  # index 0 = transparent
    second = Image.new("P", (36, 36), 2)
    second.putpalette(palette.getpalette())
    deep = Image.fromarray(np.full((32, 32), level * 257, np.uint16))  # 16-bit grey
    return [
        save("rgb.png", Image.new("RGB", (30, 20), grey), "PNG"),
        save("alpha.PNG", rgba, "PNG"),
        save("photo.webp", Image.new("RGB", (64, 48), grey), "WEBP", quality=95),
        save("scan.bmp", Image.new("RGB", (50, 50), grey), "BMP"),
        save("gray.jpg", Image.new("L", (20, 20), level), "JPEG", quality=95),
        save("print.tiff", Image.new("CMYK", (60, 40), (0, 0, 0, 255 - level)), "TIFF"),
        save("anim.gif", palette, "GIF", transparency=0, save_all=True, append_images=[second]),
        save("deep.png", deep, "PNG"),
        save("sub/nested.jpeg", Image.new("RGB", (80, 60), grey), "JPEG", quality=95),
        save("cmyk.jpg", Image.new("CMYK", (30, 30), (0, 0, 0, 255 - level)), "JPEG", quality=95),
    ]


@pytest.fixture(scope="session")
def folder_tree(tmp_path_factory):
    """An ImageFolder tree: train/<class>/ with one file of each format per class (10), plus, in
    train/dog/, a 2000 x 1000 JPEG, a truncated PNG and a notes.txt; val/<class>/ with 2 images
    each; classes.txt naming two classes. Returns a namespace: ``path`` (the tree's root,
    "photos"), ``levels`` ({class: grey level}), ``names`` (classes.txt), ``big_px``."""
    import io
    import types

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("folder") / "photos"
    for name, level in FOLDER_LEVELS.items():
        write_folder_images(root / "train" / name, level)
        val = root / "val" / name
        val.mkdir(parents=True)
        Image.new("RGB", (24, 24), (level,) * 3).save(val / "a.jpg", quality=95)
        Image.new("L", (28, 20), level).save(val / "b.png")
    dog = root / "train" / "dog"
    rows = np.linspace(0, 1, BIG_PX[0])[:, None] * np.linspace(0, 1, BIG_PX[1])[None, :]
    big = np.full((*BIG_PX, 3), FOLDER_LEVELS["dog"], np.uint8)
    big[:, :, 0] = np.clip(FOLDER_LEVELS["dog"] - 20 + 40 * rows, 0, 255)  # some detail to resample
    Image.fromarray(big).save(dog / "big.JPEG", quality=90)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buffer, "PNG")
    (dog / "broken.png").write_bytes(buffer.getvalue()[:60])  # truncated inside the pixel data
    (dog / "notes.txt").write_text("not an image\n")
    (root / "classes.txt").write_text("".join(f"{k}\t{v}\n" for k, v in FOLDER_NAMES.items()))
    return types.SimpleNamespace(path=root, levels=FOLDER_LEVELS, names=FOLDER_NAMES, big_px=BIG_PX)


@pytest.fixture(scope="session")
def mixed_pack(folder_tree, tmp_path_factory):
    """folder_tree packed with --max-side 0: its 2000 x 1000 photo stored as it is, beside images
    of 20-40 px (loader memory tests)."""
    out = tmp_path_factory.mktemp("mixedpack") / "shards"
    pack_tree(folder_tree.path, out, shard_size=16, workers=1, max_side=0)
    return out


@pytest.fixture
def bomb_jpeg():
    """bomb_jpeg(height=60000, width=60000) -> bytes: a valid 16 x 16 JPEG whose SOF0 header is
    patched to claim height x width pixels (a decompression bomb in 600-odd bytes)."""
    import io

    from PIL import Image

    def make(height: int = 60000, width: int = 60000) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 90, 90)).save(buffer, "JPEG")
        data = bytearray(buffer.getvalue())
        sof = data.index(b"\xff\xc0")  # FFC0, length (2), precision (1), height (2), width (2)
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
        return bytes(data)

    return make


# --- a trained checkpoint and its val images (predict, eval and export tests) ---------------------


@pytest.fixture(scope="session")
def checkpoint(hue_pack, tmp_path_factory):
    """RUN/checkpoints/last.pt of one epoch (8 steps) of alexnet64 on the hue pack, flip TTA on
    (the fast recipe), float32 (--amp off: no probe, the same weights on every machine)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_cli(hue_pack, out, "--epochs", 1)
    return out / "checkpoints" / "last.pt"


@pytest.fixture
def edited_checkpoint(checkpoint, tmp_path):
    """edited_checkpoint(config={...}, normalisation={...}) -> the path of a copy of `checkpoint`
    whose config record has those keys replaced and whose card carries that normalisation."""
    import torch

    def make(config: dict | None = None, normalisation: dict | None = None):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state["config"] = {**state["config"], **(config or {})}
        state["normalisation"] = normalisation or state["normalisation"]
        path = tmp_path / f"edited-{len(list(tmp_path.glob('edited-*.pt')))}.pt"
        torch.save(state, path)
        return path

    return make


@pytest.fixture(scope="session")
def val_files(hue_pack, tmp_path_factory):
    """The hue pack's val images as JPEG files (the stored bytes), in the val loader's order;
    returns (paths, labels)."""
    import numpy as np

    from fastalex.shards import iter_shard, read_index, read_manifest

    folder = tmp_path_factory.mktemp("valfiles")
    paths, labels = [], []
    for shard in read_manifest(hue_pack).splits["val"].shards:
        index = read_index(hue_pack / shard.index_name)
        for jpeg, label in iter_shard(hue_pack / shard.name, index):
            paths.append(folder / f"{len(paths):04d}.jpg")
            paths[-1].write_bytes(jpeg)
            labels.append(label)
    return paths, np.array(labels)


# A Python in which `import fastalex` fails (what an exported program must run without): the
# package alone is hidden, sys.path is left whole (a virtualenv inside a checkout that `git clone`
# named fastalex/ puts .../fastalex/.venv/.../site-packages there, numpy and torch with it).
HIDE_FASTALEX = "import sys; sys.modules['fastalex'] = None; "


@pytest.fixture
def without_fastalex(launch):
    """run(code, *args, cwd, python=sys.executable) -> the stdout of `code` run by a fresh
    `python -c` in which `import fastalex` raises ImportError; fails the test on a non-zero exit."""
    import sys

    def run(code: str, *args, cwd, python=sys.executable) -> str:
        process = launch([python, "-c", HIDE_FASTALEX + code, *args], cwd=cwd)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout + stderr
        return stdout

    return run


@pytest.fixture(scope="session")
def straight_ddp_rows(hue_pack, tmp_path_factory):
    """metrics.jsonl rows, timings dropped, of an uninterrupted 2-process, 2-epoch run on the cpu
    loader (one launcher, one thread a process as every torchrun of the tests): what each
    restart test (test_ddp, test_distributed) must end with. Run once for the session."""
    from fastalex.plot import read_metrics

    out = tmp_path_factory.mktemp("straight") / "run"
    command = torchrun_command(hue_pack, out, "--epochs", "2")
    with Launched(command, env={**os.environ, "OMP_NUM_THREADS": "1"}) as job:
        stdout, stderr = job.communicate(240)
    assert job.returncode == 0, stdout + stderr
    return without_timing(read_metrics(out))
