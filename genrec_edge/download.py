"""Download MovieLens releases: resumable, checksum-verified, safely extracted.

``download(name, dest)`` fetches ``<base_url>/<name>.zip`` into ``dest/<name>.zip.part``, resuming an
interrupted download with an HTTP Range request; verifies the sha256 (pinned below, or passed in);
renames it to ``dest/<name>.zip`` and extracts it, refusing members that would land outside ``dest``.

Pinned checksums: the releases GroupLens no longer changes, with the sha256 and size recorded in
TensorFlow Datasets' ``url_checksums/movielens.txt``. ``ml-latest`` is re-published in place and
``ml-10m`` has no recorded checksum: those need ``sha256=`` or ``no_verify=True``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DownloadError, UsageError
from .hashing import sha256_file
from .progress import byte_bar

ENV_BASE_URL = "GENREC_EDGE_MOVIELENS_URL"
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Release:
    name: str
    format: str  # the `genrec-edge data ingest` format
    sha256: str | None
    size: int | None
    folder: str = ""  # the one top folder of its zip, when it is not the name

    @property
    def top(self) -> str:
        return self.folder or self.name


RELEASES = {
    r.name: r
    for r in [
        Release("ml-latest-small", "movielens-csv",
                "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", 978_202),
        Release("ml-latest", "movielens-csv", None, None),
        Release("ml-100k", "movielens-100k",
                "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", 4_924_029),
        Release("ml-1m", "movielens-dat",
                "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", 5_917_549),
        Release("ml-10m", "movielens-dat", None, None, folder="ml-10M100K"),
        Release("ml-20m", "movielens-csv",
                "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", 198_702_078),
        Release("ml-25m", "movielens-csv",
                "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", 261_978_986),
    ]
}  # fmt: skip


class CorruptZipError(DownloadError):
    """The zip cannot be read: no use keeping it."""


@dataclass(frozen=True)
class DownloadResult:
    name: str
    format: str
    zip_path: Path
    folder: Path
    sha256: str
    verified: bool
    resumed_from: int  # bytes already in the .part file when this download started
    downloaded: int  # bytes fetched by this call
    seconds: float


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> tuple[int, int]:
    """Fetch ``url`` into ``part``, resuming from its current size. Returns (resumed_from, bytes fetched)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "genrec-edge"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return offset, 0  # the .part already holds the whole file; the checksum decides
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url}: {reason}") from None
    except ValueError as exc:  # "unknown url type": a base URL without a scheme
        raise DownloadError(f"cannot download {url}: {exc} (the base URL must start with https:// or http://)") from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header: start over
        elif offset:
            answered = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if answered is None or int(answered.group(1)) != offset:
                part.unlink()
                raise DownloadError(
                    f"{url}: asked for the bytes from {offset}, the server sent "
                    f"{response.headers.get('Content-Range', 'no Content-Range')!r}; deleted the partial download: "
                    "run again to start over"
                )
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        fetched = 0
        with open(part, "ab" if offset else "wb") as out, byte_bar(part.name, total, done=offset, enabled=progress, speed=True) as advance:
            try:
                while block := response.read(CHUNK_BYTES):
                    out.write(block)
                    fetched += len(block)
                    advance(len(block))
            except (OSError, urllib.error.URLError) as exc:
                raise DownloadError(
                    f"download of {url} interrupted after {offset + fetched} bytes ({exc}); run again to resume"
                ) from None
        if length and length.isdigit() and fetched != int(length):
            raise DownloadError(
                f"download of {url} interrupted after {offset + fetched} bytes; run again to resume"
            )
    return offset, fetched


def safe_extract(zip_path: Path, dest: Path, top: str, required: tuple[str, ...] = ()) -> Path:
    """Extract ``zip_path``, whose members must all lie in the folder ``top``, into ``dest/top``; returns it.

    Refuses absolute paths, ``..``, symbolic links, members outside ``top`` and a zip without the
    ``required`` files, before writing anything. Files the zip holds replace those of an earlier extraction;
    anything else in ``dest/top`` (a database, notes) is left as it is. A corrupt zip raises
    :class:`DownloadError`.
    """
    dest = dest.resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptZipError(f"{zip_path}: not a valid zip file ({exc})") from None
    with archive:
        members = archive.infolist()
        outside = set()
        for member in members:
            name = PurePosixPath(member.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", member.filename):
                raise DownloadError(f"{zip_path}: refusing unsafe member path {member.filename!r}")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise DownloadError(f"{zip_path}: refusing symbolic link member {member.filename!r}")
            if name.parts[0] != top:
                outside.add(name.parts[0])
        if outside:
            raise DownloadError(f"{zip_path}: a release zip holds one folder, {top}/; this one also holds "
                                f"{', '.join(sorted(outside)[:3])}: refusing to extract it")
        names = {PurePosixPath(m.filename.replace("\\", "/")).as_posix() for m in members if not m.is_dir()}
        missing = [f for f in required if f"{top}/{f}" not in names]
        if missing:
            raise DownloadError(f"{zip_path}: no {', '.join(missing)} in {top}/: not this release's zip")
        staging = dest / f".{zip_path.stem}.extracting"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for member in members:
                target = (staging / member.filename).resolve()
                if not target.is_relative_to(staging.resolve()):
                    raise DownloadError(f"{zip_path}: refusing unsafe member path {member.filename!r}")
                try:
                    archive.extract(member, staging)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise CorruptZipError(f"{zip_path}: corrupt zip ({exc})") from None
            final = dest / top
            for source in sorted((staging / top).rglob("*")):
                target = final / source.relative_to(staging / top)
                if source.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif target.is_dir():
                    raise DownloadError(f"{target} is a folder; the zip holds a file there")
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def download(
    name: str,
    dest: str | Path | None = None,
    *,
    sha256: str | None = None,
    no_verify: bool = False,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadResult:
    """Download, verify and extract the MovieLens release ``name`` into ``dest``.

    ``sha256`` overrides the pinned checksum; a release without one needs ``sha256`` or ``no_verify``.
    A checksum mismatch deletes the download and extracts nothing. Example: ``download("ml-1m", "data")``.
    """
    from .paths import downloads_dir

    release = RELEASES.get(name)
    if release is None:
        raise UsageError(f"unknown MovieLens release {name!r} (choose from {', '.join(RELEASES)})")
    if sha256 is not None and no_verify:
        raise UsageError("--sha256 and --no-verify contradict each other: give one")
    expected = None
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise UsageError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    elif not no_verify:
        expected = release.sha256
        if expected is None:
            raise UsageError(
                f"no pinned sha256 for {name}: pass --sha256 HEX, or --no-verify to download it unverified "
                "(the computed sha256 is printed)"
            )
    base = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    dest = Path(dest) if dest is not None else downloads_dir()
    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / f"{name}.zip"
    part = dest / f"{name}.zip.part"

    started = time.perf_counter()
    resumed_from = fetched = 0
    if not zip_path.exists():
        resumed_from, fetched = _fetch(url, part, timeout, progress)
        source = part
    else:
        source = zip_path  # downloaded before: verify it again before extracting
    actual = sha256_file(source)
    if expected is not None and actual != expected:
        source.unlink()
        earlier = dest / release.top
        raise DownloadError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
            "deleted the download and extracted nothing"
            + (f" ({earlier} is from an earlier download, left as it was)" if earlier.exists() else "")
        )
    if source == part:
        os.replace(part, zip_path)
    from .ingest import MOVIELENS_FILES

    try:
        folder = safe_extract(zip_path, dest, release.top, MOVIELENS_FILES[release.format])
    except CorruptZipError as exc:  # useless: fetch it anew next time
        zip_path.unlink(missing_ok=True)
        raise DownloadError(f"{exc}; deleted it: run again to download it anew") from None
    return DownloadResult(
        name, release.format, zip_path, folder, actual, expected is not None, resumed_from, fetched,
        time.perf_counter() - started,
    )  # fmt: skip
