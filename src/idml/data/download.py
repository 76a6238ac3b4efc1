"""Download, verify and safely unpack the retrieval benchmarks: ``idml data download``.

Each file is streamed to ``<root>/.partial/<filename>`` (an interrupted download resumes with an
HTTP Range request), checked against its published checksum, and only then renamed into place.
Archives are unpacked member by member into a temporary folder inside ``root``; every member is
checked first (no path outside the folder, no links or device files, bounded total size and
member count) and the result is renamed into place only once it is complete, so a crash or a
refused archive never leaves a half-extracted data set that looks finished.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from idml.core.errors import IdmlError

ArchiveKind = Literal["tar", "zip"]

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0  # per connect and per read, not for the whole file
ATTEMPTS = 4  # network tries per file; each one resumes from the bytes already on disk
RETRY_WAIT_S = 2.0  # doubled after every failed try
# Unpacked-size cap when a file sets none: UNPACK_RATIO x the archive, but never below
# MIN_UNPACK_CAP (tiny archives are mostly tar headers and padding, which compress very well).
UNPACK_RATIO = 10
MIN_UNPACK_CAP = 64 << 20
DEFAULT_MAX_MEMBERS = 500_000  # SOP, the largest, has ~120k images
USER_AGENT = "idml-download/0.1 (Python urllib)"
PARTIAL_DIR = ".partial"

# Python 3.12's tarfile "data" filter (backported to 3.10.12 / 3.11.4): used as a second check
# after ours when present; our own checks alone are enough where it is missing.
_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None
)
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")
# What a damaged or unreadable archive (or a failing disk) raises while being unpacked.
_UNPACK_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a zip compression method that zipfile lacks
)


class DownloadError(IdmlError):
    """A data set file that could not be fetched, verified or unpacked; the message names it."""


def _relative_parts(name: str) -> tuple[str, ...] | None:
    """The path components of a relative POSIX path, or None if it could leave its folder."""
    if "\x00" in name or "\\" in name or name.startswith("/") or _DRIVE.match(name):
        return None
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    return None if ".." in parts else parts


def _is_within(path: str, folder: str) -> bool:
    inner, outer = _relative_parts(path), _relative_parts(folder)
    return inner is not None and outer is not None and inner[: len(outer)] == outer


@dataclass(frozen=True)
class DatasetFile:
    """One file of a data set: where it comes from, how to check it, what it must produce.

    ``dest`` is the folder under ``root`` that receives the file itself and, for an archive, its
    contents; ``produces`` (relative to ``root``, inside ``dest``) exists once the file is in
    place, and is what makes a later call skip it. Sizes and checksums are the published ones.
    """

    url: str
    filename: str
    produces: str
    archive: ArchiveKind | None = None
    dest: str = ""
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    max_unpacked_bytes: int | None = None
    max_members: int = DEFAULT_MAX_MEMBERS

    def __post_init__(self) -> None:
        if not self.filename or "/" in self.filename or "\\" in self.filename:
            raise IdmlError(f"filename must be a plain file name, not {self.filename!r}")
        if self.filename in (".", "..") or self.filename == PARTIAL_DIR:
            raise IdmlError(f"filename {self.filename!r} is reserved")
        for algo, digest, length in (("sha256", self.sha256, 64), ("md5", self.md5, 32)):
            if digest is not None and not re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
                raise IdmlError(f"{self.filename}: {algo} must be {length} lowercase hex digits")
        for label, rel in (("dest", self.dest), ("produces", self.produces)):
            if rel and _relative_parts(rel) is None:
                raise IdmlError(f"{self.filename}: {label} {rel!r} must stay inside root")
        if not self.produces:
            raise IdmlError(f"{self.filename}: produces must name a path")
        if self.dest and not _is_within(self.produces, self.dest):
            raise IdmlError(f"{self.filename}: produces {self.produces!r} is not in {self.dest!r}")
        if self.archive is None and self.produces != str(PurePosixPath(self.dest, self.filename)):
            raise IdmlError(f"{self.filename}: a plain file produces itself, dest/filename")

    @property
    def checksums(self) -> dict[str, str]:
        return {a: d for a, d in (("sha256", self.sha256), ("md5", self.md5)) if d is not None}

    def stored_at(self, root: Path) -> Path:
        """Where the verified file lives (archives are kept beside what they unpack to)."""
        return root / self.dest / self.filename

    def produces_in_dest(self) -> str:
        parts = _relative_parts(self.produces) or ()
        skip = len(_relative_parts(self.dest) or ()) if self.dest else 0
        return "/".join(parts[skip:])


@dataclass(frozen=True)
class DatasetSource:
    """A downloadable data set: its files and the folder under ``root`` that they make up."""

    name: str
    folder: str
    files: tuple[DatasetFile, ...]
    homepage: str = ""

    @property
    def layout(self) -> tuple[str, ...]:
        """Paths under ``root`` that exist once the data set is complete."""
        return tuple(f.produces for f in self.files)


# Checksums are the ones published with widely used loaders, cited per file; a mismatch is an
# error, never a warning. The original hosts of Cars196 and SOP have been unreliable: point
# ``base_url`` at a mirror holding the same file names (the checksums still apply).
SOURCES: dict[str, DatasetSource] = {
    "cub": DatasetSource(
        name="cub",
        folder="CUB_200_2011",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        files=(
            DatasetFile(
                # URL: pytorch_metric_learning.datasets.CUB (v2.9). sha256 and size:
                # tensorflow/datasets url_checksums/caltech_birds2011.txt (also torchvision's
                # prototype cub200 dataset); md5: KevinMusgrave/powerful-benchmarker CUB200.
                url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                filename="CUB_200_2011.tgz",
                archive="tar",
                produces="CUB_200_2011/images.txt",
                sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
                md5="97eceeb196236b17998738112f37df78",
                size=1_150_585_339,
            ),
        ),
    ),
    "cars": DatasetSource(
        name="cars",
        folder="cars196",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        files=(
            # The metric-learning release (all 16,185 images + cars_annos.mat). URLs and md5s:
            # KevinMusgrave/powerful-benchmarker datasets/cars196.py (the same md5s appear in many
            # DML code bases). torchvision reports the Stanford host offline: use base_url with a
            # mirror. pytorch-metric-learning 2.9 switched to a Kaggle re-pack with another
            # layout and no published checksum, so it is not used here.
            DatasetFile(
                url="http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
                filename="car_ims.tgz",
                archive="tar",
                dest="cars196",
                produces="cars196/car_ims",
                md5="d5c8f0aa497503f355e17dc7886c3f14",
            ),
            DatasetFile(
                url="http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
                filename="cars_annos.mat",
                dest="cars196",
                produces="cars196/cars_annos.mat",
                md5="b407c6086d669747186bd1d764ff9dbc",
            ),
        ),
    ),
    "sop": DatasetSource(
        name="sop",
        folder="Stanford_Online_Products",
        homepage="https://cvgl.stanford.edu/projects/lifted_struct/",
        files=(
            # md5: KevinMusgrave/powerful-benchmarker datasets/stanford_online_products.py, for
            # ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip (fetched here over the
            # same host's HTTP). The authors' Google Drive copy (used by pytorch-metric-learning)
            # has no published checksum; if it is byte-identical it verifies via base_url too.
            DatasetFile(
                url="http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                filename="Stanford_Online_Products.zip",
                archive="zip",
                produces="Stanford_Online_Products/Ebay_train.txt",
                md5="7f73d41a2f44250d4779881525aea32e",
            ),
        ),
    ),
    "inshop": DatasetSource(
        name="inshop",
        folder="InShop",
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        files=(
            # DeepFashion In-shop, from the authors' Google Drive folder (file ids and resource
            # keys as linked from the project page). No checksum is published: the computed
            # sha256 is reported in a warning so that it can be pinned here.
            DatasetFile(
                url=(
                    "https://drive.usercontent.google.com/download?id=0B7EVK8r0v71pS2YxRE1QTFZzekU"
                    "&resourcekey=0-2n-dbZygJiZdm0UbEaFRTA&export=download&confirm=t"
                ),
                filename="img.zip",
                archive="zip",
                dest="InShop",
                produces="InShop/img",
            ),
            DatasetFile(
                url=(
                    "https://drive.usercontent.google.com/download?id=0B7EVK8r0v71pYVBqLXpRVjhHeWM"
                    "&resourcekey=0-rxJ2QcImN-IRo_Bv9QSXmg&export=download&confirm=t"
                ),
                filename="list_eval_partition.txt",
                dest="InShop",
                produces="InShop/list_eval_partition.txt",
            ),
        ),
    ),
    "flowers102": DatasetSource(
        name="flowers102",
        folder="flowers102",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        files=(
            # URLs and md5s: torchvision.datasets.Flowers102 (_download_url_prefix, _file_dict).
            # The archive holds jpg/image_00001.jpg ...; read_flowers102 reads the pair.
            DatasetFile(
                url="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                filename="102flowers.tgz",
                archive="tar",
                dest="flowers102",
                produces="flowers102/jpg",
                md5="52808999861908f626f3c1f4e79d11fa",
            ),
            DatasetFile(
                url="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                filename="imagelabels.mat",
                dest="flowers102",
                produces="flowers102/imagelabels.mat",
                md5="e0620be6f572b9609742df49c70aed4d",
            ),
        ),
    ),
}


def download_dataset(
    name: str, root: str | Path, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Fetch, verify and unpack data set ``name`` under ``root``; return its folder.

    Files whose layout path already exists are skipped without any network access, so a
    repeated call is cheap. ``base_url`` replaces each file's URL by ``<base_url>/<filename>``
    (a mirror holding the same files, or a test server); the checksums still apply.
    """
    try:
        source = SOURCES[name]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise DownloadError(f"unknown data set {name!r}; known: {known}") from None
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for file in source.files:
        if (root / file.produces).exists():
            continue
        stored = fetch_file(file, root, base_url=base_url, progress=progress)
        if file.archive is None:
            continue
        try:
            extract_archive(
                stored,
                root / file.dest,
                kind=file.archive,
                produces=file.produces_in_dest(),
                max_bytes=file.max_unpacked_bytes,
                max_members=file.max_members,
                progress=progress,
            )
        except DownloadError:
            if not file.checksums:  # unverified: maybe an error page; fetch it afresh next time
                stored.unlink(missing_ok=True)
            raise
    missing = [rel for rel in source.layout if not (root / rel).exists()]
    if missing:
        raise DownloadError(f"{name}: expected {', '.join(missing)} under {root}; not found")
    return root / source.folder


def fetch_file(
    file: DatasetFile,
    root: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Make ``file`` present and verified at ``file.stored_at(root)``; return that path."""
    root = Path(root)
    final = file.stored_at(root)
    if final.exists():
        if not file.checksums:
            return final  # only a finished download is ever renamed there
        try:
            _verify(final, file)
            return final
        except DownloadError as exc:
            warnings.warn(f"{exc}; downloading it again", stacklevel=2)
            final.unlink()
    url = _file_url(file, base_url)
    partial = root / PARTIAL_DIR / file.filename
    partial.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(partial, file)
    for attempt in range(ATTEMPTS):
        try:
            _fetch_once(url, partial, file, progress=progress, timeout=timeout)
            break
        except _Retry as exc:
            if attempt == ATTEMPTS - 1:
                raise DownloadError(
                    f"could not download {file.filename} from {url} ({ATTEMPTS} tries): {exc}"
                ) from exc
            time.sleep(RETRY_WAIT_S * 2**attempt)
    _verify(partial, file, delete_on_mismatch=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    return final


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    *,
    kind: ArchiveKind,
    produces: str | None = None,
    max_bytes: int | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
    progress: bool = False,
) -> Path:
    """Unpack ``archive`` (tar, tar.gz/tgz/bz2/xz, or zip) into ``dest``, all or nothing.

    Members are unpacked into a temporary folder inside ``dest``; any member with an absolute
    path or ``..``, any link, device or other special file, more than ``max_members`` members or
    more than ``max_bytes`` unpacked (default: ``UNPACK_RATIO`` x the archive, at least
    ``MIN_UNPACK_CAP``) raises :class:`DownloadError` naming the archive and the member, and
    nothing is left behind. ``produces`` (relative to ``dest``) must exist in the result; the
    top-level entries are then renamed into ``dest``, the one holding ``produces`` last.
    """
    archive, dest = Path(archive), Path(dest)
    if max_bytes is None:
        max_bytes = max(UNPACK_RATIO * archive.stat().st_size, MIN_UNPACK_CAP)
    budget = _Budget(archive.name, max_bytes, max_members)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.name}-", dir=dest))
    try:
        unpack = _unpack_tar if kind == "tar" else _unpack_zip
        with _bar(progress, unit=" files", desc=f"unpack {archive.name}") as bar:
            try:
                unpack(archive, tmp, budget, bar.update)
            except _UNPACK_ERRORS as exc:
                raise DownloadError(f"cannot unpack {archive.name}: {exc}") from exc
        top = _relative_parts(produces)[0] if produces else None
        if produces and not (tmp / produces).exists():
            raise DownloadError(
                f"{archive.name} does not contain {produces}: not the expected file"
            )
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == top):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink() and entry.is_dir():
                if entry.name == top:
                    raise DownloadError(
                        f"{target} exists but has no {produces}; remove it and run again"
                    )
                continue  # moved here by an earlier run that stopped before the last entry
            try:
                os.replace(entry, target)
            except OSError as exc:
                raise DownloadError(
                    f"cannot move {entry.name} from {archive.name} to {target}: {exc}"
                ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class _Retry(Exception):
    """A failure that a new request, resuming from the bytes on disk, may get past."""


class _Budget:
    """Counts members and unpacked bytes; raises once an archive asks for too much."""

    def __init__(self, archive: str, max_bytes: int, max_members: int) -> None:
        self.archive, self.max_bytes, self.max_members = archive, max_bytes, max_members
        self.members = 0
        self.bytes = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise DownloadError(
                f"{self.archive}: more than {self.max_members} members (refused at {name!r})"
            )

    def expect(self, name: str, size: int) -> None:
        self._check(name, self.bytes + size)

    def add(self, name: str, size: int) -> None:
        self.bytes += size
        self._check(name, self.bytes)

    def _check(self, name: str, total: int) -> None:
        if total > self.max_bytes:
            raise DownloadError(
                f"{self.archive}: member {name!r} takes the unpacked size past the cap of "
                f"{self.max_bytes} bytes; refusing to unpack"
            )


def _member_path(tmp: Path, name: str, archive: str) -> Path | None:
    """The path inside ``tmp`` for member ``name``; None for the archive's own root entry."""
    parts = _relative_parts(name)
    if parts is None:
        raise DownloadError(
            f"{archive}: member {name!r} has an absolute path or '..' (it would land outside "
            "the target folder); refusing to unpack"
        )
    if not parts:
        return None
    path = tmp.joinpath(*parts)
    if not os.path.realpath(path).startswith(os.path.realpath(tmp) + os.sep):
        raise DownloadError(f"{archive}: member {name!r} resolves outside the target folder")
    return path


def _refuse_type(archive: str, name: str, what: str) -> DownloadError:
    return DownloadError(f"{archive}: member {name!r} is a {what}; refusing to unpack")


def _unpack_tar(archive: Path, tmp: Path, budget: _Budget, tick: Callable[[int], Any]) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:  # one streaming pass: a .tgz is decompressed once
            budget.member(member.name)
            path = _member_path(tmp, member.name, archive.name)
            if member.issym() or member.islnk():
                raise _refuse_type(archive.name, member.name, f"link to {member.linkname!r}")
            if not (member.isreg() or member.isdir()):
                raise _refuse_type(archive.name, member.name, "device, fifo or special file")
            if _DATA_FILTER is not None:
                try:
                    _DATA_FILTER(member, str(tmp))
                except tarfile.FilterError as exc:
                    raise DownloadError(f"{archive.name}: member {member.name!r}: {exc}") from exc
            tick(1)
            if path is None:
                continue
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            budget.expect(member.name, member.size)
            path.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has a file object
            with source:
                _copy_counted(source, path, budget, member.name)


def _unpack_zip(archive: Path, tmp: Path, budget: _Budget, tick: Callable[[int], Any]) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.member(info.filename)
            path = _member_path(tmp, info.filename, archive.name)
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix mode bits, when recorded
            if kind == stat.S_IFLNK:
                raise _refuse_type(archive.name, info.filename, "symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse_type(archive.name, info.filename, "device, fifo or special file")
            if info.flag_bits & 0x1:
                raise DownloadError(f"{archive.name}: member {info.filename!r} is encrypted")
            tick(1)
            if path is None:
                continue
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            budget.expect(info.filename, info.file_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source:
                _copy_counted(source, path, budget, info.filename)


def _copy_counted(source: IO[bytes], path: Path, budget: _Budget, name: str) -> None:
    # Counting what is actually written, not what the header claims, bounds lying headers too.
    with open(path, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            budget.add(name, len(chunk))
            out.write(chunk)


def _file_url(file: DatasetFile, base_url: str | None) -> str:
    url = file.url
    if base_url is not None:
        url = base_url.rstrip("/") + "/" + urllib.parse.quote(file.filename)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{file.filename}: only http(s) URLs are fetched, not {url!r}")
    return url


def _check_free_space(partial: Path, file: DatasetFile) -> None:
    if file.size is None:
        return
    have = partial.stat().st_size if partial.exists() else 0
    free = shutil.disk_usage(partial.parent).free
    if file.size - have > free:
        raise DownloadError(
            f"{file.filename} needs {file.size - have} more bytes; {partial.parent} has {free}"
        )


def _open(url: str, partial: Path, file: DatasetFile, have: int, timeout: float) -> Any:
    """The response to a request for ``url`` from byte ``have`` on; ``None`` when the server
    says the range starts at the file's end (complete on disk). Raises _Retry where a new
    attempt may succeed, DownloadError where it cannot."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and have:
                match = _CONTENT_RANGE_UNSATISFIED.fullmatch(exc.headers.get("Content-Range", ""))
                if match is None or int(match[1]) == have:
                    return None  # the range starts at the end: the file is complete on disk
                partial.unlink()
                raise _Retry(f"server refused to resume at byte {have} of {match[1]}") from exc
            message = f"{file.filename}: HTTP {exc.code} {exc.reason} for {url}"
            if exc.code in (408, 425, 429) or exc.code >= 500:
                raise _Retry(message) from exc
            raise DownloadError(message) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc


def _append_body(response: Any, partial: Path, name: str, have: int, total: int | None,
                 progress: bool) -> None:
    """Write the response body to ``partial`` (appended after ``have`` bytes, else anew)."""
    bar_args = {"total": total, "initial": have, "unit": "B", "unit_scale": True}
    with (
        open(partial, "ab" if have else "wb") as out,
        _bar(progress, desc=name, unit_divisor=1024, **bar_args) as bar,
    ):
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"connection lost after {out.tell()} bytes: {exc}") from exc
            if not chunk:
                break
            out.write(chunk)
            bar.update(len(chunk))


def _fetch_once(
    url: str, partial: Path, file: DatasetFile, *, progress: bool, timeout: float
) -> None:
    """One request: append to (or restart) ``partial``; raise _Retry if it may be resumed."""
    have = partial.stat().st_size if partial.exists() else 0
    if file.size is not None and have > file.size:
        partial.unlink()  # longer than the published file: not a prefix of it
        have = 0
    if file.size is not None and have == file.size:
        return  # complete on disk; the checksum decides
    response = _open(url, partial, file, have, timeout)
    if response is None:
        return
    with response:
        total = _response_total(response, partial, have, file)
        if response.status == 200:
            have = 0  # no Range asked, or the server ignored it: the body is the whole file
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not file.filename.endswith((".htm", ".html")):
            raise DownloadError(
                f"{file.filename}: {url} returned an HTML page, not the file (a login, quota or "
                "error page?)"
            )
        _append_body(response, partial, file.filename, have, total, progress)
    got = partial.stat().st_size
    if total is not None and got < total:
        raise _Retry(f"connection closed at byte {got} of {total}")


def _response_total(response: Any, partial: Path, have: int, file: DatasetFile) -> int | None:
    """The full size of the file as the response describes it, after checking resumption."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != have:
            partial.unlink(missing_ok=True)  # an answer we cannot splice onto what we have
            raise _Retry(f"unusable Content-Range {response.headers.get('Content-Range')!r}")
        return int(match[3]) if match[3] != "*" else file.size
    if response.status != 200:
        raise DownloadError(f"{file.filename}: unexpected HTTP {response.status}")
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else file.size


def _verify(path: Path, file: DatasetFile, *, delete_on_mismatch: bool = False) -> None:
    expected = file.checksums
    # Integrity checks, not security ones: md5 stays available on FIPS-restricted builds.
    hashes = {algo: hashlib.new(algo, usedforsecurity=False) for algo in {"sha256", *expected}}
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            for h in hashes.values():
                h.update(chunk)
    actual = {algo: h.hexdigest() for algo, h in hashes.items()}
    for algo, digest in expected.items():
        if actual[algo] != digest:
            if delete_on_mismatch:
                path.unlink(missing_ok=True)
            raise DownloadError(
                f"{file.filename}: {algo} mismatch: expected {digest}, got {actual[algo]}"
                + (" (the download was deleted)" if delete_on_mismatch else "")
            )
    if not expected:
        warnings.warn(
            f"{file.filename}: no published checksum to verify against; its sha256 is "
            f"{actual['sha256']}",
            stacklevel=3,
        )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def _bar(enabled: bool, **kwargs: Any) -> Iterator[Any]:
    """A tqdm progress bar when asked for and available, else a stand-in that does nothing."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
    if not enabled:
        yield _NoBar()
        return
    with tqdm(**kwargs) as bar:
        yield bar
