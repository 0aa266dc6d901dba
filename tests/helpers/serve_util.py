"""Helpers for the serving tests and bench/serve.py: a `samprobe serve` subprocess on a free
loopback port, real photos as upload bytes, and comparing answers with ``Classifier.predict``."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from helpers.images import photos

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"serve: http://[^\s:]+:(\d+) ")
# Features are rounded to float16 (the cache dtype) after a forward pass whose fp32 rounding can
# depend on the other images of the batch: a feature may land one fp16 step (2^-10 relative) away.
# Scores are probabilities (magnitude <= 1), so two steps bound what that does to them.
SCORE_TOL = 2 * float(np.finfo(np.float16).eps)


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed and an error if it does not exit in ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.log_text()[-3000:]
            raise RuntimeError(
                f"the server did not exit {timeout} s after SIGTERM; log:\n{tail}"
            ) from None


def launch(command: Sequence[str], log: Path) -> subprocess.Popen:
    """Start ``command`` with stdout and stderr to ``log`` (this checkout's src first on the path)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 180) -> Server:
    """Wait for samprobe serve's "serve: http://HOST:PORT" line (it was started with --port 0), then
    until GET /ready answers 200; kills the process if it does not."""
    end, port = time.monotonic() + timeout, None
    while time.monotonic() < end and proc.poll() is None:
        if port is None:
            found = LISTENING.search(log.read_text(errors="replace"))
            port = int(found.group(1)) if found else None
        if port is not None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    return Server(proc, port, log)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"server did not become ready (exit {proc.returncode}); log:\n{tail}")


def start_server(command: Sequence[str], log: Path, timeout: float = 180) -> Server:
    return wait_ready(launch(command, log), log, timeout)


def serve_command(checkpoint: Path, *args: str, device: str = "cpu") -> list[str]:
    return [
        sys.executable,
        "-m",
        "samprobe",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        "0",
        "--device",
        device,
        *args,
    ]


def encode(image: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def small_photos(side: int = 96) -> list[np.ndarray]:
    """Real photos (skimage) shrunk so the longest side is ``side``: small uploads, real content."""
    out = []
    for arr in photos().values():
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
        img.thumbnail((side, side), Image.Resampling.BILINEAR)
        out.append(np.asarray(img))
    return out


def decoded(data: bytes) -> np.ndarray:
    """What the server decodes from ``data`` (and what ``Classifier.predict`` decodes from the file)."""
    from samprobe.data.images import decode_rgb

    return decode_rgb(data)


def mismatch(got: dict[str, Any], ref: Any, tol: float = SCORE_TOL) -> str | None:
    """None when a /predict answer for one image (``{"label", "score", "top_k"}``) is the
    ``Prediction`` ``ref``: same classes in the same order (a swap only between scores within
    ``tol`` of each other), every score within ``tol``; otherwise what differs."""
    got_top = [(t["label"], t["score"]) for t in got["top_k"]]
    if len(got_top) != len(ref.top_k):
        return f"top_k has {len(got_top)} entries, Classifier.predict gives {len(ref.top_k)}"
    if got["label"] != got_top[0][0] or abs(got["score"] - got_top[0][1]) > 0:
        return f"label/score {got['label']}/{got['score']} is not the first of top_k {got_top[0]}"
    ref_score = dict(ref.top_k)
    for rank, ((name, score), (ref_name, ref_s)) in enumerate(zip(got_top, ref.top_k)):
        if name not in ref_score or abs(score - ref_score[name]) > tol:
            return f"rank {rank}: {name} {score:.6f}, Classifier.predict has {ref_name} {ref_s:.6f}"
        if name != ref_name and abs(ref_score[name] - ref_s) > tol:
            return f"rank {rank}: {name}, Classifier.predict has {ref_name} ({ref_s:.6f} vs {ref_score[name]:.6f})"
    return None


class InProcessServer:
    """A ``create_app`` app on uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        from samprobe.serve import _listen

        self.sock = _listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("in-process server did not become ready")

    def rss_mb(self) -> float:
        """This process's: the server's and the test's together."""
        return rss_mb()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
