"""The downloader against a real local HTTP server with Range support: resume, verify, safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import shlex
import threading
import zipfile

import pytest
from conftest import write_tiny_movielens

from genrec_edge.cli import main
from genrec_edge.download import RELEASES, download
from genrec_edge.errors import DownloadError, UsageError
from genrec_edge.history import HistoryDB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (name -> bytes) with Range support; ``cut_after`` truncates the first response."""

    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None]] = []
    cut_after: int | None = None
    wrong_range = False  # answer a Range request with 206 and the bytes from 0

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        range_header = self.headers.get("Range")
        type(self).log.append((name, range_header))
        body = self.files.get(name)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if range_header:
            start = 0 if type(self).wrong_range else int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if type(self).cut_after is not None:
            payload = payload[: type(self).cut_after]
            type(self).cut_after = None
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.log, RangeHandler.cut_after, RangeHandler.wrong_range = {}, [], None, False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/datasets/movielens"
    httpd.shutdown()
    httpd.server_close()


def release_zip(tmp_path, top="ml-latest-small", release=None) -> bytes:
    """A tiny zip shaped like the release ``release`` (default: the one named ``top``): its files in ``top/``."""
    fmt = RELEASES[release or top].format
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # stored: the bytes are big enough to cut
        if fmt == "movielens-csv":
            folder = write_tiny_movielens(tmp_path / "src" / top)
            for name in ("movies.csv", "ratings.csv"):
                archive.write(folder / name, f"{top}/{name}")
        elif fmt == "movielens-dat":
            archive.writestr(f"{top}/movies.dat", "1::Toy Story (1995)::Comedy\n2::Heat (1995)::Crime\n" * 50)
            archive.writestr(f"{top}/ratings.dat", "1::1::5::978300760\n1::2::3::978300761\n" * 50)
        else:
            archive.writestr(f"{top}/u.item", "1|Toy Story (1995)|||||" + "|".join("0" * 19) + "\n")
            archive.writestr(f"{top}/u.data", "1\t1\t5\t881250949\n")
    return buffer.getvalue()


def test_pins_are_hex_or_none():
    assert set(RELEASES) == {"ml-latest-small", "ml-latest", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m"}
    for release in RELEASES.values():
        assert release.sha256 is None or (len(release.sha256) == 64 and int(release.sha256, 16) >= 0)
    assert RELEASES["ml-latest"].sha256 is None and RELEASES["ml-10m"].sha256 is None


def test_resumes_a_partial_download_then_extracts_and_ingests(server, tmp_path):
    body = release_zip(tmp_path)
    digest = hashlib.sha256(body).hexdigest()
    RangeHandler.files["ml-latest-small.zip"] = body
    dest = tmp_path / "dl"
    dest.mkdir()
    half = len(body) // 2
    (dest / "ml-latest-small.zip.part").write_bytes(body[:half])

    result = download("ml-latest-small", dest, sha256=digest, base_url=server, progress=False)
    assert RangeHandler.log == [("ml-latest-small.zip", f"bytes={half}-")]
    assert (result.resumed_from, result.downloaded) == (half, len(body) - half)
    assert result.verified and result.sha256 == digest and result.format == "movielens-csv"
    assert (dest / "ml-latest-small.zip").read_bytes() == body
    assert not (dest / "ml-latest-small.zip.part").exists()
    assert result.folder == (dest / "ml-latest-small").resolve() or result.folder == dest.resolve() / "ml-latest-small"
    assert (result.folder / "movies.csv").read_text(encoding="utf-8").startswith("movieId,title,genres")

    from genrec_edge.ingest import ingest

    report = ingest(tmp_path / "d.db", result.format, result.folder, progress=False)
    assert report.items == 20
    with HistoryDB.open(tmp_path / "d.db") as db:
        assert db.item(130).title.startswith("Amélie")


def test_the_printed_ingest_command_ingests_the_download(server, tmp_path, capsys):
    """`data download NAME` ends with the command to ingest it: `data ingest NAME FOLDER`, the same name."""
    body = release_zip(tmp_path)
    RangeHandler.files["ml-latest-small.zip"] = body
    sha = hashlib.sha256(body).hexdigest()
    assert main(["data", "download", "ml-latest-small", "--dest", str(tmp_path / "dl"), "--sha256", sha,
                 "--base-url", server]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    prefix = "extracted to "
    assert hint.startswith(prefix) and "; ingest with: genrec-edge data ingest ml-latest-small " in hint
    command = shlex.split(hint.split("; ingest with: ", 1)[1])
    assert command[:4] == ["genrec-edge", "data", "ingest", "ml-latest-small"]
    assert command[5:] == ["--db", str((tmp_path / "dl" / "ml-latest-small.db").resolve())]  # its own database
    assert main(command[1:]) == 0
    assert "20 new items, 8 new users" in capsys.readouterr().out


def test_an_interrupted_download_is_resumed_by_the_next_call(server, tmp_path, monkeypatch):
    body = release_zip(tmp_path, top="ml-1m")
    RangeHandler.files["ml-1m.zip"] = body
    RangeHandler.cut_after = 1000
    monkeypatch.setenv("GENREC_EDGE_MOVIELENS_URL", server)
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError, match=r"interrupted after 1000 bytes; run again to resume$"):
        download("ml-1m", dest, no_verify=True, progress=False)
    assert (dest / "ml-1m.zip.part").stat().st_size == 1000
    result = download("ml-1m", dest, no_verify=True, progress=False)
    assert RangeHandler.log == [("ml-1m.zip", None), ("ml-1m.zip", "bytes=1000-")]
    assert result.resumed_from == 1000 and not result.verified
    assert result.sha256 == hashlib.sha256(body).hexdigest()


def test_checksum_mismatch_is_refused_and_nothing_extracted(server, tmp_path, capsys):
    RangeHandler.files["ml-100k.zip"] = release_zip(tmp_path, top="ml-100k")
    dest = tmp_path / "dl"
    wrong = "0" * 64
    rc = main(["data", "download", "ml-100k", "--dest", str(dest), "--sha256", wrong, "--base-url", server])
    assert rc == DownloadError.exit_code == 10
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: checksum mismatch for {server}/ml-100k.zip: expected sha256 {wrong}, got ")
    assert err.endswith("; deleted the download and extracted nothing")
    assert sorted(p.name for p in dest.iterdir()) == []
    # The pinned checksum of the real ml-100k does not match our fixture either.
    with pytest.raises(DownloadError, match=f"expected sha256 {RELEASES['ml-100k'].sha256}"):
        download("ml-100k", dest, base_url=server, progress=False)


def test_unpinned_release_needs_sha256_or_no_verify(server, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"^no pinned sha256 for ml-10m: pass --sha256 HEX, or --no-verify"):
        download("ml-10m", tmp_path, base_url=server, progress=False)
    assert RangeHandler.log == []  # refused before any request
    body = release_zip(tmp_path, top="ml-10M100K", release="ml-10m")  # ml-10m's zip holds "ml-10M100K/"
    RangeHandler.files["ml-10m.zip"] = body
    rc = main(["data", "download", "ml-10m", "--dest", str(tmp_path / "dl"), "--no-verify", "--base-url", server])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"sha256 {hashlib.sha256(body).hexdigest()} (NOT verified)" in out
    assert (tmp_path / "dl" / "ml-10M100K" / "ratings.dat").exists()
    with pytest.raises(UsageError, match="unknown MovieLens release 'ml-5m'"):
        download("ml-5m", tmp_path, progress=False)
    with pytest.raises(UsageError, match="--sha256 must be 64 hex digits"):
        download("ml-1m", tmp_path, sha256="abc", progress=False)


def test_http_errors_are_one_line(server, tmp_path, capsys):
    rc = main(["data", "download", "ml-25m", "--dest", str(tmp_path), "--base-url", server])
    assert rc == 10
    assert capsys.readouterr().err.strip() == f"error: {server}/ml-25m.zip: HTTP 404 Not Found"
    with pytest.raises(DownloadError, match=r"^cannot download http://127\.0\.0\.1:9/ml-1m\.zip: "):
        download("ml-1m", tmp_path, base_url="http://127.0.0.1:9", progress=False)


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_path_traversal_is_refused(server, tmp_path, member):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-1m/movies.dat", "1::A (1999)::Drama\n")
        archive.writestr(member, "pwned")
    RangeHandler.files["ml-1m.zip"] = buffer.getvalue()
    dest = tmp_path / "deep" / "dl"
    with pytest.raises(DownloadError, match="refusing unsafe member path"):
        download("ml-1m", dest, no_verify=True, base_url=server, progress=False)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (dest / "ml-1m").exists()


def test_symlink_member_is_refused(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("ml-1m/link")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    RangeHandler.files["ml-1m.zip"] = buffer.getvalue()
    with pytest.raises(DownloadError, match="refusing symbolic link member 'ml-1m/link'"):
        download("ml-1m", tmp_path / "dl", no_verify=True, base_url=server, progress=False)


def test_downloading_again_keeps_what_the_user_put_in_the_release_folder(server, tmp_path):
    body = release_zip(tmp_path)
    RangeHandler.files["ml-latest-small.zip"] = body
    dest = tmp_path / "dl"
    first = download("ml-latest-small", dest, sha256=hashlib.sha256(body).hexdigest(), base_url=server, progress=False)
    (first.folder / "my.db").write_bytes(b"precious")
    (first.folder / "movies.csv").write_text("edited")
    again = download("ml-latest-small", dest, sha256=hashlib.sha256(body).hexdigest(), base_url=server, progress=False)
    assert again.folder == first.folder
    assert (again.folder / "my.db").read_bytes() == b"precious"  # it used to delete the whole folder
    assert (again.folder / "movies.csv").read_text(encoding="utf-8").startswith("movieId,title")  # the zip's file


def test_a_zip_with_another_folder_or_without_the_release_files_is_refused(server, tmp_path):
    dest = tmp_path / "dl"
    (dest / "foo").mkdir(parents=True)
    (dest / "foo" / "precious.txt").write_text("keep")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("foo/movies.csv", "movieId,title,genres\n")
        archive.writestr("foo/ratings.csv", "userId,movieId,rating,timestamp\n")
    RangeHandler.files["ml-latest-small.zip"] = buffer.getvalue()
    with pytest.raises(DownloadError, match=r"holds one folder, ml-latest-small/; this one also holds foo"):
        download("ml-latest-small", dest, no_verify=True, base_url=server, progress=False)
    assert (dest / "foo" / "precious.txt").read_text() == "keep"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-1m/movies.dat", "1::A (1999)::Drama\n")
    RangeHandler.files["ml-1m.zip"] = buffer.getvalue()
    with pytest.raises(DownloadError, match=r"ml-1m.zip: no ratings.dat in ml-1m/: not this release's zip"):
        download("ml-1m", dest, no_verify=True, base_url=server, progress=False)
    assert not (dest / "ml-1m").exists()


def test_a_corrupt_or_non_zip_download_is_deleted_so_the_next_run_fetches_it_again(server, tmp_path, capsys):
    body = release_zip(tmp_path)
    at = body.index(b"movieId,title")
    corrupt = body[:at] + b"X" + body[at + 1:]  # the same length: only the CRC can tell
    dest = tmp_path / "dl"
    for bad in (corrupt, b"<html>Not Found</html>"):
        RangeHandler.files["ml-latest-small.zip"] = bad
        rc = main(["data", "download", "ml-latest-small", "--dest", str(dest), "--no-verify", "--base-url", server])
        err = capsys.readouterr().err
        assert rc == DownloadError.exit_code and "Traceback" not in err and err.count("\n") == 1, err
        assert "deleted it: run again to download it anew" in err
        assert not (dest / "ml-latest-small.zip").exists() and not (dest / "ml-latest-small").exists()
    RangeHandler.files["ml-latest-small.zip"] = body
    assert download("ml-latest-small", dest, no_verify=True, base_url=server, progress=False).folder.is_dir()


def test_a_wrong_content_range_or_base_url_is_one_line(server, tmp_path):
    body = release_zip(tmp_path)
    RangeHandler.files["ml-latest-small.zip"] = body
    RangeHandler.wrong_range = True
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "ml-latest-small.zip.part").write_bytes(body[:100])
    with pytest.raises(DownloadError, match=r"asked for the bytes from 100, the server sent 'bytes 0-.*deleted the "
                                            r"partial download: run again to start over"):
        download("ml-latest-small", dest, no_verify=True, base_url=server, progress=False)
    assert not (dest / "ml-latest-small.zip.part").exists()
    with pytest.raises(DownloadError, match=r"cannot download not-a-url/ml-1m.zip: unknown url type"):
        download("ml-1m", dest, no_verify=True, base_url="not-a-url", progress=False)
    with pytest.raises(UsageError, match="--sha256 and --no-verify contradict each other"):
        download("ml-1m", dest, sha256="0" * 64, no_verify=True, base_url=server, progress=False)
