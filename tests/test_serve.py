"""`samprobe serve`: answers equal to Classifier.predict, every bad input a 4xx naming it, bounded
queue (503 + Retry-After), graceful SIGTERM, auth. Servers run on free loopback ports: real
`samprobe serve` processes, or the same app on uvicorn in a thread where a test injects a fault."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import signal
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.digits_run import CLASSES, EMPTY_CLASS, write_digits_project
from helpers.serve_util import (
    InProcessServer,
    decoded,
    encode,
    launch,
    mismatch,
    serve_command,
    small_photos,
    wait_ready,
)
from samprobe.cli import main
from samprobe.io import sha256_file
from samprobe.predict import Classifier
from samprobe.serve import ServeSettings, create_app, exposure_warning, read_api_key

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow

MAX_QUEUE = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head trained on real digit scans (efficientnet_lite0 at 64 px), its taxonomy with one class without images."""
    cfg = write_digits_project(tmp_path_factory.mktemp("serve"), per_class=10, epochs=4)
    for cmd in ("validate", "extract", "train"):
        assert main([cmd, "-c", str(cfg)]) == 0
    return cfg.parent / "run" / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def classifier(checkpoint: Path) -> Classifier:
    return Classifier.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def draining(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `samprobe serve` process whose long batching wait holds requests inside it (the SIGTERM
    test), started early so it loads while the other tests run."""
    log = tmp_path_factory.mktemp("serve-logs") / "draining.log"
    proc = launch(serve_command(checkpoint, "--max-batch", "16", "--max-wait-ms", "1500"), log)
    yield proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(classifier: Classifier, checkpoint: Path, draining: Any):
    """The app most tests use (small limits), on uvicorn in this process: its memory is this process's."""
    settings = ServeSettings(
        max_batch=4,
        max_wait_ms=20,
        max_queue=MAX_QUEUE,
        max_body_bytes=2**20,
        max_pixels=1_000_000,
        workers=2,
    )
    with InProcessServer(create_app(classifier, settings, checkpoint=checkpoint)) as srv:
        yield srv


@pytest.fixture(scope="module")
def uploads() -> list[bytes]:
    """Real photos (skimage) as PNG and JPEG uploads, 96 px on the longest side."""
    pics = small_photos(96)
    return [encode(p, "PNG") for p in pics] + [encode(p, "JPEG", quality=90) for p in pics]


def expect_answers(
    body: dict[str, Any], sent: list[bytes], classifier: Classifier, top_k: int
) -> None:
    assert len(body["predictions"]) == len(sent)
    for got, data in zip(body["predictions"], sent):
        [ref] = classifier.predict([decoded(data)], top_k=top_k)
        assert mismatch(got, ref) is None, mismatch(got, ref)
        # original class names; the class without images is never predicted
        assert got["label"] in CLASSES


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


# ---------------------------------------------------------------------------------------
# answers


def test_multipart_and_json_answers_equal_classifier_predict(
    server: InProcessServer, classifier: Classifier, uploads: list[bytes]
) -> None:
    r = httpx.post(
        f"{server.url}/predict",
        files=[("image", (f"p{i}", u)) for i, u in enumerate(uploads[:3])],
        data={"top_k": "2"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    expect_answers(r.json(), uploads[:3], classifier, top_k=2)
    assert all(len(p["top_k"]) == 2 for p in r.json()["predictions"])

    images = [base64.b64encode(u).decode() for u in uploads[3:6]]
    images[0] = "data:image/png;base64," + images[0]
    r = httpx.post(f"{server.url}/predict", json={"images": images, "top_k": 10}, timeout=60)
    assert r.status_code == 200, r.text
    expect_answers(r.json(), uploads[3:6], classifier, top_k=10)
    # top_k past the classes: all of them
    assert all(len(p["top_k"]) == len(CLASSES) for p in r.json()["predictions"])

    r = httpx.post(
        f"{server.url}/predict", json={"image": base64.b64encode(uploads[6]).decode()}, timeout=60
    )
    assert r.status_code == 200, r.text
    expect_answers(r.json(), uploads[6:7], classifier, top_k=5)


def test_concurrent_requests_are_batched_and_answered_alike(
    server: InProcessServer, classifier: Classifier, uploads: list[bytes]
) -> None:
    before = httpx.get(f"{server.url}/metrics").text

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{server.url}/predict", files={"image": ("p", u)})
                    for u in uploads[:MAX_QUEUE]
                )
            )

    responses = asyncio.run(burst())
    for r, u in zip(responses, uploads):
        assert r.status_code == 200, r.text
        expect_answers(r.json(), [u], classifier, top_k=5)
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric(after, "samprobe_batch_size_count") - metric(
        before, "samprobe_batch_size_count"
    )
    images = metric(after, "samprobe_batch_size_sum") - metric(before, "samprobe_batch_size_sum")
    # at least one forward pass took several requests
    assert images == MAX_QUEUE and batches < MAX_QUEUE


def test_a_full_batch_is_one_encoder_forward_pass(
    classifier: Classifier, uploads: list[bytes]
) -> None:
    """``Classifier.predict`` encodes 8 images per pass; the service must not: a batch of 16 ran
    as two forward passes, the second paying the per-pass cost batching exists to share."""
    counting = Classifier(classifier.ckpt, copy.copy(classifier.extractor), "test")
    passes: list[int] = []
    encode_batch = counting.extractor.encode_batch

    def counted(images: torch.Tensor, valid_hw: torch.Tensor) -> np.ndarray:
        passes.append(len(images))
        return encode_batch(images, valid_hw)

    counting.extractor.encode_batch = counted
    sent = (uploads * 2)[:16]
    with InProcessServer(create_app(counting, ServeSettings(max_batch=16))) as srv:
        passes.clear()  # the warm-up's
        r = httpx.post(
            f"{srv.url}/predict",
            files=[("image", (f"p{i}", u)) for i, u in enumerate(sent)],
            timeout=120,
        )
    assert r.status_code == 200, r.text
    assert passes == [16]
    expect_answers(r.json(), sent, classifier, top_k=5)


def test_info_and_health_endpoints(server: InProcessServer, checkpoint: Path) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"ready": True}
    info = httpx.get(f"{server.url}/info").json()
    assert info["classes"] == {
        "taxonomy": [*CLASSES, EMPTY_CLASS],
        "active": list(CLASSES),
        "not_trained": [EMPTY_CLASS],
    }
    assert info["backbone"]["name"] == "efficientnet_lite0" and info["precision"] == "fp32"
    assert info["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert (
        info["features_fingerprint"]
        == Classifier.load(checkpoint, device="cpu").extractor.fingerprint
    )
    assert info["limits"]["max_queue"] == MAX_QUEUE and info["auth"] is False
    r = httpx.get(f"{server.url}/no-such-page")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.url}/predict").status_code == 405


# ---------------------------------------------------------------------------------------
# bad input


def bomb_png() -> bytes:
    """4000x4000 pixels in a few kB: 16 MB once decoded, over the test server's 1M-pixel limit."""
    return encode(np.zeros((4000, 4000), np.uint8), "PNG")


def bad_requests(uploads: list[bytes]) -> dict[str, tuple[dict[str, Any], int, str]]:
    """kind -> (httpx request arguments, expected status, expected error code)."""
    png, jpeg = uploads[0], uploads[len(uploads) // 2]
    b64 = base64.b64encode(png).decode()
    text_plain, json_type = {"content-type": "text/plain"}, {"content-type": "application/json"}
    return {
        "not an image": (
            {"files": {"image": ("notes.txt", b"just some text, not pixels " * 20)}},
            422,
            "not_an_image",
        ),
        "truncated png": (
            {"files": {"image": ("cut.png", png[: len(png) // 2])}},
            422,
            "bad_image",
        ),
        "truncated jpeg": (
            {"files": {"image": ("cut.jpg", jpeg[: len(jpeg) // 2])}},
            422,
            "bad_image",
        ),
        "decompression bomb": ({"files": {"image": ("bomb.png", bomb_png())}}, 413, "pixel_limit"),
        "empty body": ({"content": b"", "headers": json_type}, 400, "empty_body"),
        "empty file": ({"files": {"image": ("empty.png", b"")}}, 422, "empty_image"),
        "body too large": (
            {"files": {"image": ("big.png", png + b"\0" * (2 << 20))}},
            413,
            "body_too_large",
        ),
        "wrong content type": (
            {"content": png, "headers": text_plain},
            415,
            "unsupported_media_type",
        ),
        "no content type": ({"content": png}, 415, "unsupported_media_type"),
        "unknown json field": ({"json": {"images": [b64], "colour": "red"}}, 422, "unknown_field"),
        "unknown multipart field": (
            {"files": {"image": ("p.png", png)}, "data": {"colour": "red"}},
            422,
            "unknown_field",
        ),
        "multipart without boundary": (
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad_multipart",
        ),
        "invalid json": ({"content": b'{"images": [', "headers": json_type}, 400, "invalid_json"),
        "bad base64": ({"json": {"images": ["not base64 at all!"]}}, 422, "bad_base64"),
        "json not an object": ({"json": [b64]}, 422, "bad_field"),
        "no image": ({"json": {"top_k": 3}}, 422, "missing_field"),
        "bad top_k": ({"json": {"images": [b64], "top_k": 0}}, 422, "bad_field"),
        "text instead of a file": ({"files": {"image": (None, b"hello")}}, 422, "bad_field"),
        "too many images": ({"json": {"images": [b64] * (MAX_QUEUE + 1)}}, 413, "too_many_images"),
    }


def check_bad(r: httpx.Response, kind: str, status: int, code: str) -> None:
    assert r.status_code == status, f"{kind}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 10, f"{kind}: {err}"


def test_every_bad_input_gets_its_4xx_and_good_requests_their_answer(
    server: InProcessServer, classifier: Classifier, uploads: list[bytes]
) -> None:
    bad = bad_requests(uploads)
    with httpx.Client(timeout=60) as client:
        for kind, (kwargs, status, code) in bad.items():
            check_bad(client.post(f"{server.url}/predict", **kwargs), kind, status, code)
            # served normally next
            r = client.post(f"{server.url}/predict", files={"image": ("p", uploads[1])})
            assert r.status_code == 200, f"after {kind}: {r.text}"
    assert "pixel_limit" in httpx.get(f"{server.url}/metrics").text  # errors counted by kind
    rss_before = server.rss_mb()

    kinds = list(bad.items())
    truth = {i: classifier.predict([decoded(u)])[0] for i, u in enumerate(uploads)}

    async def interleaved() -> None:
        async with httpx.AsyncClient(timeout=60) as client:

            async def good(i: int) -> None:
                r = await client.post(f"{server.url}/predict", files={"image": ("p", uploads[i])})
                assert r.status_code == 200, r.text
                assert mismatch(r.json()["predictions"][0], truth[i]) is None

            async def wrong(j: int) -> None:
                kind, (kwargs, status, code) = kinds[j % len(kinds)]
                check_bad(await client.post(f"{server.url}/predict", **kwargs), kind, status, code)

            for group in range(10):  # 5 bad + 3 good at once, within the queue of 8
                await asyncio.gather(
                    *(wrong(5 * group + k) for k in range(5)),
                    *(good((3 * group + k) % len(uploads)) for k in range(3)),
                )

    asyncio.run(interleaved())
    # this process's memory: the server's and the client's
    assert server.rss_mb() - rss_before <= 100
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert server.running


# ---------------------------------------------------------------------------------------
# load


def median_latency(url: str, upload: bytes, n: int = 5) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            assert client.post(f"{url}/predict", files={"image": ("p", upload)}).status_code == 200
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_a_burst_past_the_queue_gets_503s_then_latency_recovers(
    server: InProcessServer, uploads: list[bytes]
) -> None:
    normal = median_latency(server.url, uploads[0])

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=5 * MAX_QUEUE)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{server.url}/predict", files={"image": ("p", uploads[i % 4])})
                    for i in range(5 * MAX_QUEUE)
                )
            )

    responses = asyncio.run(burst())  # a timeout or a dropped connection raises here
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "samprobe_queue_depth") == 0
    assert metric(metrics, 'samprobe_errors_total{kind="overloaded"}') >= statuses.count(503)
    after = median_latency(server.url, uploads[0])
    # nothing left queued: back to an unloaded request's time
    assert after <= 3 * normal + 0.1, (
        normal,
        after,
    )


def test_sigterm_during_load_answers_the_requests_in_flight_and_exits_0(
    draining: Any, classifier: Classifier, uploads: list[bytes]
) -> None:
    # its long batching wait holds the requests inside it when SIGTERM comes
    srv = wait_ready(*draining)
    sent = uploads[:6]

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post(f"{srv.url}/predict", files={"image": ("p", u)}))
                for u in sent
            ]
            end = time.monotonic() + 30
            while time.monotonic() < end:
                if metric(
                    (await client.get(f"{srv.url}/metrics")).text, "samprobe_queue_depth"
                ) >= len(sent):
                    break
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(load())
    # one signal only: a second one while it exits would be a kill (the fixture's)
    assert srv.proc.wait(120) == 0
    for r, u in zip(responses, sent):
        assert r.status_code == 200, r.text
        expect_answers(r.json(), [u], classifier, top_k=5)
    assert "serve: stopped (signal SIGTERM)" in srv.log_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health")


# ---------------------------------------------------------------------------------------
# faults, auth, timeouts (the app on uvicorn in this process)


class FaultyClassifier(Classifier):
    """Fails every forward pass that contains a 23x17 image: an internal error to recover from."""

    FAULT = (0, 0)  # the valid size prepare gives a 23x17 image; no real image has it

    def prepare(self, image: np.ndarray):  # noqa: ANN201
        tensor, valid_hw = super().prepare(image)
        return tensor, self.FAULT if image.shape[:2] == (17, 23) else valid_hw

    def predict_prepared(self, prepared, top_k: int = 5):  # noqa: ANN001, ANN201
        if any(valid_hw == self.FAULT for _, valid_hw in prepared):
            raise RuntimeError("injected fault")
        return super().predict_prepared(prepared, top_k=top_k)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_internal_error_is_a_500_with_a_logged_id_and_fails_no_other_request(
    classifier: Classifier, uploads: list[bytes]
) -> None:
    faulty = FaultyClassifier(classifier.ckpt, classifier.extractor, "test")
    trigger = encode(np.asarray(Image.fromarray(small_photos(96)[0]).resize((23, 17))), "PNG")
    records = _Records()
    logging.getLogger("samprobe").addHandler(records)
    try:
        with InProcessServer(
            create_app(faulty, ServeSettings(max_batch=8, max_wait_ms=300))
        ) as srv:

            async def mixed() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    return await asyncio.gather(
                        *(
                            client.post(f"{srv.url}/predict", files={"image": ("p", u)})
                            for u in [uploads[0], trigger, uploads[1], uploads[2]]
                        )
                    )

            # one batch: it fails, then each request is retried alone
            responses = asyncio.run(mixed())
            assert [r.status_code for r in responses] == [200, 500, 200, 200]
            err = responses[1].json()["error"]
            assert err["code"] == "internal" and err["id"] in err["message"]
            assert any(err["id"] in line for line in records.lines)
            for r, u in zip([responses[0], *responses[2:]], [uploads[0], uploads[1], uploads[2]]):
                expect_answers(r.json(), [u], classifier, top_k=5)
            r = httpx.post(f"{srv.url}/predict", files={"image": ("p", uploads[3])}, timeout=60)
            assert r.status_code == 200
            assert httpx.get(f"{srv.url}/ready").status_code == 200
    finally:
        logging.getLogger("samprobe").removeHandler(records)


def test_bearer_token_is_required_where_set(
    classifier: Classifier, uploads: list[bytes], tmp_path: Path
) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-token\n")
    settings = ServeSettings(api_key=read_api_key(key_file))
    with InProcessServer(create_app(classifier, settings)) as srv:
        files = {"image": ("p", uploads[0])}
        r = httpx.post(f"{srv.url}/predict", files=files)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        wrong = httpx.post(
            f"{srv.url}/predict", files=files, headers={"Authorization": "Bearer s3cret-tokeN"}
        )
        assert wrong.status_code == 401
        assert (
            httpx.get(f"{srv.url}/metrics").status_code == 401
            and httpx.get(f"{srv.url}/info").status_code == 401
        )
        ok = httpx.post(
            f"{srv.url}/predict",
            files=files,
            headers={"Authorization": "Bearer s3cret-token"},
            timeout=60,
        )
        assert ok.status_code == 200
        assert (
            httpx.get(f"{srv.url}/health").status_code == 200
            and httpx.get(f"{srv.url}/ready").status_code == 200
        )
        info = httpx.get(f"{srv.url}/info", headers={"Authorization": "Bearer s3cret-token"}).json()
        assert info["auth"] is True and "s3cret" not in json.dumps(info)


def test_a_request_past_its_deadline_is_a_504(classifier: Classifier, uploads: list[bytes]) -> None:
    # the batch waits longer than the deadline
    settings = ServeSettings(max_batch=8, max_wait_ms=2000, timeout_s=0.3)
    with InProcessServer(create_app(classifier, settings)) as srv:
        r = httpx.post(f"{srv.url}/predict", files={"image": ("p", uploads[0])}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


# ---------------------------------------------------------------------------------------
# the command line


def test_serve_user_errors_exit_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-batch", "0"]) == 2
    assert "max_batch must be 1 or more" in capsys.readouterr().err
    assert (
        main(["serve", "--checkpoint", str(checkpoint), "--max-batch", "32", "--max-queue", "8"])
        == 2
    )
    assert "no batch could ever fill" in capsys.readouterr().err
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert main(["serve", "--checkpoint", str(checkpoint), "--api-key-file", str(empty)]) == 2
    assert "holds no token" in capsys.readouterr().err
    assert (
        main(
            ["serve", "--checkpoint", str(checkpoint), "--api-key-file", str(tmp_path / "nope.key")]
        )
        == 2
    )
    assert "cannot be read" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "0"]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_binding_beyond_loopback_without_a_token_warns() -> None:
    assert exposure_warning("127.0.0.1", 8000, ServeSettings()) is None
    assert "no authentication" in exposure_warning("0.0.0.0", 8000, ServeSettings())
    assert exposure_warning("0.0.0.0", 8000, ServeSettings(api_key="t0ken")) is None
