"""gpu_check.sh's two Python steps: the training smoke test and the verdict on its pytest step.

    python benchmarks/gpu_smoke.py smoke --data PACK [--device cpu]
    python benchmarks/gpu_smoke.py verdict JUNIT_XML [--rehearsal]

smoke: 3 training steps (compile off) per AMP mode (fp16, and bf16 where native; "off" on the CPU)
and loader, one line each. A loader whose library does not import (`dali` on a machine without
DALI) is SKIPPED with build_loader's one-line error; any other error FAILED, with its traceback.
verdict: fails when pytest ran nothing: no test, a failure or error, a skip for lack of simplejpeg
(the carried wheel did not reach pytest), or no test passed on CUDA (--rehearsal: CUDA is faked
absent, so skips for it are expected). Exit status 1 on a failure. Imports fastalex and the
standard library; gpu_check.sh's header says how the two are used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

LOADERS = ("cpu", "dali", "resident")
STEPS = 3
BATCH_SIZE = 32
PACK_MISSING = "simplejpeg"  # tests/conftest.py's skip reason when a pack cannot be made


def smoke(data: Path, device_name: str) -> int:
    import torch

    from fastalex.config import TrainConfig
    from fastalex.loaders import BackendMissing
    from fastalex.runtime import cuda_has_native_bf16
    from fastalex.train import train

    device = torch.device(device_name)
    if device.type == "cuda":
        amps = ["fp16"] + (["bf16"] if cuda_has_native_bf16(device) else [])
    else:
        amps = ["off"]
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    failed = 0
    for amp in amps:
        for loader in LOADERS:
            cfg = TrainConfig(
                shards=str(data),
                out=str(work / f"run-{amp}-{loader}"),
                device=device_name,
                amp=amp,
                loader=loader,
                compile=False,
                batch_size=BATCH_SIZE,
                max_steps=STEPS,
                epochs=1,
            )
            label = f"smoke {amp:<4} {loader:<8}"
            try:
                result = train(cfg, progress=False)
            except BackendMissing as e:  # a UserError: the user's one line, a skip here
                print(f"{label} SKIPPED: {e}", flush=True)
                continue
            except Exception as e:  # report every path, then the traceback
                failed += 1
                print(f"{label} FAILED: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                continue
            if result.status != "done":  # stopped by a signal (the step's timeout)
                failed += 1
                print(f"{label} FAILED: {result.status}: {result.message}", flush=True)
                continue
            row = result.summary
            print(
                f"{label} ok: loader {row['loader']}, {row['steps']} steps, "
                f"val top-1 {row['top1']:.1f} %",
                flush=True,
            )
    return 1 if failed else 0


def pytest_verdict(junit: Path, rehearsal: bool) -> tuple[bool, str]:
    """(passed?, one line) for pytest's --junitxml report `junit`."""
    passed, failed, skips = [], [], {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skipped := case.find("skipped")) is not None:
            skips[name] = skipped.get("message", "")
        else:
            passed.append(name)
    reasons = "; ".join(f"{n} x {why}" for why, n in Counter(skips.values()).most_common())
    counts = f"{len(passed)} passed, {len(failed)} failed, {len(skips)} skipped"
    counts += f" ({reasons})" if reasons else ""
    no_pack = [name for name, why in skips.items() if PACK_MISSING in why]
    if not (passed or failed or skips):
        return False, "nothing ran: no test was collected"
    if failed:
        return False, f"{counts}; failed: {', '.join(failed)}"
    if no_pack:
        return False, f"{counts}; {len(no_pack)} skipped for lack of a pack (simplejpeg)"
    if not passed and not rehearsal:
        return False, f"nothing ran: {counts}"
    return True, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("smoke", help="3 training steps per AMP mode and loader")
    run.add_argument("--data", type=Path, required=True, help="a pack (fastalex pack OUT)")
    run.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    judge = commands.add_parser("verdict", help="judge pytest's --junitxml report")
    judge.add_argument("junit", type=Path)
    judge.add_argument(
        "--rehearsal", action="store_true", help="CUDA faked absent: skips for it are expected"
    )
    args = p.parse_args(argv)
    if args.command == "smoke":
        return smoke(args.data, args.device)
    ok, line = pytest_verdict(args.junit, args.rehearsal)
    print(f"pytest-gpu: {'ok' if ok else 'FAILED'}: {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
