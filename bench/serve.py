"""Serving throughput: `samprobe serve` (dynamic batching) vs one-request-one-forward services.

Run from the repo root:  PYTHONPATH=src python bench/serve.py [--quick] [--requests 400] [--concurrency 32]

Two heads: the demo's (efficientnet_lite0, real ImageNet weights, trained on the digit scans by the
demo pipeline) and one on a tiny SAM encoder (random weights in the official format). Each is
served three ways, all on loopback, all by uvicorn in their own processes:

- ``samprobe``: `samprobe serve` (batches of up to --max-batch images within --max-wait-ms);
- ``baseline``: the service a user writes around ``Classifier.predict`` today, a FastAPI
  endpoint (a plain ``def``, which FastAPI runs on its thread pool) doing one forward per request;
- ``unbatched``: `samprobe serve --max-batch 1`, the same service with batching off.

One httpx async client sends the same real photos (skimage.data, JPEG) as multipart uploads,
``--requests`` per side from ``--concurrency`` connections; the sides take turns in rounds
(A B C, C B A, ...) so a change in machine load hits all of them alike. Every samprobe answer
is compared with ``Classifier.predict`` on the same decoded image. Ends with one JSON line;
``ratios.vs_baseline`` = samprobe throughput / baseline throughput (the lower of the two heads).
"""

from __future__ import annotations

import os

# as the CLI sets it, for the in-process reference model
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# module level: FastAPI resolves the endpoint's annotations here
from fastapi import Form, UploadFile

# helpers.sam_factory, helpers.serve_util
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGETS = {"vs_baseline": 3.0}


def baseline_server(checkpoint: str, port: int, device: str) -> None:
    """The naive service: one request, one forward (prints serve's "listening" line for the harness)."""
    import uvicorn
    from fastapi import FastAPI

    from samprobe.data.images import decode_rgb
    from samprobe.predict import Classifier
    from samprobe.serve import _listen, prediction_json

    clf = Classifier.load(checkpoint, device=device)
    app = FastAPI()

    @app.post("/predict")
    def predict(image: UploadFile, top_k: int = Form(5)) -> dict[str, Any]:
        return {
            "predictions": [
                prediction_json(p)
                for p in clf.predict([decode_rgb(image.file.read())], top_k=top_k)
            ]
        }

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    sock = _listen("127.0.0.1", port)
    print(f"serve: http://127.0.0.1:{sock.getsockname()[1]} baseline", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


# ---------------------------------------------------------------------------------------


def train_heads(root: Path, quick: bool) -> dict[str, Path]:
    """The demo's efficientnet head (its pipeline and config) and a tiny SAM head on the same scans."""
    from helpers.sam_factory import write_official_checkpoint
    from samprobe.config import load_config
    from samprobe.demo import DEMO_CONFIG, write_digits_dataset
    from samprobe.pipeline import run_extract, run_train, run_validate

    metadata, _ = write_digits_dataset(root / "data")
    if quick:  # keep every class, fewer scans
        with open(metadata) as f:
            rows = list(csv.reader(f))
        with open(metadata, "w", newline="") as f:
            csv.writer(f).writerows(rows[:1] + rows[1:401])
    heads = {}
    sam_weights = write_official_checkpoint(root / "weights" / "sam_tiny.pth", "tiny", img_size=256)
    sam_backbone = f"backbone:\n  name: sam\n  checkpoint: {sam_weights}\n  img_size: 256\n"
    sam_config = re.sub(r"backbone:\n(  .*\n)+", sam_backbone, DEMO_CONFIG).replace(
        "run_dir: run", "run_dir: run_sam"
    )
    for name, text in (("efficientnet", DEMO_CONFIG), ("sam_tiny", sam_config)):
        cfg_path = root / f"{name}.yaml"
        cfg_path.write_text(text.format(cfg=cfg_path))
        cfg = load_config(cfg_path, ["train.epochs=30"] if quick else [])
        run_validate(cfg)
        run_extract(cfg)
        run_train(cfg)
        heads[name] = cfg.run_dir / "checkpoints" / "best.pt"
    return heads


def bench_photos() -> list[bytes]:
    """Real photos as JPEG uploads (quality 90), at their own sizes (300x451 to 512x512)."""
    from skimage import data

    from helpers.serve_util import encode

    arrays = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.cat(),
        data.immunohistochemistry(),
    ]
    return [encode(np.ascontiguousarray(a[..., :3]), "JPEG", quality=90) for a in arrays]


def upload_requests(uploads: list[bytes]) -> list[tuple[list[tuple[bytes, bytes]], bytes]]:
    """Each photo's POST /predict (multipart, top_k 3) as (headers, body), built once by httpx's
    own encoder: the load loop then only sends bytes."""
    import httpx

    out = []
    for k, data in enumerate(uploads):
        req = httpx.Request(
            "POST",
            "http://127.0.0.1/predict",
            files={"image": (f"photo{k}.jpg", data, "image/jpeg")},
            data={"top_k": "3"},
        )
        body = req.read()
        headers = [(b"host", b"127.0.0.1")] + [
            (name, value) for name, value in req.headers.raw if name.lower() != b"host"
        ]
        out.append((headers, body))
    return out


async def post(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: Any,
    request: tuple[list[tuple[bytes, bytes]], bytes],
) -> tuple[int, Any]:
    """One POST /predict on a kept-alive connection, HTTP/1.1 framed by h11 -> (status, JSON)."""
    import h11

    headers, body = request
    writer.write(conn.send(h11.Request(method="POST", target="/predict", headers=headers)))
    writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    status, chunks = 0, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, json.loads(b"".join(chunks))


async def load_run(
    url: str, uploads: list[bytes], n: int, concurrency: int, offset: int
) -> dict[str, Any]:
    """``n`` POST /predict from ``concurrency`` kept-alive connections; latencies, wall time,
    answers by upload.

    The client is asyncio streams + h11 (the HTTP/1.1 state machine under httpx and uvicorn) on
    requests encoded once: it shares the CPUs with the servers, and httpx's per-request work (the
    multipart encoding, its connection pool) made the client the bottleneck (samprobe's server was
    idle ~80 % of a run, py-spy at load 11 on 2 cores)."""
    import h11

    requests = upload_requests(uploads)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    answers: list[tuple[int, int | str, Any]] = []
    counter = iter(range(n))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        conn = h11.Connection(h11.CLIENT)
        try:
            for i in counter:
                k = (offset + i) % len(uploads)
                start = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        post(reader, writer, conn, requests[k]), 120
                    )
                except (OSError, TimeoutError, h11.ProtocolError) as exc:  # a failed request
                    answers.append((k, f"{type(exc).__name__}: {exc}", None))
                    return
                latencies.append(time.perf_counter() - start)
                answers.append((k, status, body))
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall, "answers": answers}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc): what a request costs
    the server whatever else runs on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = float(re.search(r"^samprobe_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^samprobe_batch_size_count (\S+)", text, re.M).group(1))
    return total, count


def summarize(latencies: list[float], wall: float) -> dict[str, float]:
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "throughput_rps": round(len(lat) / wall, 2),
        **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)},
    }


def bench_head(
    name: str, checkpoint: Path, uploads: list[bytes], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    from helpers.serve_util import decoded, mismatch, serve_command, start_server
    from samprobe.predict import Classifier

    common = [
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--workers",
        str(args.workers),
        "--max-queue",
        "256",
    ]
    commands = {
        "samprobe": serve_command(
            checkpoint, "--max-batch", str(args.max_batch), *common, device=args.device
        ),
        "baseline": [
            sys.executable,
            __file__,
            "--baseline-server",
            str(checkpoint),
            "--device",
            args.device,
        ],
        "unbatched": serve_command(checkpoint, "--max-batch", "1", *common, device=args.device),
    }
    servers = {}
    try:
        for side, cmd in commands.items():
            # 600 s: on the shared 2-core machine a server took over 180 s to load at load 12
            servers[side] = start_server(cmd, tmp / f"{name}-{side}.log", timeout=600)
        for (
            server
        ) in servers.values():  # warm-up: the batch sizes the run will see, the thread pools
            asyncio.run(load_run(server.url, uploads, 2 * args.concurrency, args.concurrency, 0))
        before = batch_stats(servers["samprobe"].url)
        cpu_before = {side: cpu_seconds(s.proc.pid) for side, s in servers.items()}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in servers}
        per_round = args.requests // args.rounds
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for side in order:
                runs[side].append(
                    asyncio.run(
                        load_run(
                            servers[side].url, uploads, per_round, args.concurrency, r * per_round
                        )
                    )
                )
        after = batch_stats(servers["samprobe"].url)
        cpu = {side: cpu_seconds(s.proc.pid) - cpu_before[side] for side, s in servers.items()}
    finally:
        exits = {side: s.stop() for side, s in servers.items()}
    del exits["baseline"]  # plain uvicorn: killed by the SIGTERM it re-raises
    clf = Classifier.load(checkpoint, device=args.device)
    reference = [clf.predict([decoded(u)], top_k=3)[0] for u in uploads]
    out: dict[str, Any] = {}
    problems = []
    for side, side_runs in runs.items():
        latencies = [x for run in side_runs for x in run["latencies"]]
        out[side] = summarize(latencies, sum(run["wall"] for run in side_runs))
        out[side]["server_cpu_ms_per_request"] = round(1000 * cpu[side] / len(latencies), 1)
        answers = [a for run in side_runs for a in run["answers"]]
        out[side]["failed"] = sum(status != 200 for _, status, _ in answers)
        for k, status, body in answers:
            why = (
                f"HTTP {status}: {body}"
                if status != 200
                else mismatch(body["predictions"][0], reference[k])
            )
            if why:
                problems.append(f"{side} photo {k}: {why}")
    images, batches = after[0] - before[0], after[1] - before[1]
    out["samprobe"]["mean_batch"] = round(images / batches, 2) if batches else None
    out["ratios"] = {
        "vs_baseline": round(
            out["samprobe"]["throughput_rps"] / out["baseline"]["throughput_rps"], 2
        ),
        "vs_unbatched": round(
            out["samprobe"]["throughput_rps"] / out["unbatched"]["throughput_rps"], 2
        ),
        "p99_vs_baseline": round(out["samprobe"]["p99_ms"] / out["baseline"]["p99_ms"], 2),
        # requests per server CPU-second, samprobe / baseline: the capacity ratio on a machine of
        # its own
        "cpu_vs_baseline": round(
            out["baseline"]["server_cpu_ms_per_request"]
            / out["samprobe"]["server_cpu_ms_per_request"],
            2,
        ),
        "cpu_vs_unbatched": round(
            out["unbatched"]["server_cpu_ms_per_request"]
            / out["samprobe"]["server_cpu_ms_per_request"],
            2,
        ),
    }
    out["predictions_equal"] = not problems
    out["problems"] = problems[:5]
    out["exit_codes"] = exits
    # partial results, as each head ends
    print(json.dumps({"head": name, **out}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="400 demo scans, 30 epochs, 128 requests per side"
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per side (default 400; --quick 128)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument(
        "--keep", metavar="DIR", help="write the runs and the server logs here, and keep them"
    )
    parser.add_argument("--baseline-server", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server, 0, args.device)
        return
    args.requests = args.requests or (128 if args.quick else 400)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="samprobe-bench-serve-") as tmp:
        tmp_path = Path(args.keep) if args.keep else Path(tmp)
        tmp_path.mkdir(parents=True, exist_ok=True)
        from samprobe.logs import setup_console

        setup_console()
        t0 = time.perf_counter()
        heads = train_heads(tmp_path / "runs", args.quick)
        train_s = time.perf_counter() - t0
        uploads = bench_photos()
        results = {
            name: bench_head(name, ckpt, uploads, args, tmp_path) for name, ckpt in heads.items()
        }
    worst = min(results.values(), key=lambda r: r["ratios"]["vs_baseline"])
    passed = all(
        r["ratios"]["vs_baseline"] >= TARGETS["vs_baseline"]
        and r["ratios"]["p99_vs_baseline"] <= 1.0
        and r["predictions_equal"]
        for r in results.values()
    )
    print(
        json.dumps(
            {
                "bench": "serve",
                "requests_per_side": args.requests,
                "concurrency": args.concurrency,
                "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms,
                "cpus": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "train_s": round(train_s, 1),
                "heads": results,
                "ratios": {"vs_baseline": worst["ratios"]["vs_baseline"]},
                "targets": TARGETS,
                "pass": passed,
            }
        )
    )


if __name__ == "__main__":
    main()
