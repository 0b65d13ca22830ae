"""The Tiny ImageNet layout: the reader takes dirs and zips alike and names what is missing; the
download resumes and checks its md5."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

pytest.importorskip(
    "simplejpeg", reason="fastalex.sources imports images.py, which needs simplejpeg"
)

from fastalex.errors import UserError
from fastalex.sources.tinyimagenet import download_zip, open_source, read_layout


def zip_tree(tree: Path, zip_path: Path) -> Path:
    """Zip `tree` the way the official archive is laid out: everything under tiny-imagenet-200/."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for path in sorted(tree.rglob("*")):
            z.write(path, "tiny-imagenet-200/" + path.relative_to(tree).as_posix())
    return zip_path


def test_layout_from_dir_and_zip_agree(synth_tree, tmp_path):
    from_dir = read_layout(open_source(synth_tree))
    from_zip = read_layout(open_source(zip_tree(synth_tree, tmp_path / "t.zip")))
    assert from_dir.classes == from_zip.classes and from_dir.train == from_zip.train
    assert from_dir.val == from_zip.val and from_dir.test_images == from_zip.test_images == 5
    assert len(from_dir.train) == 240 and len(from_dir.val) == 60
    assert [w for w, _ in from_dir.classes] == sorted(w for w, _ in from_dir.classes)
    # train labels follow the directory, val labels the annotations file
    wnid_of = [w for w, _ in from_dir.classes]
    assert all(rel.split("/")[1] == wnid_of[label] for rel, label in from_dir.train)
    annotations = dict(
        line.split("\t")[:2]
        for line in (synth_tree / "val/val_annotations.txt").read_text().splitlines()
    )
    assert all(annotations[rel.rsplit("/", 1)[1]] == wnid_of[label] for rel, label in from_dir.val)


def test_reader_names_what_is_missing(synth_tree, tmp_path):
    with pytest.raises(UserError, match="wnids.txt"):
        open_source(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        open_source(tmp_path / "nope")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="readable zip"):
        open_source(bad_zip)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "wnids.txt").write_text("n1\n")
    with pytest.raises(UserError, match="no images in train/n1/images"):
        read_layout(open_source(broken))
    (broken / "train/n1/images").mkdir(parents=True)
    (broken / "train/n1/images/a.JPEG").write_bytes(b"x")
    with pytest.raises(UserError, match="missing val/val_annotations.txt"):
        read_layout(open_source(broken))
    (broken / "val/images").mkdir(parents=True)
    (broken / "val/val_annotations.txt").write_text("val_0.JPEG\tn1\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="names a missing image val/images/val_0.JPEG"):
        read_layout(open_source(broken))


def test_val_fraction_is_refused_and_an_empty_val_split_named(synth_tree, tmp_path):
    with pytest.raises(UserError, match="has its own val split; drop --val-fraction"):
        read_layout(open_source(synth_tree), val_fraction=0.1)
    tree = tmp_path / "tree"
    (tree / "train/n1/images").mkdir(parents=True)
    (tree / "train/n1/images/a.JPEG").write_bytes(b"x")
    (tree / "val").mkdir()
    (tree / "wnids.txt").write_text("n1\n")
    (tree / "val/val_annotations.txt").write_text("")
    with pytest.raises(UserError, match="val/val_annotations.txt lists no images"):
        read_layout(open_source(tree))


def record_requests(server) -> list[str | None]:
    """The Range header of every request the test server answers, in order (None: no Range)."""
    handler = server.RequestHandlerClass
    seen = []
    serve = handler.do_GET

    def do_GET(self):
        seen.append(self.headers.get("Range"))
        serve(self)

    handler.do_GET = do_GET
    return seen


def zip_payload() -> bytes:
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "n1\n" * 5000)
    return payload.getvalue()


def test_a_dropped_download_keeps_its_part_and_the_next_run_resumes_it(server, tmp_path):
    """The server closes the connection half-way (fewer bytes than Content-Length): that is not a
    corrupt file. The .part stays, the message says to re-run, and the re-run asks only for the
    missing bytes."""
    RangeHandler = server.RequestHandlerClass
    RangeHandler.payload = zip_payload()
    half = len(RangeHandler.payload) // 2
    RangeHandler.drop_after = half
    requests = record_requests(server)
    url = f"http://127.0.0.1:{server.server_port}/tiny.zip"
    md5 = hashlib.md5(RangeHandler.payload).hexdigest()
    with pytest.raises(UserError, match="re-run to resume") as dropped:
        download_zip(url, tmp_path, md5)
    assert "corrupt" not in str(dropped.value)
    part = tmp_path / "tiny.zip.part"
    assert not (tmp_path / "tiny.zip").exists()
    assert part.read_bytes() == RangeHandler.payload[:half]
    RangeHandler.drop_after = None
    received = []
    path = download_zip(url, tmp_path, md5, progress=lambda done, total: received.append(done))
    assert requests == [None, f"bytes={half}-"]
    assert received[0] > half and received[-1] == len(RangeHandler.payload)  # counted from the part
    assert path.read_bytes() == RangeHandler.payload and not part.exists()


def test_a_complete_download_with_the_wrong_md5_is_deleted_as_corrupt(server, tmp_path):
    server.RequestHandlerClass.payload = zip_payload()
    url = f"http://127.0.0.1:{server.server_port}/tiny.zip"
    with pytest.raises(UserError, match="md5 .* corrupt"):
        download_zip(url, tmp_path, "0" * 32)
    assert not list(tmp_path.iterdir())


def test_a_complete_part_file_is_checked_and_kept(server, tmp_path):
    """A download killed between its last byte and the rename: the server answers 416 to the
    resume, and the .part is verified and renamed, without fetching its bytes again."""
    server.RequestHandlerClass.payload = b"zip bytes" * 1000
    requests = record_requests(server)
    (tmp_path / "t.zip.part").write_bytes(server.RequestHandlerClass.payload)
    md5 = hashlib.md5(server.RequestHandlerClass.payload).hexdigest()
    received = []
    path = download_zip(
        f"http://127.0.0.1:{server.server_port}/t.zip",
        tmp_path,
        md5,
        progress=lambda done, total: received.append(done),
    )
    assert path == tmp_path / "t.zip" and path.read_bytes() == server.RequestHandlerClass.payload
    assert requests == ["bytes=9000-"] and received == []  # asked from the end; nothing came


def test_download_without_network_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="download of .* failed"):
        download_zip("http://127.0.0.1:9/tiny.zip", tmp_path)
