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

from helpers.sam_factory import write_official_checkpoint
from samprobe import device as precision
from samprobe.backbones.sam import SamBackbone
from samprobe.backbones.sam_attention import SamAttention, choose_attention
from samprobe.device import (
    autocast_context,
    resolve_device,
    resolve_precision,
    runnable_precision,
)
from samprobe.errors import ConfigError, DeviceError

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as a node of ``count`` GPUs of ``capability``; records set_device."""
    state = {"count": 2, "capability": (9, 0), "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state["set"].append(d))
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: state["capability"]
    )
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


@pytest.mark.parametrize(
    "capability,auto", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
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
            assert (
                torch.backends.cuda.matmul.allow_tf32 is inside
                and torch.backends.cudnn.allow_tf32 is inside
            )
        assert torch.backends.cuda.matmul.allow_tf32 is before


def test_trainer_makes_a_grad_scaler_only_for_fp16():
    from samprobe.config import TrainConfig
    from samprobe.train.loop import SweepTrainer

    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = np.arange(16) % 2
    for p, scaled in (("fp32", False), ("bf16", False)):
        tr = SweepTrainer(
            x,
            y,
            x,
            y,
            class_weights=np.ones(2),
            cfg=TrainConfig(epochs=1),
            seed=0,
            device="cpu",
            precision=p,
        )
        assert (tr.scaler is not None) == scaled


@pytest.mark.parametrize(
    "stored,on_cpu", [("fp32", "fp32"), ("tf32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")]
)
def test_a_gpu_precision_runs_on_the_cpu_as_the_closest_it_can(stored, on_cpu):
    assert runnable_precision(torch.device("cpu"), stored) == on_cpu


# --- defect 2: the attention kernel per device, SDPA parity on real photos -----------------------


def test_attention_kernel_choice():
    assert choose_attention(torch.device("cpu")) == "chunked"  # the CPU keeps its measured loops
    assert choose_attention(CUDA) == "sdpa"


@pytest.fixture(scope="module")
def tiny512(tmp_path_factory) -> SamBackbone:
    """Tiny SAM at 512 px: 14x14 windows (folded path) and a 32x32 global block (chunked path)."""
    ckpt = write_official_checkpoint(
        tmp_path_factory.mktemp("w") / "tiny.pth", "tiny", img_size=256
    )
    return SamBackbone.from_checkpoint(ckpt, img_size=512)


def _photos(bb: SamBackbone) -> tuple[torch.Tensor, torch.Tensor]:
    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        np.ascontiguousarray(data.rocket()[:, :300]),
    ]
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


# --- defects 5 and 6: fingerprints without device weights; checkpoints from another device
# ---------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A digits run trained on the CPU (efficientnet_lite0 at 64 px, fp32)."""
    from helpers.digits_run import write_digits_project
    from samprobe.cli import main

    cfg = write_digits_project(tmp_path_factory.mktemp("gpu_ckpt"), per_class=8, epochs=3)
    assert main(["extract", "-c", str(cfg)]) == 0 and main(["train", "-c", str(cfg)]) == 0
    return cfg


def _as_if_trained_on_gpu(ckpt_path: Path, out: Path, resolved: str) -> Path:
    """The checkpoint a CUDA run would have written: config device cuda / precision auto, features
    (and so the fingerprint) at the resolved GPU precision."""
    from samprobe.backbones.registry import build_backbone, fingerprint
    from samprobe.config import BackboneConfig
    from samprobe.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    bb = build_backbone(BackboneConfig(**ckpt.backbone.config))
    ckpt.backbone.precision = resolved
    ckpt.backbone.fingerprint = fingerprint(
        bb, ckpt.backbone.pooling, ckpt.backbone.dtype, resolved
    )
    ckpt.config.update(device="cuda", precision="auto")
    save_checkpoint(ckpt, out)
    return out


def test_checkpoints_store_the_resolved_precision(trained):
    from samprobe.train.checkpoint import load_checkpoint

    for name in ("best.pt", "last.pt"):
        assert (
            load_checkpoint(trained.parent / "run" / "checkpoints" / name).backbone.precision
            == "fp32"
        )


@pytest.mark.parametrize("resolved", ["fp16", "tf32", "bf16"])
def test_a_gpu_trained_head_predicts_on_the_cpu(trained, tmp_path, resolved, caplog):
    from samprobe.predict import Classifier

    run = trained.parent / "run" / "checkpoints"
    gpu_ckpt = _as_if_trained_on_gpu(run / "best.pt", tmp_path / f"gpu_{resolved}.pt", resolved)
    images = sorted((trained.parent / "data" / "images").glob("*.png"))[:6]
    caplog.set_level("INFO", logger="samprobe")
    clf = Classifier.load(gpu_ckpt, device="cpu")
    expect = {"fp16": "fp32", "tf32": "fp32", "bf16": "bf16"}[resolved]
    assert clf.extractor.precision == expect and clf.extractor.device.type == "cpu"
    if expect != resolved:
        assert (
            f"features at precision {expect} on cpu (the head was trained on {resolved} features)"
            in caplog.text
        )
    got = clf.predict(images, top_k=2)
    if expect == "fp32":  # the same fp32 features as the CPU run's own checkpoint: the same answers
        ref = Classifier.load(run / "best.pt", device="cpu").predict(images, top_k=2)
        assert [(p.label, round(p.score, 5)) for p in got] == [
            (p.label, round(p.score, 5)) for p in ref
        ]
    assert all(p.label in ("zero", "one", "two") for p in got)


def test_evaluate_and_cache_commands_on_a_gpu_machine_touch_no_gpu(
    trained, fake_gpus, monkeypatch, capsys
):
    """device: cuda, precision: auto (bf16 on this 'H100'): the cached fp32 features of the
    checkpoint are found by its stored precision; the encoder is never moved to the GPU (a
    move would fail here: torch has no driver behind the mocked queries)."""
    import samprobe.backbones.registry as registry
    from samprobe.cli import main
    from samprobe.config import load_config
    from samprobe.features.extract import Extractor

    sets = ["--set", "device=cuda", "--set", "precision=auto"]
    ckpt = trained.parent / "run" / "checkpoints" / "best.pt"
    assert main(["evaluate", "-c", str(trained), "--checkpoint", str(ckpt), *sets]) == 0
    assert "evaluate: features at precision fp32 (the checkpoint's)" in capsys.readouterr().out
    assert main(["cache", "info", "-c", str(trained), *sets]) == 0
    # tf32 features: none cached
    assert (
        main(
            [
                "features",
                "export",
                "-c",
                str(trained),
                "--split",
                "all",
                "--out",
                str(trained.parent / "x.npz"),
                *sets,
                "--set",
                "precision=fp32",
            ]
        )
        == 2
    )
    ex = Extractor.from_config(
        load_config(trained, ["device=cuda", "precision=auto"]), on_device=False
    )
    assert ex.precision == "bf16" and all(p.device.type == "cpu" for p in ex.backbone.parameters())
    assert ex.fingerprint == registry.fingerprint(ex.backbone, ex.pooling, ex.dtype, "bf16")


# --- defects 8 and 9: the training loop's host/device traffic, RNG across device types, timeouts
# -----


def test_per_head_settings_are_copied_to_the_device_once_per_change():
    from samprobe.train.optim import StackedSGD, _on_device

    w = torch.nn.Parameter(torch.zeros(3, 4))
    opt = StackedSGD([w], torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3))
    # a device whose copies cost nothing here
    group, meta = (
        opt.param_groups[0],
        torch.device("meta"),
    )
    first = _on_device(opt, group, "head_lr", meta)
    assert first.device == meta and _on_device(opt, group, "head_lr", meta) is first
    frozen = _on_device(opt, group, "frozen", meta)
    opt.freeze(torch.tensor([False, True, False]))  # replaces the host tensor: copied again
    assert _on_device(opt, group, "frozen", meta) is not frozen
    # same device: no copy
    assert _on_device(opt, group, "head_wd", torch.device("cpu")) is group["head_wd"]


def test_resume_on_another_device_type_keeps_the_batch_order(caplog):
    from samprobe.config import TrainConfig
    from samprobe.train.loop import SweepTrainer

    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = (rng.normal(size=(48, 8)) + y[:, None]).astype(np.float32)
    cfg = TrainConfig(epochs=4, head="mlp", hidden=8, dropout=0.5, patience=10)
    a = SweepTrainer(x, y, x, y, class_weights=np.ones(3), cfg=cfg, seed=0)
    a.run(until_epoch=2)
    state = a.state_dict()
    assert state["rng"]["dropout_device"] == "cpu"
    # What a CUDA trainer writes: its generator state is (seed, offset), 16 bytes.
    state["rng"]["dropout"] = torch.tensor([1, 4096], dtype=torch.int64).view(torch.uint8)
    state["rng"]["dropout_device"] = "cuda"
    b = SweepTrainer(x, y, x, y, class_weights=np.ones(3), cfg=cfg, seed=0)
    caplog.set_level("WARNING", logger="samprobe")
    b.load_state_dict(state)
    assert "last.pt was written on cuda, resuming on cpu" in caplog.text
    assert torch.equal(b.gen.get_state(), a.gen.get_state())  # the batch order continues exactly
    assert b.run().best_epoch >= 1


def test_process_group_timeout_covers_rank_zero_validation():
    from samprobe.pipeline import process_group_timeout

    assert process_group_timeout(0).total_seconds() == 1800  # torch's default is the floor
    assert process_group_timeout(1_000_000).total_seconds() == pytest.approx(1800 + 20_000)
