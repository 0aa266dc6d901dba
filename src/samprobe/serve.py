"""``samprobe serve``: a trained head as an HTTP service, with dynamic batching.

    from samprobe.serve import ServeSettings, create_app, serve
    serve("runs/exp1/checkpoints/best.pt", port=8000)            # blocks; SIGTERM/Ctrl-C drain and return 0
    app = create_app(Classifier.load(ckpt), ServeSettings(), checkpoint=ckpt)   # any ASGI server

Built on FastAPI + uvicorn. One request's path: the body is read (``max_body_bytes``, 413 past it),
parsed and its images decoded on a thread pool (``workers`` threads: never on the event loop), then
queued for the one batching thread, which runs ``Classifier.predict`` on up to ``max_batch`` images
at once: the first image of a batch waits at most ``max_wait_ms`` for others. Admission is bounded:
past ``max_queue`` images (requests still being read count as one) the answer is 503 with
``Retry-After`` instead of an ever-longer queue, and every request has a deadline (``timeout_s``,
504 past it). Bad input is a 4xx JSON ``{"error": {"code", "message"}}`` naming the problem; an
internal failure is a 500 whose id is in the log. One process holds one copy of the model, so every
request can join every batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import hmac
import json
import logging
import math
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from samprobe.data.images import open_image
from samprobe.errors import ConfigError, SamprobeError
from samprobe.io import sha256_file
from samprobe.predict import Classifier, Prediction, PreparedImage

log = logging.getLogger("samprobe")

ACCEPTED_TYPES = "multipart/form-data (file parts named 'image') or application/json ({\"images\": [base64, ...]})"
JSON_FIELDS = ("image", "images", "top_k")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one service (the CLI flags of ``samprobe serve``)."""

    max_batch: int = 16
    """Most images encoded in one forward pass."""
    max_wait_ms: float = 10.0
    """How long the first image of a batch waits for others."""
    workers: int = 2
    """Threads that parse bodies and decode images (the model runs in its own thread)."""
    max_queue: int = 64
    """Most images admitted and not yet answered; past it, 503 with Retry-After."""
    max_body_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    """Per image, read from the header before decoding (a decompression bomb never allocates)."""
    timeout_s: float = 30.0
    """Deadline of one /predict request, from arrival to answer (504 past it)."""
    default_top_k: int = 5
    api_key: str | None = field(default=None, repr=False)
    """Bearer token every request but /health and /ready must carry; None: no auth."""

    def check(self) -> ServeSettings:
        for name, minimum in (
            ("max_batch", 1),
            ("workers", 1),
            ("max_queue", 1),
            ("max_body_bytes", 1),
            ("max_pixels", 1),
            ("default_top_k", 1),
        ):
            if getattr(self, name) < minimum:
                raise ConfigError(
                    f"serve: {name} must be {minimum} or more, got {getattr(self, name)}",
                    fix=f"pass --{name.replace('_', '-').replace('-bytes', '-mb')} with a "
                    f"positive value",
                )
        for name in ("max_wait_ms", "timeout_s"):
            value = getattr(self, name)
            least = "above 0" if name == "timeout_s" else "of 0 or more"
            if not (math.isfinite(value) and value >= 0 and (name != "timeout_s" or value > 0)):
                raise ConfigError(
                    f"serve: {name} must be a finite number {least}, got {value}",
                    fix=f"e.g. --{name.replace('_', '-')} {ServeSettings.__dict__[name]}",
                )
        if self.max_queue < self.max_batch:
            raise ConfigError(
                f"serve: max_queue ({self.max_queue}) is smaller than max_batch "
                f"({self.max_batch}): no batch could ever fill",
                fix="pass --max-queue at least --max-batch (e.g. 4x it)",
            )
        return self


def read_api_key(path: Path | str) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"--api-key-file {path} cannot be read ({type(exc).__name__}: {exc})",
            fix="pass a readable text file holding the token, e.g. `openssl rand -hex 32 > "
            "key.txt`",
        ) from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(
            f"--api-key-file {path} holds no token, or one with spaces inside",
            fix="write one token on one line, e.g. `openssl rand -hex 32 > key.txt`",
        )
    return token


class Rejected(Exception):
    """A request answered with a 4xx/5xx error naming the problem (never reaches the CLI)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ---------------------------------------------------------------------------------------
# request parsing (runs on the worker threads)


@dataclass
class Upload:
    where: str
    """How the error messages name it: ``part 1 ('cat.jpg')``, ``images[2]``."""
    data: bytes


def decode_upload(
    upload: Upload, max_pixels: int, decode: Callable[[bytes, int], np.ndarray]
) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB with ``decode`` (``Classifier.decode``: as extraction and
    ``Classifier.predict`` decode a file), after header checks that name what is wrong."""
    if not upload.data:
        raise Rejected(422, "empty_image", f"{upload.where} is empty (0 bytes)")
    try:
        header = open_image(upload.data)
    except ValueError:
        raise Rejected(
            422,
            "not_an_image",
            f"{upload.where} is not an image (no known image format in its "
            f"{len(upload.data)} bytes)",
        ) from None
    except Exception as exc:  # PIL's header parsers raise many types on malformed input
        raise Rejected(
            422,
            "bad_image",
            f"{upload.where}: unreadable image header ({type(exc).__name__}: {exc})",
        ) from None
    if header.width * header.height > max_pixels:
        raise Rejected(
            413,
            "pixel_limit",
            f"{upload.where} is {header.width}x{header.height} = "
            f"{header.width * header.height} pixels, over the limit of {max_pixels} (--max-pixels)",
        )
    try:
        return decode(upload.data, max_pixels)
    except Exception as exc:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError, zlib.error...
        raise Rejected(
            422,
            "bad_image",
            f"{upload.where} cannot be decoded as {header.format} ({type(exc).__name__}: {exc})",
        ) from None


def parse_top_k(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Rejected(
            422, "bad_field", f"{where} must be a whole number of 1 or more, got {value!r}"
        )
    return value


def parse_json(body: bytes, default_top_k: int) -> tuple[list[Upload], int]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Rejected(
            422,
            "bad_field",
            f'the JSON body must be an object like {{"images": [base64, ...]}}, '
            f"not a {type(doc).__name__}",
        )
    unknown = sorted(set(doc) - set(JSON_FIELDS))
    if unknown:
        raise Rejected(
            422,
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(JSON_FIELDS)}",
        )
    if ("image" in doc) == ("images" in doc):
        raise Rejected(
            422,
            "missing_field" if "image" not in doc else "bad_field",
            "give either 'images' (a list of base64 strings) or 'image' (one base64 string)",
        )
    if "image" in doc:
        items, names = [doc["image"]], ["image"]
    else:
        if not isinstance(doc["images"], list) or not doc["images"]:
            raise Rejected(422, "bad_field", "'images' must be a non-empty list of base64 strings")
        items, names = doc["images"], [f"images[{i}]" for i in range(len(doc["images"]))]
    uploads = []
    for item, where in zip(items, names):
        if not isinstance(item, str):
            raise Rejected(
                422, "bad_field", f"{where} must be a base64 string, not {type(item).__name__}"
            )
        # data URLs too
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            uploads.append(Upload(where, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise Rejected(422, "bad_base64", f"{where} is not valid base64") from None
    top_k = parse_top_k(doc["top_k"], "'top_k'") if "top_k" in doc else default_top_k
    return uploads, top_k


# ---------------------------------------------------------------------------------------
# the batching thread


@dataclass
class _Job:
    images: list[PreparedImage]
    """Decoded and resized on the worker threads (``Classifier.prepare``)."""
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False
    """Set by the request when it timed out: the batcher skips it."""


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """One thread that runs the model on batches of queued jobs, oldest first."""

    _STOP = object()

    def __init__(self, classifier: Classifier, settings: ServeSettings, metrics: Metrics) -> None:
        self.classifier = classifier
        self.max_batch = settings.max_batch
        self.max_wait_s = settings.max_wait_ms / 1000
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue()  # unbounded: the app bounds admission (max_queue)
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.seconds_per_batch = 0.0
        """Moving average of one forward, for Retry-After."""
        self._thread = threading.Thread(target=self._run, name="samprobe-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """After the jobs already queued are done."""
        self.queue.put(self._STOP)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, images: list[PreparedImage], top_k: int) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(images, top_k, loop.create_future(), loop)
        self.queue.put(job)
        return job

    def _run(self) -> None:
        try:  # the first forward pays one-time costs (kernel selection, lazy allocations) before /ready says yes
            grey = self.classifier.prepare(np.full((64, 64, 3), 128, np.uint8))
            self.classifier.predict_prepared([grey] * self.max_batch, top_k=1)
            self.ready.set()
        except Exception as exc:
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            log.exception(
                f"serve: the model failed its first forward pass ({self.warmup_error}); /ready "
                f"stays 503"
            )
        carry: Any = None
        while True:
            first = carry if carry is not None else self.queue.get()
            carry = None
            if first is self._STOP:
                return
            jobs, n = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is self._STOP or n + len(nxt.images) > self.max_batch:
                    carry = nxt  # the next batch's first: no forward pass is cut short to fit it
                    break
                jobs.append(nxt)
                n += len(nxt.images)
            self._serve([j for j in jobs if not j.abandoned])

    def _serve(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            results = self._predict(jobs)
        except Exception:
            if len(jobs) == 1:
                self._fail(jobs[0])
                return
            # Retry alone, so a job that breaks the forward pass cannot fail the others.
            for job in jobs:
                try:
                    self._deliver(job, self._predict([job])[0])
                except Exception:
                    self._fail(job)
            return
        for job, result in zip(jobs, results):
            self._deliver(job, result)

    def _predict(self, jobs: list[_Job]) -> list[list[Prediction]]:
        images = [im for job in jobs for im in job.images]
        top_k = max(job.top_k for job in jobs)
        start = time.perf_counter()
        preds: list[Prediction] = []
        for i in range(0, len(images), self.max_batch):
            chunk = images[i : i + self.max_batch]
            # One forward pass per batch: Classifier.predict's default of 8 images per pass ran
            # a batch of 16 as two.
            preds.extend(self.classifier.predict_prepared(chunk, top_k=top_k))
            self.metrics.batch_size.observe(len(chunk))
        seconds = (time.perf_counter() - start) / max(1, math.ceil(len(images) / self.max_batch))
        self.seconds_per_batch = (
            seconds if not self.seconds_per_batch else 0.8 * self.seconds_per_batch + 0.2 * seconds
        )
        self.metrics.batch_seconds.observe(seconds)
        out, at = [], 0
        for job in jobs:  # top-k is sorted: the first k of a larger top-k are the top-k
            out.append(
                [
                    Prediction(p.label, p.score, p.top_k[: job.top_k])
                    for p in preds[at : at + len(job.images)]
                ]
            )
            at += len(job.images)
        return out

    def _deliver(self, job: _Job, result: Any, error: BaseException | None = None) -> None:
        # the loop closed (the server is gone): nobody waits
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _fail(self, job: _Job) -> None:
        error_id = uuid.uuid4().hex[:12]
        log.exception(
            f"serve: internal error {error_id} in the model forward pass ({len(job.images)} "
            f"image(s))"
        )
        self._deliver(job, None, InternalFailure(error_id))


class InternalFailure(Exception):
    """A failure of the service itself: the request gets a 500 naming ``error_id``, also in the log."""

    def __init__(self, error_id: str) -> None:
        super().__init__(error_id)
        self.error_id = error_id


# ---------------------------------------------------------------------------------------
# metrics


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps can live in one process)."""

    def __init__(
        self, queue_depth: Callable[[], float], queued_images: Callable[[], float]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "samprobe_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "samprobe_request_latency_seconds",
            "Latency of /predict, arrival to answer",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.batch_size = Histogram(
            "samprobe_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "samprobe_batch_seconds",
            "Seconds per forward pass",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.images = Counter("samprobe_images", "Images classified", registry=r)
        self.errors = Counter(
            "samprobe_errors", "Requests answered with an error, by kind", ["kind"], registry=r
        )
        Gauge(
            "samprobe_queue_depth",
            "Images admitted and not yet answered (requests still being read count 1)",
            registry=r,
        ).set_function(queue_depth)
        Gauge(
            "samprobe_queue_images", "Decoded images waiting for the model", registry=r
        ).set_function(queued_images)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------
# the app


ENDPOINTS = ("/predict", "/health", "/ready", "/info", "/metrics")


class _Guard:
    """Pure ASGI middleware (no per-request task, unlike ``@app.middleware``): counts requests by
    endpoint and status, times /predict, and makes a body past ``limit`` bytes a 413, found from
    Content-Length before a byte is read or while reading a chunked body (uvicorn discards the rest)."""

    def __init__(self, app: Callable, *, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(
        self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, seen, status = time.perf_counter(), 0, [500]
        too_large = Rejected(
            413,
            "body_too_large",
            f"the request body is over the limit of {self.limit} bytes "
            f"(--max-body-mb {self.limit / 2**20:g})",
        )
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")

        async def limited() -> dict:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large  # before a byte is read
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        async def observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited, observed)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            if endpoint == "/predict":
                self.metrics.latency.observe(time.perf_counter() - start)


@dataclass
class _State:
    admitted: int = 0
    """Images admitted and not answered, plus one per request whose images are not counted yet."""
    draining: bool = False


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def prediction_json(p: Prediction) -> dict[str, Any]:
    return {
        "label": p.label,
        "score": p.score,
        "top_k": [{"label": n, "score": s} for n, s in p.top_k],
    }


def describe(
    classifier: Classifier, checkpoint: Path | None, settings: ServeSettings
) -> dict[str, Any]:
    """What /info says: model, classes, precision, fingerprints, limits."""
    ckpt, mapping, ex = classifier.ckpt, classifier.mapping, classifier.extractor
    return {
        "backbone": {**ckpt.backbone.config, "pooling": list(ckpt.backbone.pooling)},
        "head": ckpt.head_spec["kind"],
        "classes": {
            "taxonomy": list(mapping.taxonomy),
            "active": mapping.active_names,
            "not_trained": mapping.inactive_names,
        },
        "precision": ex.precision,
        "device": str(ex.device),
        "features_fingerprint": ckpt.backbone.fingerprint,
        "checkpoint": {
            "path": str(checkpoint) if checkpoint else None,
            "sha256": sha256_file(checkpoint) if checkpoint else None,
        },
        "limits": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
            "timeout_s": settings.timeout_s,
            "default_top_k": settings.default_top_k,
        },
        "auth": settings.api_key is not None,
    }


def create_app(
    classifier: Classifier,
    settings: ServeSettings | None = None,
    *,  # noqa: C901
    checkpoint: Path | str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``classifier``; its lifespan starts and stops the batching thread."""
    settings = (settings or ServeSettings()).check()
    state = _State()
    holder: dict[str, Any] = {}
    metrics = Metrics(
        lambda: state.admitted,
        lambda: holder["batcher"].queue.qsize() if "batcher" in holder else 0,
    )
    info = describe(classifier, Path(checkpoint) if checkpoint else None, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        state.draining = False
        holder["pool"] = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="samprobe-decode"
        )
        holder["batcher"] = batcher = Batcher(classifier, settings, metrics)
        batcher.start()
        try:
            yield
        finally:
            state.draining = True
            batcher.stop()  # uvicorn has waited for the open requests: the queue is empty
            holder["pool"].shutdown(wait=True)

    app = FastAPI(
        title="samprobe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.samprobe = state

    def error(rej: Rejected) -> JSONResponse:
        metrics.errors.labels(rej.code).inc()
        return JSONResponse(
            error_body(rej.code, rej.message), status_code=rej.status, headers=rej.headers
        )

    def internal(error_id: str) -> JSONResponse:
        metrics.errors.labels("internal").inc()
        return JSONResponse(
            error_body(
                "internal",
                f"internal error {error_id}; the server log has its details",
                id=error_id,
            ),
            status_code=500,
        )

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not depend on how much of the token matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise Rejected(
                401,
                "unauthorized",
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def retry_after() -> dict[str, str]:
        batcher = holder.get("batcher")
        wait = state.admitted / settings.max_batch * (batcher.seconds_per_batch if batcher else 1.0)
        return {"Retry-After": str(max(1, math.ceil(wait)))}

    app.add_middleware(_Guard, limit=settings.max_body_bytes, metrics=metrics)

    @app.exception_handler(HTTPException)
    async def http_error(
        request: Request, exc: HTTPException
    ) -> JSONResponse:  # 404, 405 in the same shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(
            Rejected(
                exc.status_code,
                code,
                f"{request.method} {request.url.path}: {exc.detail}; "
                f"endpoints: POST /predict, GET {', '.join(ENDPOINTS[1:])}",
                dict(exc.headers or {}),
            )
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            f"serve: internal error {error_id} on {request.method} {request.url.path}", exc_info=exc
        )
        return internal(error_id)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        batcher = holder.get("batcher")
        if batcher is None or not batcher.ready.is_set() or not batcher.alive or state.draining:
            reason = (
                "shutting down"
                if state.draining
                else batcher.warmup_error
                if batcher and batcher.warmup_error
                else "the model thread stopped"
                if batcher and not batcher.alive and batcher.ready.is_set()
                else "loading the model"
            )
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/info")
    async def get_info(request: Request) -> JSONResponse:
        try:
            check_auth(request)
        except Rejected as rej:
            return error(rej)
        return JSONResponse(info)

    @app.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        try:
            check_auth(request)
        except Rejected as rej:
            return error(rej)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def decode_prepare(upload: Upload) -> PreparedImage:
        # The resize too runs here, on the worker threads, while the model thread encodes the
        # previous batch (in the model thread it was ~2 ms of CPU per image, serial, per batch).
        return classifier.prepare(decode_upload(upload, settings.max_pixels, classifier.decode))

    async def read_uploads(request: Request) -> tuple[list[Upload], int]:
        content_type = request.headers.get("content-type", "")
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise Rejected(
                415,
                "unsupported_media_type",
                f"Content-Type {content_type or '(none)'!r} is not accepted; send {ACCEPTED_TYPES}",
            )
        body = await request.body()
        if not body:
            raise Rejected(400, "empty_body", f"the request body is empty; send {ACCEPTED_TYPES}")
        loop = asyncio.get_running_loop()
        if kind == "application/json":
            return await loop.run_in_executor(
                holder["pool"], parse_json, body, settings.default_top_k
            )
        try:
            form = await request.form(max_files=settings.max_queue, max_fields=8)
        except HTTPException as exc:  # starlette's MultiPartException, as a 400
            if str(exc.detail).startswith("Too many files"):
                raise Rejected(
                    413,
                    "too_many_images",
                    f"more than {settings.max_queue} images in one request (--max-queue); split it",
                ) from None
            raise Rejected(
                400, "bad_multipart", f"the multipart body cannot be parsed ({exc.detail})"
            ) from None
        uploads, top_k = [], settings.default_top_k
        try:
            for i, (name, value) in enumerate(form.multi_items()):
                if name in ("image", "images"):
                    if isinstance(value, str):
                        raise Rejected(
                            422,
                            "bad_field",
                            f"part {i} ({name!r}) must be a file upload, not a text field",
                        )
                    uploads.append(Upload(f"part {i} ({value.filename!r})", await value.read()))
                elif name == "top_k":
                    top_k = parse_top_k(value if isinstance(value, str) else None, "'top_k'")
                else:
                    raise Rejected(
                        422,
                        "unknown_field",
                        f"unknown field {name!r} (part {i}); allowed: image, top_k",
                    )
        finally:
            await form.close()
        if not uploads:
            raise Rejected(
                422, "missing_field", "no file part named 'image' (send -F image=@photo.jpg)"
            )
        return uploads, top_k

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        deadline = time.monotonic() + settings.timeout_s
        holds = 0
        job: _Job | None = None
        try:
            check_auth(request)
            batcher = holder.get("batcher")
            if batcher is None or not batcher.ready.is_set():
                raise Rejected(
                    503,
                    "not_ready",
                    "the model is still loading; retry shortly",
                    {"Retry-After": "1"},
                )
            if state.admitted >= settings.max_queue:
                raise Rejected(
                    503,
                    "overloaded",
                    f"the queue is full ({settings.max_queue} images, --max-queue); "
                    "retry after the Retry-After seconds",
                    retry_after(),
                )
            state.admitted += 1  # one slot while the body is read and parsed
            holds = 1
            uploads, top_k = await asyncio.wait_for(
                read_uploads(request), deadline - time.monotonic()
            )
            if len(uploads) > settings.max_queue:
                raise Rejected(
                    413,
                    "too_many_images",
                    f"{len(uploads)} images in one request; at most "
                    f"{settings.max_queue} (--max-queue)",
                )
            extra = len(uploads) - 1
            if extra and state.admitted + extra > settings.max_queue:
                raise Rejected(
                    503,
                    "overloaded",
                    f"no room for {len(uploads)} images in the queue "
                    f"({settings.max_queue} images, --max-queue)",
                    retry_after(),
                )
            state.admitted += extra
            holds += extra
            loop = asyncio.get_running_loop()
            decodes = (loop.run_in_executor(holder["pool"], decode_prepare, u) for u in uploads)
            images = await asyncio.wait_for(asyncio.gather(*decodes), deadline - time.monotonic())
            job = batcher.submit(list(images), top_k)
            preds = await asyncio.wait_for(asyncio.shield(job.future), deadline - time.monotonic())
            metrics.images.inc(len(images))
            return JSONResponse({"predictions": [prediction_json(p) for p in preds]})
        except Rejected as rej:
            return error(rej)
        except TimeoutError:
            if job is not None:
                job.abandoned = True
            return error(
                Rejected(504, "timeout", f"no answer within {settings.timeout_s:g} s (--timeout-s)")
            )
        except InternalFailure as exc:
            return internal(exc.error_id)
        finally:
            state.admitted -= holds

    return app


# ---------------------------------------------------------------------------------------
# running it


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(
            f"serve: cannot listen on {host}:{port} ({exc.strerror or exc})",
            fix="choose another --port (or stop the process using it), or a --host of this machine",
        ) from None


def exposure_warning(host: str, port: int, settings: ServeSettings) -> str | None:
    """The warning printed when the service is reachable from other machines without a token."""
    if host in LOOPBACK or settings.api_key is not None:
        return None
    return (
        f"serve: WARNING: listening on {host}:{port} with no authentication: anyone who can reach "
        f"this machine can use the model; pass --api-key-file, or keep the default --host 127.0.0.1"
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with /ready turning 503 the moment a stop signal arrives, and a stop
    signal that came before uvicorn listened for them (while the model loaded) still honoured."""

    def __init__(self, config: uvicorn.Config, state: _State, early_stops: list[int]) -> None:
        super().__init__(config)
        self.samprobe_state, self.early_stops = state, early_stops

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.samprobe_state.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.early_stops:
            self.handle_exit(self.early_stops[0], None)


def serve(
    checkpoint: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    settings: ServeSettings | None = None,
    access_log: bool = False,
    on_listening: Callable[[int], None] | None = None,
) -> int:
    """Load ``checkpoint``, listen on host:port and serve until SIGTERM or Ctrl-C, then finish the
    requests in flight and return 0. ``port`` 0 picks a free port (``on_listening`` gets it)."""
    settings = (settings or ServeSettings()).check()
    stops: list[int] = []
    # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, finish open requests), then
    # raises the signal again for the handler it found: this one, so the process returns 0. Set
    # first, so a stop during the model load is kept too. Signals reach only the main thread.
    main = threading.current_thread() is threading.main_thread()
    previous = {
        sig: signal.signal(sig, lambda s, _f: stops.append(s))
        for sig in ((signal.SIGTERM, signal.SIGINT) if main else ())
    }
    try:
        # before loading the model: a taken port fails in a second, not after a load
        sock = _listen(host, port)
        try:
            classifier = Classifier.load(checkpoint, device=device)
            app = create_app(classifier, settings, checkpoint=checkpoint)
            # The ~500k objects of torch, timm and the model live as long as the process: out of the
            # collector's sight, full collections stop rescanning them while serving, and the exit
            # after a SIGTERM drain took 1.7 s instead of 12.8 s (measured, loaded 2-core CPU).
            gc.freeze()
            bound = sock.getsockname()[1]
            warning = exposure_warning(host, bound, settings)
            if warning:
                log.warning(warning)
            ex = classifier.extractor
            log.info(
                f"serve: http://{host}:{bound} {ex.backbone.name} head, "
                f"{classifier.mapping.num_active} classes, "
                f"{ex.device} {ex.precision}; batches of up to {settings.max_batch} images within "
                f"{settings.max_wait_ms:g} ms, queue {settings.max_queue} images"
            )
            config = uvicorn.Config(
                app,
                log_level="warning",
                access_log=access_log,
                lifespan="on",
                timeout_graceful_shutdown=int(math.ceil(settings.timeout_s)) + 5,
            )
            server = _DrainingServer(config, app.state.samprobe, stops)
            if on_listening:
                on_listening(bound)
            server.run(sockets=[sock])
        finally:
            sock.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started and not stops:
        raise SamprobeError(
            f"serve: the server on {host}:{bound} did not start (see the log above)",
            fix="rerun with --debug for details",
        )
    how = f"signal {signal.Signals(stops[0]).name}" if stops else "shutdown"
    log.info(f"serve: stopped ({how}); the requests in flight were answered")
    return 0
