"""Weights download against a loopback HTTP server: full, resumed, corrupt, unreachable."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from samprobe.backbones.download import CATALOGUE, OFFICIAL_WEIGHTS, download_weights
from samprobe.errors import ConfigError, DownloadError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, not a multiple of the read chunk
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path; honours ``Range: bytes=N-``; records requests on the server."""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self.server.requests.append(dict(self.headers))
        body, status = PAYLOAD, 200
        rng = self.headers.get("Range")
        if rng and self.server.ranges:
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            body, status = PAYLOAD[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header(
                "Content-Range",
                f"bytes {len(PAYLOAD) - len(body)}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}",
            )
        self.end_headers()
        # ``cut``: drop the connection after that many bytes, as a flaky network would
        self.wfile.write(body[: self.server.cut] if self.server.cut else body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server():
    def start(ranges: bool = True, cut: int = 0):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.requests, srv.ranges, srv.cut = [], ranges, cut
        # poll_interval: shutdown() waits up to one interval (the default 0.5 s, per test)
        threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/sam_vit_b_01ec64.pth"

    started: list = []
    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def test_official_table():
    for name, (url, md5) in OFFICIAL_WEIGHTS.items():
        assert url.startswith("https://dl.fbaipublicfiles.com/segment_anything/" + name)
        assert len(md5) == 32 and md5[:6] in url  # the file name carries the MD5's first six digits


def test_download_verifies_and_renames(server, tmp_path):
    _, url = server()
    path = download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert path == tmp_path / "sam_vit_b_01ec64.pth" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "sam_vit_b_01ec64.pth.part").exists()


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    srv, url = server()
    download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert len(srv.requests) == 1


def test_resume_from_part_with_range(server, tmp_path):
    srv, url = server()
    (tmp_path / "sam_vit_b_01ec64.pth.part").write_bytes(PAYLOAD[:300_001])
    path = download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert srv.requests[0].get("Range") == "bytes=300001-"


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    srv, url = server(cut=500_000)
    with pytest.raises(DownloadError, match="stopped at 500000"):
        download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert (tmp_path / "sam_vit_b_01ec64.pth.part").stat().st_size == 500_000
    assert not (tmp_path / "sam_vit_b_01ec64.pth").exists()
    srv.cut = 0
    path = download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD and srv.requests[-1].get("Range") == "bytes=500000-"


def test_server_without_range_support_restarts(server, tmp_path):
    srv, url = server(ranges=False)
    (tmp_path / "sam_vit_b_01ec64.pth.part").write_bytes(b"garbage" * 10)
    path = download_weights("sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_removes_part(server, tmp_path):
    _, url = server()
    with pytest.raises(DownloadError, match="expected 0123") as err:
        download_weights(
            "sam_vit_b", tmp_path, url=url, expected_md5="0123" + "0" * 28, progress=False
        )
    assert MD5 in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sam_vit_b_01ec64.pth"
    with pytest.raises(DownloadError) as err:
        download_weights(
            "sam_vit_b", tmp_path, url=url, expected_md5=MD5, progress=False, timeout=5
        )
    assert url in err.value.message and "backbone.checkpoint" in err.value.fix


def test_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="sam_vit_x"):
        download_weights("sam_vit_x", tmp_path)


def test_cli_download_checksum_mismatch_exits_2(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from samprobe.cli import main

    _, url = server()  # serves bytes whose MD5 is not the official vit_b one
    assert main(["weights", "download", "sam_vit_b", "--dir", str(tmp_path), "--url", url]) == 2
    err = capsys.readouterr().err
    assert "MD5" in err and OFFICIAL_WEIGHTS["sam_vit_b"][1] in err and "backbone.checkpoint" in err
    assert not any(tmp_path.iterdir())  # neither a final file nor a .part left behind


def test_catalogue_covers_every_family_with_official_urls():
    assert {e.family for e in CATALOGUE.values()} >= {
        "sam1",
        "sam2",
        "sam_hq",
        "mobile_sam",
        "efficientvit_sam",
    }
    for name, entry in CATALOGUE.items():
        assert entry.url.startswith("https://") and entry.source
        # only SAM 1 publishes checksums
        assert (entry.md5 is not None) == (entry.family == "sam1"), name


def test_unpublished_checksum_is_recorded_on_first_download_then_enforced(server, tmp_path):
    srv, url = server()
    path = download_weights("mobile_sam", tmp_path, url=url, progress=False)
    assert path.name == "mobile_sam.pt" and path.read_bytes() == PAYLOAD
    record = tmp_path / "mobile_sam.pt.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(PAYLOAD).hexdigest()
    n = len(srv.requests)
    # verified, not fetched
    assert download_weights("mobile_sam", tmp_path, url=url, progress=False) == path
    assert len(srv.requests) == n
    # the file changed: fetched again, matches the record
    path.write_bytes(b"corrupted" + PAYLOAD[9:])
    assert download_weights("mobile_sam", tmp_path, url=url, progress=False).read_bytes() == PAYLOAD
    # the record disagrees with what the server sends
    record.write_text("0" * 64 + "  mobile_sam.pt\n")
    path.unlink()
    with pytest.raises(DownloadError, match="recorded 0000"):
        download_weights("mobile_sam", tmp_path, url=url, progress=False)
    assert not path.exists() and not (tmp_path / "mobile_sam.pt.part").exists()


def test_cli_weights_list_names_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from samprobe.cli import main

    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for name, entry in CATALOGUE.items():
        assert name in out and entry.url in out
