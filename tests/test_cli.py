"""The command line: synth -> pack -> verify through click, clean one-line errors with exit 2."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
import zipfile

import click
import pytest
from click.testing import CliRunner

from fastalex.cli import main
from fastalex.config import PackConfig, TrainConfig


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_synth_pack_verify_round_trip(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "shards"
    result = run(
        "synth",
        tree,
        "--classes",
        3,
        "--train-per-class",
        8,
        "--val-per-class",
        2,
        "--test-images",
        2,
    )
    assert result.exit_code == 0 and "SYNTHETIC" in result.output
    result = run("pack", tree, out, "--shard-size", 10)
    assert result.exit_code == 0, result.output
    assert "train: 24 images in 3 shards" in result.output
    assert "skipped test: 2 unlabelled images" in result.output
    result = run("verify", out)
    assert result.exit_code == 0 and "OK" in result.output
    (out / "train-000001.tar").unlink()
    result = run("verify", out)
    assert result.exit_code == 1 and "train-000001.tar: missing" in result.output


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    for args in (
        ("pack", tmp_path / "missing", tmp_path / "out"),
        ("pack", tmp_path / "only-one"),
        ("pack", tmp_path, tmp_path / "out", "--shard-size", 0),
        ("verify", tmp_path),
    ):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert "Traceback" not in result.output


def test_pack_options_match_pack_config_fields():
    import dataclasses

    options = {p.name for p in main.commands["pack"].params}
    assert {f.name for f in dataclasses.fields(PackConfig)} <= options


@pytest.mark.parametrize("command, cls", [("pack", PackConfig), ("train", TrainConfig)])
def test_every_config_option_shows_its_fields_help(command, cls):
    import dataclasses

    options = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    for f in dataclasses.fields(cls):
        if f.name in options:
            assert f.metadata["help"] and options[f.name].help == f.metadata["help"], f.name


@pytest.mark.slow  # trains or starts processes
def test_python_dash_m_runs_the_cli(launch):
    cli = launch([sys.executable, "-m", "fastalex", "--help"])
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0 and "pack" in stdout, stdout + stderr


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (killed, waiting for a parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow  # trains or starts processes
def test_a_launch_past_its_timeout_is_killed_with_its_children_and_fails_saying_so(
    launch, tmp_path
):
    """What every process-starting test relies on (conftest's `launch`): a hung command dies with
    the processes it started, and the test fails with what they printed."""
    pid_file = tmp_path / "child.pid"
    # The child holds no pipe (nothing waits on it) and, as torchrun's ranks do, runs in a session
    # of its own, outside the launched command's process group.
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); "
        "print('started', flush=True); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    hung = launch([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and hung.process.poll() is None, (
            "the script never started"
        )
        time.sleep(0.05)
    child = int(pid_file.read_text())
    with pytest.raises(
        pytest.fail.Exception,
        match=r"ran past 0.5 s; killed its process group"
        r"(.|\n)*--- stdout\nstarted",
    ):
        hung.communicate(timeout=0.5)
    assert hung.returncode is not None
    deadline = time.monotonic() + 10
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child), "the launched command's own child outlived the timeout"


def test_pack_download_fetches_checks_and_packs(synth_tree, server, tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(synth_tree.rglob("*")):
            z.write(path, "tiny-imagenet-200/" + path.relative_to(synth_tree).as_posix())
    server.RequestHandlerClass.payload = archive.read_bytes()
    url = f"http://127.0.0.1:{server.server_port}/tiny-imagenet-200.zip"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    cache, out = tmp_path / "cache", tmp_path / "shards"
    result = run("pack", "--download", "--url", url, "--md5", md5, "--cache-dir", cache, out)
    assert result.exit_code == 0, result.output
    assert "train: 240 images" in result.output
    assert (cache / "tiny-imagenet-200.zip").read_bytes() == archive.read_bytes()
    bad = CliRunner().invoke(
        main,
        [
            "pack",
            "--download",
            "--url",
            url,
            "--md5",
            "0" * 32,
            "--cache-dir",
            str(tmp_path / "c2"),
            str(tmp_path / "o2"),
        ],
    )
    assert bad.exit_code == 2 and "md5" in bad.output


def test_train_options_match_train_config_fields():
    command = main.commands["train"]
    names = [p.name for p in command.params if p.name != "help"]
    record_only = {"config_file", "overrides"}  # set from --config, not options of their own
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - record_only
    # --config and --cache-dir (where a SHARDS URL is staged) say where things are, not settings
    assert sorted(names) == sorted(fields | {"config_path", "cache_dir"})
    assert len(names) == len(set(names))


def test_every_command_that_reads_a_pack_takes_a_url_and_a_cache_dir():
    """SHARDS may be a URL (staged into --cache-dir) wherever a command reads a pack."""
    reads_a_pack = [
        name for name, c in main.commands.items() if "shards" in {p.name for p in c.params}
    ]
    assert sorted(reads_a_pack) == ["doctor", "eval", "train", "verify"]
    for name in reads_a_pack:
        assert "cache_dir" in {p.name for p in main.commands[name].params}, name
