"""Every `auto` settled by auto.decide with injected measurements (no real timing is asserted):
AMP, compile and loader, by rule and by probe, the cache, and rank 0 deciding for every rank."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fastalex.auto import decide
from fastalex.config import TrainConfig
from fastalex.probes import ProbeCache, Probes, probe_cache_file, probe_steps, step_key
from fastalex.runtime import Placement, Runtime, resolve_runtime


@pytest.fixture(autouse=True)
def bf16_native_cpu(native_bf16):
    """These tests probe bf16 as a CPU with native bf16 does, on any machine."""
    native_bf16(True)


def fake_manifest(train=10_000, val=1_000, image_px=(64, 64)):
    """What `decide` reads of a manifest: counts, classes, image sizes, the first shard's hash."""
    split = lambda n: types.SimpleNamespace(  # noqa: E731
        samples=n, image_px=image_px, shards=[types.SimpleNamespace(sha256="ab" * 32)]
    )
    return types.SimpleNamespace(splits={"train": split(train), "val": split(val)}, num_classes=10)


def step_rates(rates: dict, calls: list | None = None):
    """A measure_steps stand-in: images/s per (amp, compiled) variant, compile cost 30 s."""

    def measure(cfg, runtime, variants, num_classes):
        if calls is not None:
            calls.append(list(variants))
        return [
            {"images_per_s": rates[v], **({"compile_s": 30.0} if v[1] else {})} for v in variants
        ]

    return measure


def never(*args):
    raise AssertionError("probed although the option was explicit or the cache held it")


CPU = resolve_runtime(TrainConfig(device="cpu"))
FIXED = dict(device="cpu", batch_size=32, epochs=1, compile=False, loader="cpu")


def probes(tmp_path=None, **kwargs) -> Probes:
    cache = ProbeCache(None if tmp_path is None else tmp_path / "probes.json")
    return Probes(cache, **kwargs)


@pytest.mark.parametrize(
    "fp32, bf16, chose",
    [(100.0, 150.0, "bf16"), (150.0, 100.0, "off"), (100.0, 109.0, "off"), (100.0, 111.0, "bf16")],
)
def test_cpu_amp_probe_keeps_the_faster_mode_and_fp32_inside_the_margin(fp32, bf16, chose):
    rates = {("off", False): fp32, ("bf16", False): bf16}
    cfg, runtime, decisions = decide(
        TrainConfig(**FIXED), CPU, fake_manifest(), probes=probes(steps=step_rates(rates))
    )
    assert decisions["amp"]["chose"] == chose == cfg.amp == runtime.amp
    assert decisions["amp"]["by"] == "probe"
    assert (decisions["amp"]["fp32_img_s"], decisions["amp"]["bf16_img_s"]) == (fp32, bf16)


def test_explicit_options_never_probe():
    for amp in ("off", "bf16", "fp16"):
        cfg = TrainConfig(device="cpu", amp=amp, compile=True, loader="cpu")
        cfg, runtime, decisions = decide(
            cfg, CPU, fake_manifest(), probes=probes(steps=never, loaders=never, free_bytes=never)
        )
        assert {d["by"] for d in decisions.values()} == {"explicit"}
        assert (runtime.amp, runtime.compile, cfg.loader) == (amp, True, "cpu")


def test_probe_figures_are_cached_reused_and_ignored_with_no_probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert probe_cache_file() == tmp_path / "xdg" / "fastalex" / "probes.json"
    calls = []
    measure = step_rates({("off", False): 100.0, ("bf16", False): 150.0}, calls)
    cfg = TrainConfig(**FIXED)

    def run(cfg):
        found = Probes.for_config(cfg)  # the user's cache file, as a run opens it
        found.steps = measure
        return decide(cfg, CPU, fake_manifest(), probes=found)[2]["amp"]

    assert run(cfg)["by"] == "probe" and len(calls) == 1
    assert probe_cache_file().exists()
    second = run(cfg)
    assert second["by"] == "cache" and second["chose"] == "bf16" and len(calls) == 1
    assert run(TrainConfig(**FIXED, probe_cache=False))["by"] == "probe" and len(calls) == 2
    other_size = run(TrainConfig(**{**FIXED, "batch_size": 64}))  # another key: measured
    assert other_size["by"] == "probe" and len(calls) == 3


def test_figures_cached_before_the_uint8_probes_are_measured_again(tmp_path, monkeypatch):
    """Version-1 figures timed float inputs without the model's normalisation: not reused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = TrainConfig(**FIXED)
    keys = [step_key(cfg, CPU, amp, False) for amp in ("off", "bf16")]
    old = {"version": 1, "entries": {key: {"images_per_s": 100.0} for key in keys}}
    probe_cache_file().parent.mkdir(parents=True)
    probe_cache_file().write_text(json.dumps(old))
    calls = []
    found = Probes.for_config(cfg)
    found.steps = step_rates({("off", False): 100.0, ("bf16", False): 150.0}, calls)
    assert decide(cfg, CPU, fake_manifest(), probes=found)[2]["amp"]["by"] == "probe"
    assert len(calls) == 1


def test_a_cpu_without_native_bf16_keeps_fp32_by_rule_and_never_probes_bf16(native_bf16):
    native_bf16(False)
    calls = []
    measure = step_rates({("off", False): 100.0, ("off", True): 200.0}, calls)
    cfg = TrainConfig(**{**FIXED, "epochs": 50})  # a long run: everything else would be probed
    _, runtime, decisions = decide(cfg, CPU, fake_manifest(), probes=probes(steps=measure))
    assert runtime.amp == "off" and decisions["amp"]["by"] == "rule"
    assert "no native bf16" in decisions["amp"]["reason"]
    assert all(amp != "bf16" for call in calls for amp, _ in call)


def test_compile_auto_decides_a_short_run_whose_eager_figure_alone_is_cached():
    """The reference recipe at --max-steps 8 on a slow CPU: the eager figure is cached, the
    compile probe would be longer than the run. Decided eager, never a crash."""
    cfg = TrainConfig(**{**FIXED, "compile": None, "amp": "off", "batch_size": 256, "max_steps": 8})
    cached = probes(steps=never)
    cached.cache.put(step_key(cfg, CPU, "off", False), {"images_per_s": 4.0})  # ~512 s eager
    _, runtime, decisions = decide(cfg, CPU, fake_manifest(), probes=cached)
    assert not runtime.compile and decisions["compile"]["by"] == "rule"
    assert "no longer than the compile probe" in decisions["compile"]["reason"]


def test_a_run_no_longer_than_the_probe_is_not_probed():
    cfg = TrainConfig(**{**FIXED, "max_steps": 2})
    _, runtime, decisions = decide(cfg, CPU, fake_manifest(), probes=probes(steps=never))
    assert runtime.amp == "off" and decisions["amp"]["by"] == "rule"


def test_cpu_compile_only_where_the_measured_gain_over_the_run_outweighs_the_compile():
    cfg = TrainConfig(**{**FIXED, "compile": None, "amp": "off"})
    rates = {("off", False): 100.0, ("off", True): 200.0}  # 30 s compile
    # 10,000 images: eager 100 s, compiled 50 s + 30 s: compiles
    _, runtime, decisions = decide(
        cfg, CPU, fake_manifest(), probes=probes(steps=step_rates(rates))
    )
    assert runtime.compile and decisions["compile"]["chose"] is True
    assert decisions["compile"]["compile_s"] == 30.0
    # 5,000 images: eager 50 s, compiled 25 s + 30 s: stays eager
    _, runtime, decisions = decide(
        cfg, CPU, fake_manifest(train=5_000), probes=probes(steps=step_rates(rates))
    )
    assert not runtime.compile and decisions["compile"]["by"] == "probe"


def test_cpu_compile_is_not_probed_where_no_gain_could_repay_a_cold_compile(tmp_path):
    cfg = TrainConfig(**{**FIXED, "compile": None, "amp": "off"})
    rates = {("off", False): 100.0, ("off", True): 200.0}
    # 4,000 images: eager 40 s; even a 1.53x gain saves 14 s, under the cheapest cold compile
    calls = []
    cached = probes(tmp_path, steps=step_rates(rates, calls))
    _, runtime, decisions = decide(cfg, CPU, fake_manifest(train=4_000), probes=cached)
    assert not runtime.compile and decisions["compile"]["by"] == "rule"
    assert ("off", True) not in [v for call in calls for v in call]  # never compiled to measure
    # Once the machine's compile figures are cached, they decide at no cost.
    decide(cfg, CPU, fake_manifest(train=100_000), probes=cached)
    assert ("off", True) in calls[-1]
    calls.clear()
    _, runtime, decisions = decide(cfg, CPU, fake_manifest(train=4_000), probes=cached)
    assert calls == [] and decisions["compile"]["by"] == "cache"
    assert not runtime.compile  # compiled 20 s + 30 s against 40 s eager


def test_resident_is_chosen_when_the_splits_fit_and_only_then(monkeypatch):
    monkeypatch.setattr("fastalex.auto.dali_usable", lambda device: True)
    cfg = TrainConfig(device="cpu", amp="off", compile=False)
    big = fake_manifest(train=2_000_000, val=10_000)
    need = (2_000_000 + 10_000) * 64 * 64 * 3  # train + val as 64 x 64 x 3 canvases: ~23 GiB
    speeds = {"dali": 300.0, "cpu": 200.0}
    loaders = lambda cfg, runtime, backends: [speeds[b] for b in backends]  # noqa: E731
    found = decide(cfg, CPU, big, probes=probes(loaders=never, free_bytes=lambda d: 2 * need))
    assert found[0].loader == "resident" and found[2]["loader"]["by"] == "rule"  # half fits
    assert found[2]["loader"]["resident_need_gib"] == pytest.approx(need / 2**30)
    for free in (2 * need - 4096, need + (2 << 30)):  # half the free RAM falls just short / far
        found = decide(cfg, CPU, big, probes=probes(loaders=loaders, free_bytes=lambda d: free))
        assert found[0].loader == "dali" and found[2]["loader"]["by"] == "probe"
    capped = TrainConfig(device="cpu", amp="off", compile=False, resident_max_gb=need / 2**31)
    found = decide(capped, CPU, big, probes=probes(loaders=loaders, free_bytes=lambda d: 4 * need))
    assert found[0].loader == "dali"  # --resident-max-gb caps the budget


@pytest.mark.parametrize("dali, cpu, chose", [(100.0, 200.0, "cpu"), (300.0, 200.0, "dali")])
def test_on_a_cpu_the_loader_auto_picks_is_the_faster_measured(monkeypatch, dali, cpu, chose):
    monkeypatch.setattr("fastalex.auto.dali_usable", lambda device: True)
    speeds = {"dali": dali, "cpu": cpu}
    cfg = TrainConfig(device="cpu", amp="off", compile=False)
    cfg, _, decisions = decide(
        cfg,
        CPU,
        fake_manifest(),
        probes=probes(
            loaders=lambda cfg, runtime, backends: [speeds[b] for b in backends],
            free_bytes=lambda device: 0,
        ),
    )
    assert cfg.loader == chose
    assert (decisions["loader"]["dali_img_s"], decisions["loader"]["cpu_img_s"]) == (dali, cpu)


def decide_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo processes: each would measure the opposite AMP answer."""
    import torch.distributed as dist

    import fastalex.runtime

    fastalex.runtime.cpu_has_native_bf16 = lambda: True  # this spawned process only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rates = {("off", False): 100.0, ("bf16", False): 200.0}  # rank 0: bf16 twice as fast
        if rank == 1:
            rates = {("off", False): 200.0, ("bf16", False): 100.0}
        runtime = Runtime(Placement(torch.device("cpu"), rank, 2, 2), None, False, False)
        lines = []
        _, runtime, decisions = decide(
            TrainConfig(**FIXED),
            runtime,
            fake_manifest(),
            log=lines.append,
            probes=probes(steps=step_rates(rates), log=lines.append),
        )
        result = {"amp": runtime.amp, "decisions": decisions, "lines": lines}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # trains or starts processes
def test_two_gloo_ranks_with_different_timings_follow_rank_0(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(decide_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["amp"] == ranks[1]["amp"] == "bf16"
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert ranks[0]["lines"] and not ranks[1]["lines"]  # rank 1 neither measured nor logged


@pytest.mark.slow  # trains or starts processes
def test_a_runs_summary_names_each_decision_and_its_figures(hue_pack, tmp_path, monkeypatch):
    from fastalex.train import train

    rates = {("off", False): 30.0, ("bf16", False): 25.0, ("off", True): 80.0}
    monkeypatch.setattr("fastalex.auto.measure_steps", step_rates(rates))
    lines = []
    cfg = TrainConfig(
        shards=str(hue_pack),
        out=str(tmp_path / "run"),
        device="cpu",
        batch_size=16,
        max_steps=probe_steps(2) + 1,  # one more than the AMP probe: ~9 s eager at 30 img/s
        image_size=32,
        loader_workers=1,
    )  # amp, compile and loader left to `auto`
    result = train(cfg, log=lines.append, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    decisions = summary["decisions"]
    assert decisions["amp"]["chose"] == "off" == summary["amp"]
    assert (decisions["amp"]["fp32_img_s"], decisions["amp"]["bf16_img_s"]) == (30.0, 25.0)
    assert decisions["compile"]["chose"] is False is summary["compile"]  # 17 steps: not probed
    assert decisions["compile"]["by"] == "rule" and decisions["compile"]["eager_run_s"] < 10
    assert decisions["loader"]["chose"] == "resident" == summary["loader"]
    assert decisions["loader"]["resident_need_gib"] > 0
    assert all(d["reason"] and d["by"] for d in decisions.values())
    assert {"cpu", "cores", "amx_bf16", "avx512_bf16"} <= summary["machine"].keys()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["decisions"] == decisions and config["amp"] == "off"
    assert [line.split(":")[0] for line in lines if line.startswith("auto ")].count("auto amp") == 1
    assert result.status == "done"
