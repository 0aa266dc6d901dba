"""The CUDA decisions, checked on the CPU: device per rank, precision per capability, attention
kernel per device (with SDPA parity on real photos), and what the GPU paths store.

No GPU is needed: torch.cuda's queries are replaced where a decision reads them (the decision
is what is tested), and the SDPA path runs on the CPU for real."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from sam_factory import write_official_checkpoint
from samprobe.backbones import precision
from samprobe.backbones.precision import autocast_context, resolve_device, resolve_precision, runnable_precision
from samprobe.backbones.sam import SamBackbone
from samprobe.backbones.sam_attention import SamAttention, choose_attention
from samprobe.errors import ConfigError, DeviceError

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as a node of ``count`` GPUs of ``capability``; records set_device."""
    state = {"count": 2, "capability": (9, 0), "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state["set"].append(d))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    return state


# --- defect 1: LOCAL_RANK -> device ----------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 1])
def test_each_torchrun_rank_gets_the_gpu_of_its_local_rank(fake_gpus, monkeypatch, rank):
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    for asked in ("auto", "cuda"):
        assert resolve_device(asked) == torch.device("cuda", rank)
    assert fake_gpus["set"] == [rank, rank]  # made current: default allocations land there too


def test_without_torchrun_cuda_is_the_current_device_and_nothing_is_set(fake_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert fake_gpus["set"] == []


def test_more_ranks_than_gpus_is_a_device_error(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match="LOCAL_RANK 2 but this node shows only 2 CUDA GPU"):
        resolve_device("cuda")


def test_cpu_stays_cpu_under_torchrun(fake_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cpu") == torch.device("cpu")


# --- defect 7: capability -> precision --------------------------------------------------------

@pytest.mark.parametrize("capability,auto", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_picks_bf16_from_capability_8(fake_gpus, monkeypatch, capability, auto):
    # is_bf16_supported() says True on a T4 (emulated bf16): it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    fake_gpus["capability"] = capability
    assert resolve_precision(CUDA, "auto") == auto
    assert precision.needs_grad_scaler(auto) == (auto == "fp16")
    assert resolve_precision(CUDA, "fp16") == "fp16"
    if capability < (8, 0):
        with pytest.raises(ConfigError, match=r"compute capability 7\.\d\) has no bf16"):
            resolve_precision(CUDA, "bf16")
    else:
        assert resolve_precision(CUDA, "bf16") == "bf16"


def test_fp32_on_cuda_is_tf32_unless_the_user_turns_it_off(fake_gpus, monkeypatch):
    assert resolve_precision(CUDA, "fp32") == "tf32"
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"  # TF32 is a CUDA matmul mode
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert resolve_precision(CUDA, "fp32") == "fp32"


def test_tf32_context_sets_and_restores_cuda_matmul_mode():
    before = torch.backends.cuda.matmul.allow_tf32
    for resolved, inside in (("tf32", True), ("fp32", False)):
        with autocast_context(CUDA, resolved):
            assert torch.backends.cuda.matmul.allow_tf32 is inside and torch.backends.cudnn.allow_tf32 is inside
        assert torch.backends.cuda.matmul.allow_tf32 is before


def test_trainer_makes_a_grad_scaler_only_for_fp16():
    from samprobe.config import TrainConfig
    from samprobe.train.loop import SweepTrainer

    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = np.arange(16) % 2
    for p, scaled in (("fp32", False), ("bf16", False)):
        tr = SweepTrainer(x, y, x, y, np.ones(2), TrainConfig(epochs=1), 0, device="cpu", precision=p)
        assert (tr.scaler is not None) == scaled


@pytest.mark.parametrize("stored,on_cpu", [("fp32", "fp32"), ("tf32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")])
def test_a_gpu_precision_runs_on_the_cpu_as_the_closest_it_can(stored, on_cpu):
    assert runnable_precision(torch.device("cpu"), stored) == on_cpu


# --- defect 2: the attention kernel per device, SDPA parity on real photos -----------------------

def test_attention_kernel_choice():
    assert choose_attention(torch.device("cpu")) == "chunked"  # the CPU keeps its measured loops
    assert choose_attention(CUDA) == "sdpa"


@pytest.fixture(scope="module")
def tiny512(tmp_path_factory) -> SamBackbone:
    """Tiny SAM at 512 px: 14x14 windows (folded path) and a 32x32 global block (chunked path)."""
    ckpt = write_official_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pth", "tiny", img_size=256)
    return SamBackbone.from_checkpoint(ckpt, img_size=512)


def _photos(bb: SamBackbone) -> tuple[torch.Tensor, torch.Tensor]:
    photos = [data.astronaut(), data.chelsea(), data.coffee(), np.ascontiguousarray(data.rocket()[:, :300])]
    prepared = [bb.prepare(p) for p in photos]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


def _features(bb: SamBackbone, impl: str, prec: str) -> torch.Tensor:
    bb.set_attention(impl)
    try:
        x, hw = _photos(bb)
        with autocast_context(torch.device("cpu"), prec):
            return bb.encode(x, hw, ["neck_avg", "block_avg"])
    finally:
        bb.set_attention(None)


def test_sdpa_path_matches_the_chunked_path_fp32(tiny512, one_thread):
    ref, sdpa = _features(tiny512, "chunked", "fp32"), _features(tiny512, "sdpa", "fp32")
    scale = ref.abs().max()
    assert (sdpa - ref).abs().max() <= 1e-4 * scale, float((sdpa - ref).abs().max() / scale)


def test_sdpa_path_matches_the_chunked_path_bf16(tiny512, one_thread):
    ref, sdpa = _features(tiny512, "chunked", "fp32"), _features(tiny512, "sdpa", "bf16")
    cos = torch.nn.functional.cosine_similarity(ref, sdpa, dim=1)
    assert cos.min() >= 0.999, cos


def test_rel_pos_tables_are_gathered_once_per_block(tiny512):
    attn = next(m for m in tiny512.encoder.modules() if isinstance(m, SamAttention))
    with torch.inference_mode():
        first = attn._tables((14, 14), torch.float32)
        assert attn._tables((14, 14), torch.float32) is first
        with torch.no_grad():
            attn.rel_pos_h.mul_(1.0)  # an in-place weight change is seen (version bump)
        assert attn._tables((14, 14), torch.float32) is not first


def test_sdpa_mask_rows_are_aligned_and_calls_are_few(tiny512, monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((q.dim(), attn_mask.stride(-2), q.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    _features(tiny512, "sdpa", "fp32")
    assert len(calls) == 2  # one per block at this size (2 blocks)
    assert all(dim == 4 and stride % 8 == 0 for dim, stride, _ in calls), calls
