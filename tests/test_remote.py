"""Packs read from object storage through fsspec, against real servers on loopback only: moto's S3
server and an HTTP server. Staged once per node, verified by sha256, reused; a killed staging never
looks finished; a tampered shard is refused by name."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time

import pytest
from click.testing import CliRunner

pytest.importorskip("fsspec")

from fastalex.cli import main
from fastalex.errors import UserError
from fastalex.pack import verify_pack
from fastalex.remote import STAGED, cache_name, local_pack
from fastalex.shards import MANIFEST, read_manifest

TRAIN = ["--device", "cpu", "--amp", "off", "--no-compile", "--loader", "cpu", "--epochs", "1"]
TRAIN += ["--batch-size", "32"]


class PackHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` (name -> bytes) below /pack/; counts GETs; `stall` (a name) sends half of
    that file and then hangs, as a connection that dies mid-download."""

    files: dict[str, bytes] = {}
    gets: dict[str, int] = {}
    stall: str | None = None
    stalled: threading.Event

    def do_GET(self):
        name = self.path.removeprefix("/pack/")
        body = self.files.get(name)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.gets[name] = self.gets.get(name, 0) + 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name == self.stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.stalled.set()
            time.sleep(60)
            return
        self.wfile.write(body)

    def do_HEAD(self):
        body = self.files.get(self.path.removeprefix("/pack/"))
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_pack(synth_pack):
    """(URL of the synth pack on a loopback HTTP server, its handler class)."""
    files = {p.name: p.read_bytes() for p in synth_pack.iterdir() if p.is_file()}
    fields = {"files": files, "gets": {}, "stall": None, "stalled": threading.Event()}
    handler = type("Handler", (PackHandler,), fields)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/pack", handler
    httpd.shutdown()


@pytest.fixture
def s3_pack(synth_pack, monkeypatch):
    """s3://fastalex/pack: the synth pack in moto's S3 server on loopback, and fsspec pointed at
    it (credentials set, so botocore never asks an instance metadata address)."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import boto3
    import fsspec.config

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="fastalex")
    for path in synth_pack.iterdir():
        client.put_object(Bucket="fastalex", Key=f"pack/{path.name}", Body=path.read_bytes())
    yield "s3://fastalex/pack"
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("remote", ["s3_pack", "http_pack"])
def test_train_one_epoch_from_a_remote_pack_then_verify_reuses_the_cache(
    remote, request, tmp_path, synth_pack
):
    url = request.getfixturevalue(remote)
    url = url[0] if isinstance(url, tuple) else url
    cache = tmp_path / "cache"
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", url, "--out", str(run), "--cache-dir", str(cache), *TRAIN]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in epochs if "epoch" in row][-1:] == [1]
    assert (run / "summary.json").is_file()
    local = cache / cache_name(url)
    assert (local / MANIFEST).read_bytes() == (synth_pack / MANIFEST).read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in local.glob("*.tar")}
    assert len(stamps) == 5
    result = runner.invoke(main, ["verify", url, "--cache-dir", str(cache)])
    assert result.exit_code == 0 and ": OK" in result.output, result.output
    assert {p.name: p.stat().st_mtime_ns for p in local.glob("*.tar")} == stamps  # reused


def test_a_staged_pack_is_reused_and_only_a_changed_shard_fetched_again(http_pack, tmp_path):
    url, handler = http_pack
    local = local_pack(url, tmp_path / "cache")
    assert verify_pack(local) == []
    tars = sorted(name for name in handler.files if name.endswith(".tar"))
    assert {name: handler.gets[name] for name in tars} == dict.fromkeys(tars, 1)
    assert local_pack(url, tmp_path / "cache") == local
    assert {name: handler.gets[name] for name in tars} == dict.fromkeys(tars, 1)
    (local / tars[0]).write_bytes(b"changed on disk")  # no longer what was staged
    local_pack(url, tmp_path / "cache")
    assert handler.gets[tars[0]] == 2 and handler.gets[tars[1]] == 1
    assert verify_pack(local) == []


def test_a_tampered_remote_shard_is_refused_by_name_and_nothing_looks_finished(http_pack, tmp_path):
    url, handler = http_pack
    name = "train-000002.tar"
    body = bytearray(handler.files[name])
    body[len(body) // 2] ^= 0xFF
    handler.files[name] = bytes(body)
    with pytest.raises(UserError, match=rf"{name}: .*sha256.*changed after packing"):
        local_pack(url, tmp_path / "cache")
    local = tmp_path / "cache" / cache_name(url)
    assert not (local / MANIFEST).exists() and not (local / name).exists()
    assert not list(local.glob("*.part-*"))
    result = CliRunner().invoke(main, ["verify", url, "--cache-dir", str(tmp_path / "cache")])
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert result.exit_code == 2 and len(errors) == 1 and name in errors[0], result.output


@pytest.mark.slow  # starts processes
def test_a_staging_killed_mid_download_never_looks_finished_and_a_rerun_completes(
    http_pack, tmp_path, launch
):
    url, handler = http_pack
    handler.stall = "train-000001.tar"
    cache = tmp_path / "cache"
    local = cache / cache_name(url)
    code = f"from fastalex.remote import local_pack; local_pack({url!r}, {str(cache)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    staging = launch([sys.executable, "-c", code], env=env)
    assert handler.stalled.wait(60), "the download never started"
    assert list(local.glob("train-000001.tar.part-*"))  # half sent: a download under way
    staging.kill_group()
    assert not (local / MANIFEST).exists() and not (local / "train-000001.tar").exists()
    handler.stall = None
    assert local_pack(url, cache) == local
    assert verify_pack(local) == [] and not list(local.glob("*.part-*"))
    assert read_manifest(local).splits["train"].samples == 240
    assert json.loads((local / STAGED).read_text()).keys() == {p.name for p in local.glob("*.tar")}


@pytest.mark.slow  # starts processes
def test_processes_staging_one_pack_at_once_download_each_shard_once(http_pack, tmp_path, launch):
    url, handler = http_pack
    cache = tmp_path / "cache"
    code = f"from fastalex.remote import local_pack; local_pack({url!r}, {str(cache)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ranks = [launch([sys.executable, "-c", code], env=env) for _ in range(3)]
    for rank in ranks:
        stdout, stderr = rank.communicate(timeout=60)
        assert rank.returncode == 0, stderr[-2000:]
    tars = sorted(name for name in handler.files if name.endswith(".tar"))
    assert {name: handler.gets[name] for name in tars} == dict.fromkeys(tars, 1)
    assert verify_pack(cache / cache_name(url)) == []


def test_a_local_path_is_returned_as_it_is(synth_pack, tmp_path):
    assert local_pack(synth_pack, tmp_path / "cache") == synth_pack
    assert local_pack(f"file://{synth_pack}", tmp_path / "cache") == synth_pack
    assert not (tmp_path / "cache").exists()


def test_a_url_without_a_pack_is_a_one_line_error(http_pack, tmp_path):
    url, _ = http_pack
    result = CliRunner().invoke(
        main, ["verify", url + "/nothing", "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 2 and "no manifest.json" in result.output, result.output
