"""Data set download: resumable fetch, checksum verification, safe all-or-nothing unpacking.

Everything runs against a small HTTP server on 127.0.0.1 started by the tests themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from idml.data import download
from idml.data.download import (
    SOURCES,
    DatasetFile,
    DatasetSource,
    DownloadError,
    download_dataset,
)

LAYOUT = {
    "fake_ds/images.txt": b"1 001.Bird/a.jpg\n2 001.Bird/b.jpg\n",
    "fake_ds/images/001.Bird/a.jpg": bytes(range(256)) * 40,
    "fake_ds/images/001.Bird/b.jpg": b"\xff\xd8" + b"b" * 3000,
    "attributes.txt": b"1 has_bill_shape::curved\n",  # CUB also ships a top-level file
}


class _Handler(BaseHTTPRequestHandler):
    """Serves files from ``server.folder``; honours ``Range: bytes=N-`` unless told not to."""

    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        name = unquote(urlsplit(self.path).path).lstrip("/")
        path = srv.folder / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.honour_range:
            start = int(match[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Type", srv.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if srv.drop_after is not None:  # announce everything, send a part, hang up
            data, srv.drop_after = data[: srv.drop_after], None
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    folder: Path
    requests: list[tuple[str, str | None]]
    honour_range: bool
    drop_after: int | None
    content_type: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def publish(self, filename: str, data: bytes) -> None:
        (self.folder / filename).write_bytes(data)


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(download, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.01)
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.folder = tmp_path / "www"
    srv.folder.mkdir()
    srv.requests = []
    srv.honour_range = True
    srv.drop_after = None
    srv.content_type = "application/octet-stream"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _register(monkeypatch, filename: str, data: bytes, **overrides) -> DatasetFile:
    """Register data set "fake" made of one file, by default a tar with its true sha256."""
    fields = {
        "url": f"https://example.invalid/{filename}",
        "filename": filename,
        "archive": "tar",
        "produces": "fake_ds/images.txt",
        "sha256": hashlib.sha256(data).hexdigest(),
        **overrides,
    }
    file = DatasetFile(**fields)
    monkeypatch.setitem(SOURCES, "fake", DatasetSource("fake", "fake_ds", (file,)))
    return file


def _assert_layout(root: Path) -> None:
    for rel, data in LAYOUT.items():
        assert (root / rel).read_bytes() == data, rel


def _assert_nothing_unpacked(root: Path) -> None:
    assert not (root / "fake_ds").exists()
    assert not list(root.glob(".extract-*"))


def _outside_files(tmp_path: Path, root: Path) -> list[Path]:
    www = tmp_path / "www"
    return [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and root not in p.parents and www not in p.parents
    ]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_download_verifies_unpacks_and_then_skips(server, root, monkeypatch, kind):
    data = _tar_gz(LAYOUT) if kind == "tar" else _zip(LAYOUT)
    filename = "fake.tgz" if kind == "tar" else "fake.zip"
    server.publish(filename, data)
    _register(monkeypatch, filename, data, archive=kind)

    folder = download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert folder == root / "fake_ds"
    _assert_layout(root)
    assert (root / filename).read_bytes() == data  # the verified archive is kept
    assert not list((root / ".partial").iterdir())
    assert not list(root.glob(".extract-*"))
    assert server.requests == [(f"/{filename}", None)]

    assert download_dataset("fake", root, base_url=server.base_url, progress=False) == folder
    assert len(server.requests) == 1  # complete layout: no network at all


def test_verified_archive_on_disk_is_unpacked_without_network(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    _register(monkeypatch, "fake.tgz", data)
    root.mkdir()
    (root / "fake.tgz").write_bytes(data)
    download_dataset("fake", root, base_url=server.base_url, progress=False)
    _assert_layout(root)
    assert server.requests == []


def test_resume_sends_range_and_result_verifies(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data)
    half = len(data) // 2
    (root / ".partial").mkdir(parents=True)
    (root / ".partial" / "fake.tgz").write_bytes(data[:half])

    download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert server.requests == [("/fake.tgz", f"bytes={half}-")]
    assert (root / "fake.tgz").read_bytes() == data
    _assert_layout(root)


def test_complete_partial_is_finished_by_a_416(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data)  # no size: only the server can say it is complete
    (root / ".partial").mkdir(parents=True)
    (root / ".partial" / "fake.tgz").write_bytes(data)

    download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert server.requests == [("/fake.tgz", f"bytes={len(data)}-")]
    _assert_layout(root)


def test_complete_partial_of_known_size_needs_no_request(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    _register(monkeypatch, "fake.tgz", data, size=len(data))
    (root / ".partial").mkdir(parents=True)
    (root / ".partial" / "fake.tgz").write_bytes(data)
    download_dataset("fake", root, base_url=server.base_url, progress=False)
    assert server.requests == []
    _assert_layout(root)


def test_server_ignoring_range_restarts_from_zero(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    server.honour_range = False
    _register(monkeypatch, "fake.tgz", data)
    half = len(data) // 2
    (root / ".partial").mkdir(parents=True)
    (root / ".partial" / "fake.tgz").write_bytes(data[:half])

    download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert server.requests == [("/fake.tgz", f"bytes={half}-")]  # asked, answered with 200
    assert (root / "fake.tgz").read_bytes() == data
    _assert_layout(root)


def test_dropped_connection_is_resumed_by_the_next_try(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    cut = len(data) // 3
    server.drop_after = cut
    _register(monkeypatch, "fake.tgz", data)

    download_dataset("fake", root, base_url=server.base_url, progress=True)  # tqdm path too

    assert server.requests == [("/fake.tgz", None), ("/fake.tgz", f"bytes={cut}-")]
    assert (root / "fake.tgz").read_bytes() == data
    _assert_layout(root)


def test_html_page_instead_of_the_file_is_refused(server, root, monkeypatch):
    server.publish("fake.tgz", b"<html>quota exceeded</html>")
    server.content_type = "text/html; charset=utf-8"
    _register(monkeypatch, "fake.tgz", b"x", sha256=None)
    with pytest.raises(DownloadError, match="fake.tgz: .* returned an HTML page"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    assert not (root / "fake.tgz").exists()


def test_checksum_mismatch_names_file_and_leaves_no_partial(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data[:-10] + b"corrupted!")
    expected = hashlib.sha256(data).hexdigest()
    actual = hashlib.sha256(data[:-10] + b"corrupted!").hexdigest()
    _register(monkeypatch, "fake.tgz", data)

    with pytest.raises(DownloadError, match="fake.tgz") as err:
        download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert expected in str(err.value) and actual in str(err.value)
    assert not (root / ".partial" / "fake.tgz").exists()
    assert not (root / "fake.tgz").exists()
    _assert_nothing_unpacked(root)


def test_md5_is_checked_too(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data, md5="0" * 32)
    with pytest.raises(DownloadError, match=r"fake.tgz: md5 mismatch: expected 0{32}"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    assert not (root / ".partial" / "fake.tgz").exists()


def test_missing_checksum_warns_with_the_computed_sha256(server, root, monkeypatch):
    data = _tar_gz(LAYOUT)
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data, sha256=None)
    with pytest.warns(UserWarning, match=hashlib.sha256(data).hexdigest()):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    _assert_layout(root)


def test_http_error_names_the_file_and_url(server, root, monkeypatch):
    _register(monkeypatch, "absent.tgz", b"x")
    with pytest.raises(DownloadError, match=r"absent.tgz: HTTP 404 .*127\.0\.0\.1"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    assert len(server.requests) == 1  # a 404 is final, not retried


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DownloadError, match="cars, cub, flowers102, inshop, sop"):
        download_dataset("mnist", tmp_path)


def _tar_with(*infos: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(_file_info("fake_ds/images.txt", 3), io.BytesIO(b"ok\n"))
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _special_info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _malicious(outside: Path) -> dict[str, tuple[str, bytes]]:
    """Archives that must be refused: (member the error must name, archive bytes)."""
    evil = b"pwned\n"
    return {
        "tar-dotdot": ("../evil", _tar_with((_file_info("../evil", len(evil)), evil))),
        "tar-nested-dotdot": (
            "fake_ds/../../evil",
            _tar_with((_file_info("fake_ds/../../evil", len(evil)), evil)),
        ),
        "tar-absolute": (
            str(outside / "evil"),
            _tar_with((_file_info(str(outside / "evil"), len(evil)), evil)),
        ),
        "tar-symlink": (
            "fake_ds/images",
            _tar_with(
                (_special_info("fake_ds/images", tarfile.SYMTYPE, str(outside)), b""),
                (_file_info("fake_ds/images/evil", len(evil)), evil),
            ),
        ),
        "tar-hardlink": (
            "fake_ds/passwd",
            _tar_with((_special_info("fake_ds/passwd", tarfile.LNKTYPE, "/etc/passwd"), b"")),
        ),
        "tar-device": (
            "fake_ds/null",
            _tar_with((_special_info("fake_ds/null", tarfile.CHRTYPE), b"")),
        ),
        "tar-fifo": (
            "fake_ds/pipe",
            _tar_with((_special_info("fake_ds/pipe", tarfile.FIFOTYPE), b"")),
        ),
        "zip-dotdot": ("../evil", _zip({"fake_ds/images.txt": b"ok\n", "../evil": evil})),
        "zip-absolute": ("/evil", _zip({"fake_ds/images.txt": b"ok\n", "/evil": evil})),
        "zip-symlink": ("fake_ds/images", _zip_with_symlink("fake_ds/images", str(outside))),
    }


def _zip_with_symlink(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fake_ds/images.txt", b"ok\n")
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = 0o120777 << 16  # S_IFLNK | 0777
        zf.writestr(info, target)
    return buf.getvalue()


def _no_zip_rewrite(data: bytes, name: str) -> bytes:
    # The test means nothing unless zipfile stored the hostile name exactly as given.
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert name in names, names
    return data


@pytest.fixture(params=["data_filter", "no_data_filter"])
def data_filter(request, monkeypatch):
    """Run with Python's tarfile data filter (when present) and with our checks alone."""
    if request.param == "no_data_filter":
        monkeypatch.setattr(download, "_DATA_FILTER", None)
    return request.param


@pytest.mark.parametrize("case", sorted(_malicious(Path("/x"))))
def test_malicious_archives_are_refused(server, root, tmp_path, monkeypatch, data_filter, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    member, data = _malicious(outside)[case]
    kind = case.split("-")[0]
    if kind == "zip":
        data = _no_zip_rewrite(data, member)
    filename = f"bad.{'tgz' if kind == 'tar' else 'zip'}"
    server.publish(filename, data)
    _register(monkeypatch, filename, data, archive=kind)

    with pytest.raises(DownloadError, match=re.escape(filename)) as err:
        download_dataset("fake", root, base_url=server.base_url, progress=False)

    assert repr(member) in str(err.value)
    assert _outside_files(tmp_path, root) == []
    assert not list(outside.iterdir())
    _assert_nothing_unpacked(root)


def test_unpacked_size_cap_is_enforced(server, root, monkeypatch):
    data = _tar_gz({"fake_ds/images.txt": b"ok\n", "fake_ds/big.bin": b"x" * 5000})
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data, max_unpacked_bytes=4000)
    with pytest.raises(DownloadError, match=r"fake.tgz: member 'fake_ds/big.bin' .* cap of 4000"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    _assert_nothing_unpacked(root)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_compression_bomb_exceeds_the_default_ratio_cap(server, root, monkeypatch, kind):
    monkeypatch.setattr(download, "MIN_UNPACK_CAP", 0)  # so that a small bomb is enough
    members = {"fake_ds/images.txt": b"ok\n", "fake_ds/zeros.bin": bytes(2 << 20)}
    data = _tar_gz(members) if kind == "tar" else _zip(members)
    assert len(data) * download.UNPACK_RATIO < 2 << 20
    filename = f"bomb.{'tgz' if kind == 'tar' else 'zip'}"
    server.publish(filename, data)
    _register(monkeypatch, filename, data, archive=kind)
    with pytest.raises(DownloadError, match=rf"{filename}: member 'fake_ds/zeros.bin'"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    _assert_nothing_unpacked(root)


def test_member_count_cap_is_enforced(server, root, monkeypatch):
    data = _tar_gz({f"fake_ds/{i}.txt": b"" for i in range(5)} | {"fake_ds/images.txt": b""})
    server.publish("many.tgz", data)
    _register(monkeypatch, "many.tgz", data, max_members=3)
    with pytest.raises(DownloadError, match=r"many.tgz: more than 3 members .*fake_ds/3.txt"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    _assert_nothing_unpacked(root)


def test_archive_without_the_expected_layout_is_refused(server, root, monkeypatch):
    data = _tar_gz({"other/readme.txt": b"hi\n"})
    server.publish("fake.tgz", data)
    _register(monkeypatch, "fake.tgz", data)
    with pytest.raises(DownloadError, match="fake.tgz does not contain fake_ds/images.txt"):
        download_dataset("fake", root, base_url=server.base_url, progress=False)
    assert not (root / "other").exists()
    _assert_nothing_unpacked(root)


def test_plain_file_lands_in_its_folder(server, root, monkeypatch):
    text = b"img/WOMEN/a.jpg id_1 train\n"
    server.publish("list.txt", text)
    file = DatasetFile(
        url="https://example.invalid/list.txt",
        filename="list.txt",
        dest="Fake",
        produces="Fake/list.txt",
        sha256=hashlib.sha256(text).hexdigest(),
    )
    monkeypatch.setitem(SOURCES, "fake", DatasetSource("fake", "Fake", (file,)))
    assert download_dataset("fake", root, base_url=server.base_url, progress=False) == root / "Fake"
    assert (root / "Fake" / "list.txt").read_bytes() == text


def test_registry_names_checksummed_sources():
    assert {"cub", "cars", "sop", "inshop"} <= set(SOURCES)
    for source in SOURCES.values():
        for file in source.files:
            assert file.url.startswith(("http://", "https://"))
            assert download._is_within(file.produces, source.folder)
    assert SOURCES["cub"].layout == ("CUB_200_2011/images.txt",)
    for name in ("cub", "cars", "sop", "flowers102"):  # published checksums; In-shop has none
        assert all(f.checksums for f in SOURCES[name].files), name


def test_flowers102_downloads_and_reads_offline(server, root, monkeypatch, tmp_path):
    # The real source, served from 127.0.0.1: a generated 102flowers.tgz (jpg/...) and
    # imagelabels.mat, with the fake files' md5s in place of the published ones.
    import numpy as np
    import scipy.io
    from PIL import Image

    from idml.data.registry import read_dataset

    labels = [1, 52, 2, 60, 1]
    members = {}
    for i in range(1, len(labels) + 1):
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (i, 0, 0)).save(buf, format="JPEG")
        members[f"jpg/image_{i:05d}.jpg"] = buf.getvalue()
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": np.array([labels])})
    published = {"102flowers.tgz": _tar_gz(members),
                 "imagelabels.mat": (tmp_path / "imagelabels.mat").read_bytes()}
    real = SOURCES["flowers102"]
    files = []
    for file in real.files:
        assert file.url == "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/" + file.filename
        server.publish(file.filename, published[file.filename])
        md5 = hashlib.md5(published[file.filename]).hexdigest()
        files.append(dataclasses.replace(file, md5=md5))
    monkeypatch.setitem(SOURCES, "flowers102", dataclasses.replace(real, files=tuple(files)))

    folder = download_dataset("flowers102", root, base_url=server.base_url, progress=False)

    assert folder == root / "flowers102"
    splits = read_dataset("flowers102", folder)
    assert splits.train.labels == [1, 2, 1] and splits.test.labels == [52, 60]
    assert splits.train.paths[1] == folder / "jpg" / "image_00003.jpg"
    assert splits.train.paths[1].read_bytes() == members["jpg/image_00003.jpg"]


def test_dataset_file_rejects_unsafe_fields():
    with pytest.raises(ValueError, match="plain file name"):
        DatasetFile(url="http://h/x", filename="../x.tgz", produces="x", archive="tar")
    with pytest.raises(ValueError, match="inside root"):
        DatasetFile(url="http://h/x", filename="x.tgz", produces="../x", archive="tar")
    with pytest.raises(ValueError, match="sha256"):
        DatasetFile(url="http://h/x", filename="x.tgz", produces="x", archive="tar", sha256="ab")


def test_cli_reports_download_errors_without_traceback(tmp_path, capsys):
    # Nothing listens on this port (bound and closed at once): a clean error, exit 2.
    import socket

    from idml.cli import main

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = main(["data", "download", "cub", "--root", str(tmp_path), "--no-progress",
                 "--base-url", f"http://127.0.0.1:{port}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "idml data: error:" in err and "CUB_200_2011" in err
