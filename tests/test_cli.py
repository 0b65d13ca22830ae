"""The command line: synth -> pack -> verify through click, clean one-line errors with exit 2."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

from click.testing import CliRunner

from fastalex.cli import main
from fastalex.config import PackConfig


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_synth_pack_verify_round_trip(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "shards"
    result = run("synth", tree, "--classes", 3, "--train-per-class", 8, "--val-per-class", 2,
                 "--test-images", 2)
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


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "fastalex", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pack" in result.stdout


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
    bad = CliRunner().invoke(main, ["pack", "--download", "--url", url, "--md5", "0" * 32,
                                    "--cache-dir", str(tmp_path / "c2"), str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "md5" in bad.output
