"""Precision resolution and the autocast context."""

from __future__ import annotations

import json

import pytest
import torch

from samprobe import device as precision
from samprobe.device import autocast_context, resolve_precision
from samprobe.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_resolution(monkeypatch, fast_bf16):
    # auto takes bf16 only where it is faster than fp32 (the probe); explicit choices are kept.
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast_bf16)
    assert resolve_precision(CPU, "fp32") == "fp32"
    assert resolve_precision(CPU, "bf16") == "bf16"
    assert resolve_precision(CPU, "auto") == ("bf16" if fast_bf16 else "fp32")


@pytest.fixture
def fresh_probe(tmp_path, monkeypatch):
    """No probe remembered in this process, and an empty user cache of its own."""
    monkeypatch.setattr(precision, "_PROBES", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "samprobe" / precision.PROBE_FILE


# GFLOP/s seen on real machines (one thread): AMD EPYC (AVX-512 BF16, no AMX) 96 fp32 / 403 bf16; an
# AVX-512 BF16 CPU where oneDNN's bf16 path was slower, 153 / 84; and a tie within the noise margin.
@pytest.mark.parametrize(
    "fp32, bf16, expected",
    [(96.0, 403.0, "bf16"), (153.0, 84.0, "fp32"), (100.0, 110.0, "fp32"), (100.0, 0.0, "fp32")],
)
def test_probe_outcome_decides_auto(fresh_probe, monkeypatch, fp32, bf16, expected):
    monkeypatch.setattr(precision, "measure_gemm_gflops", lambda: {"fp32": fp32, "bf16": bf16})
    assert resolve_precision(CPU, "auto") == expected
    assert resolve_precision(CPU, "fp32") == "fp32" and resolve_precision(CPU, "bf16") == "bf16"
    stored = json.loads(fresh_probe.read_text())
    (entry,) = stored.values()
    assert entry["cpu"] == precision.cpu_model() and entry["torch"] == torch.__version__
    assert (entry["fp32_gflops"], entry["bf16_gflops"], entry["precision"]) == (
        fp32,
        bf16,
        expected,
    )


def test_probe_is_measured_once_per_cpu_model_and_torch_version(fresh_probe, monkeypatch):
    calls = []

    def measure():
        calls.append(1)
        return {"fp32": 96.0, "bf16": 403.0}

    monkeypatch.setattr(precision, "measure_gemm_gflops", measure)
    assert precision.cpu_probe().precision == "bf16" and len(calls) == 1
    # a new process: reads the user cache, measures nothing
    monkeypatch.setattr(precision, "_PROBES", {})
    again = precision.cpu_probe()
    assert (
        again.cached and (again.fp32_gflops, again.bf16_gflops) == (96.0, 403.0) and len(calls) == 1
    )
    assert "403 GFLOP/s" in again.summary() and "96 GFLOP/s" in again.summary()
    monkeypatch.setattr(precision, "_PROBES", {})
    # another torch: its kernels may differ, measure again
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert not precision.cpu_probe().cached and len(calls) == 2
    monkeypatch.setattr(precision, "cpu_model", lambda: "Another CPU")
    assert not precision.cpu_probe().cached and len(calls) == 3
    assert len(json.loads(fresh_probe.read_text())) == 3


def test_unusable_probe_cache_measures_again(fresh_probe, monkeypatch):
    monkeypatch.setattr(precision, "measure_gemm_gflops", lambda: {"fp32": 153.0, "bf16": 84.0})
    fresh_probe.parent.mkdir(parents=True)
    fresh_probe.write_text("{not json")
    assert precision.cpu_probe().precision == "fp32"
    monkeypatch.setattr(precision, "_PROBES", {})
    monkeypatch.setattr("samprobe.io.user_cache_file", lambda name: None)  # no home directory
    assert precision.cpu_probe().precision == "fp32"  # nothing remembered, still decided


def test_real_probe_measures_both_dtypes_on_one_thread(one_thread):
    torch.set_num_threads(2)
    speeds = precision.measure_gemm_gflops(shapes=((64, 128, 96),), rounds=2)
    assert torch.get_num_threads() == 2  # the caller's thread count comes back
    assert speeds["fp32"] > 0 and speeds["bf16"] >= 0


@pytest.mark.parametrize("bad", ["fp16", "int8"])
def test_cpu_rejects(bad):
    with pytest.raises(ConfigError, match=bad):
        resolve_precision(CPU, bad)


def test_autocast_context():
    with autocast_context(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(CPU, "bf16"):
        assert (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
