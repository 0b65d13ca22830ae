"""3 steps per (AMP mode, loader) on CUDA, one line each; a synthetic pack made here."""

import sys
import tempfile
import traceback
from pathlib import Path

import torch

work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
try:
    from fastalex.config import PackConfig, TrainConfig
    from fastalex.pack import pack
    from fastalex.runtime import cuda_has_native_bf16
    from fastalex.tinyimagenet import open_source, synth
    from fastalex.train import train

    synth(work / "tree", classes=4, train_per_class=64, val_per_class=16, workers=4, progress=False)
    pack(open_source(work / "tree"), work / "pack", PackConfig(shard_size=128), progress=False)
except Exception as e:  # no simplejpeg...: say so and stop
    print(f"smoke: cannot make a pack here ({type(e).__name__}: {e})")
    sys.exit(1)
amps = ["fp16"] + (["bf16"] if cuda_has_native_bf16(torch.device("cuda", 0)) else [])
failed = 0
for amp in amps:
    for loader in ("cpu", "dali", "resident"):
        cfg = TrainConfig(
            shards=str(work / "pack"),
            out=str(work / f"run-{amp}-{loader}"),
            device="cuda",
            amp=amp,
            loader=loader,
            compile=False,
            batch_size=32,
            max_steps=3,
            epochs=1,
        )
        try:
            row = train(cfg, progress=False).summary
            print(
                f"smoke {amp:<4} {loader:<8} ok: loader {row['loader']}, {row['steps']} steps, "
                f"val top-1 {row['top1']:.1f} %",
                flush=True,
            )
        except Exception as e:  # report every path, then the traceback
            failed += 1
            print(f"smoke {amp:<4} {loader:<8} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
sys.exit(1 if failed else 0)
