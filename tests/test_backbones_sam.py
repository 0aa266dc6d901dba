"""SAM backbone: parity with segment_anything, pooling, checkpoint formats and failures."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data

from helpers.sam_factory import build_official_sam, write_official_checkpoint
from samprobe.backbones import registry, sam_attention
from samprobe.backbones.sam import SamBackbone, build_sam, infer_geometry, valid_token_mask
from samprobe.backbones.sam_state_dict import read_checkpoint, to_timm_keys
from samprobe.config import BackboneConfig, load_config
from samprobe.errors import CheckpointError, ConfigError
from samprobe.features.extract import Extractor
from samprobe.io import weights_sha256

ALL_POOLING = ["neck_avg", "neck_max", "block_avg"]


def _images() -> list[np.ndarray]:
    """Real photos, square / landscape / portrait."""
    return [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        np.ascontiguousarray(data.astronaut()[:, 140:330]),
    ]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_official_checkpoint(
        tmp_path_factory.mktemp("w") / "tiny.pth", "tiny", img_size=256
    )


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> SamBackbone:
    return SamBackbone.from_checkpoint(tiny_ckpt, img_size=256)


@pytest.fixture(scope="module")
def vitb_official():
    return build_official_sam("vit_b", img_size=256)


@pytest.fixture(scope="module")
def vitb_ckpt(tmp_path_factory, vitb_official) -> Path:
    """Official-format vit_b geometry at 256 px (pos_embed 16x16): cheap enough for CPU tests."""
    path = tmp_path_factory.mktemp("w") / "vitb256.pth"
    torch.save(vitb_official.state_dict(), path)
    return path


def _official_inputs(
    sam, images: list[np.ndarray], size: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Reference input: official ResizeLongestSide.apply_image (numpy path) + Sam.preprocess."""
    tf = ResizeLongestSide(size)
    xs, hws = [], []
    for img in images:
        r = tf.apply_image(img)
        hws.append(r.shape[:2])
        xs.append(sam.preprocess(torch.as_tensor(r).permute(2, 0, 1)[None].float()))
    return torch.cat(xs), hws


def _reference_pool(neck: torch.Tensor, hws: list[tuple[int, int]]) -> torch.Tensor:
    """Pool the official neck over rows [0, ceil(h'/16)) and cols [0, ceil(w'/16)) by slicing."""
    out = []
    for f, (h, w) in zip(neck, hws):
        v = f[:, : math.ceil(h / 16), : math.ceil(w / 16)]
        out.append(torch.cat([v.mean((1, 2)), v.amax((1, 2))]))
    return torch.stack(out)


def _batch(bb: SamBackbone, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    prepared = [bb.prepare(img) for img in images]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


def _check_parity(bb: SamBackbone, sam, images: list[np.ndarray]) -> None:
    ref_in, hws = _official_inputs(sam, images, bb.input_size)
    with torch.no_grad():
        ref_neck = sam.image_encoder(ref_in)
    x, valid = _batch(bb, images)
    assert [tuple(v) for v in valid.tolist()] == [tuple(h) for h in hws]
    with torch.inference_mode():
        _, neck = bb.trunk(bb.preprocess(x, valid))
    assert (neck - ref_neck).abs().max().item() < 1e-4
    ours = bb.encode(x, valid, ["neck_avg", "neck_max"])
    cos = F.cosine_similarity(ours, _reference_pool(ref_neck, hws))
    assert cos.min().item() >= 0.9999


@pytest.mark.slow
def test_parity_tiny_real_images(tiny):
    _check_parity(tiny, build_official_sam("tiny", img_size=256), _images())


@pytest.mark.slow
def test_parity_vit_b_geometry(vitb_ckpt, vitb_official):
    bb = SamBackbone.from_checkpoint(vitb_ckpt, img_size=256, variant="vit_b")
    assert bb.geometry.variant == "vit_b" and bb.geometry.num_heads == 12
    _check_parity(bb, vitb_official, _images()[1:3])  # one vit_b forward pair: keep it cheap


def test_bf16_autocast_close_to_fp32(tiny):
    x, valid = _batch(tiny, _images())
    fp32 = tiny.encode(x, valid, ALL_POOLING)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = tiny.encode(x, valid, ALL_POOLING)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (4, 256 + 256 + 64)
    assert F.cosine_similarity(bf16, fp32).min().item() >= 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_extractor_runs_cpu_bf16_in_bf16_weights_close_to_fp32(vitb_ckpt, tmp_path, precision):
    """At bf16 on the CPU the extractor casts the encoder to bf16 once and runs it without
    autocast (bf16 residual stream); the 12 blocks of vit_b geometry stay within pooled cosine
    0.999 of fp32 on real photos. fp32 keeps the weights as loaded."""
    cfg_path = tmp_path / "samprobe.yaml"
    cfg_path.write_text(
        f"device: cpu\nprecision: {precision}\ndata: {{image_root: {tmp_path}, format: folder}}\n"
        f"backbone: {{name: sam, checkpoint: {vitb_ckpt}, img_size: 256}}\n"
    )
    extractor = Extractor.from_config(load_config(cfg_path))
    bb = extractor.backbone
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {p.dtype for p in bb.encoder.parameters()} == {want}
    assert bb.compute_dtype == (torch.bfloat16 if precision == "bf16" else None)
    x, valid = _batch(bb, _images())
    reference = SamBackbone.from_checkpoint(vitb_ckpt, img_size=256, variant="vit_b")
    fp32 = reference.encode(x, valid, ALL_POOLING + ["interm_avg"])
    ours = extractor.encode_batch(x, valid)  # neck_avg, under the extractor's own autocast
    assert ours.dtype == np.float32 and ours.shape == (4, 256)
    cos = F.cosine_similarity(torch.from_numpy(ours), fp32[:, :256])
    assert cos.min().item() >= (0.999 if precision == "bf16" else 0.9999)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        every = bb.encode(x, valid, ALL_POOLING + ["interm_avg"])
    assert F.cosine_similarity(every, fp32).min().item() >= 0.999


def test_residual_stream_is_contiguous_from_the_first_block(tiny):
    """patch_embed's output is the conv's NCHW map permuted to [B, gh, gw, C]: kept as that
    strided view, every block's LayerNorm and reshape copied it (20% of a 1024 px vit_b forward)."""
    seen = []
    hooks = [
        blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
        for blk in tiny.encoder.blocks
    ]
    try:
        x, valid = _batch(tiny, _images()[:2])
        tiny.encode(x, valid, ["neck_avg"])
    finally:
        for h in hooks:
            h.remove()
    assert seen == [True] * len(tiny.encoder.blocks)


def _mlp_input(bb: SamBackbone) -> torch.Tensor:
    """What the first block's MLP sees on real photos: [B, N, C] normed tokens."""
    seen = []
    hook = bb.encoder.blocks[0].mlp.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        x, valid = _batch(bb, _images()[:2])
        bb.encode(x, valid, ["neck_avg"])
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_fuses_fc1_and_gelu_on_cpu_with_the_same_result(tiny, dtype):
    from timm.layers import Mlp
    from torch.profiler import ProfilerActivity, profile

    from samprobe.backbones.sam_attention import SamMlp

    mlp = tiny.encoder.blocks[0].mlp
    assert type(mlp) is SamMlp
    x = _mlp_input(tiny)
    w = {k: v.to(dtype) for k, v in mlp.state_dict().items()}
    fused = SamMlp(mlp.fc1.in_features, mlp.fc1.out_features).eval()
    plain = Mlp(mlp.fc1.in_features, mlp.fc1.out_features).eval()
    for m in (fused, plain):
        m.load_state_dict(w)
        m.to(dtype)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = fused(x.to(dtype))
    # tried, unless an earlier forward found that oneDNN refuses this dtype on this CPU
    tried = any("_linear_pointwise" in e.name for e in prof.events())
    assert tried or dtype in sam_attention._UNFUSABLE_DTYPES
    with torch.inference_mode():
        want = plain(x.to(dtype))
        exact = plain.double()(x.double())
    if dtype in sam_attention._UNFUSABLE_DTYPES:  # oneDNN refused it on this CPU: the plain path
        # the same Mlp.forward on the same weights in this process: identical arithmetic
        assert torch.equal(got, want)
    eps = torch.finfo(dtype).eps
    scale = exact.abs().max().item()
    # Within a few eps of the float64 result relative to its size (fp32 accumulates 3072-term
    # sums: ~5 eps seen; bf16 rounds its output: ~0.5 eps), and no worse than the unfused order.
    assert (got.double() - exact).abs().max().item() <= 16 * eps * scale
    assert (got.double() - exact).abs().max().item() <= 4 * (
        want.double() - exact
    ).abs().max().item() + eps * scale
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.inference_mode(), autocast, profile(activities=[ProfilerActivity.CPU]) as prof:
        fused(x.to(dtype))
    assert not any("_linear_pointwise" in e.name for e in prof.events())  # autocast: plain path


def test_mlp_falls_back_to_the_plain_path_where_onednn_has_no_fused_kernel(tiny, monkeypatch):
    """An AMD EPYC (avx512_bf16, no AMX) has no oneDNN bf16 linear + GELU: it raised "could not
    create a primitive descriptor" and failed every bf16 SAM extraction there."""
    from timm.layers import Mlp

    from samprobe.backbones.sam_attention import SamMlp

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    monkeypatch.setattr(sam_attention, "_UNFUSABLE_DTYPES", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    mlp = tiny.encoder.blocks[0].mlp
    fused = SamMlp(mlp.fc1.in_features, mlp.fc1.out_features).eval()
    plain = Mlp(mlp.fc1.in_features, mlp.fc1.out_features).eval()
    for m in (fused, plain):
        m.load_state_dict(mlp.state_dict())
    x = _mlp_input(tiny)
    with torch.inference_mode():
        first, second, want = fused(x), fused(x), plain(x)
    # the fallback is Mlp.forward itself on the same weights: identical arithmetic, any CPU
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(calls) == 1  # refused once, not retried on every forward
    assert {torch.float32} == sam_attention._UNFUSABLE_DTYPES


def test_prepare_pads_top_left_with_zeros(tiny):
    img = data.chelsea()  # 300 x 451
    t, (h, w) = tiny.prepare(img)
    assert t.dtype == torch.uint8 and t.shape == (3, 256, 256)
    assert (h, w) == (170, 256)
    assert t[:, h:].eq(0).all() and t[:, :h].float().mean() > 10


def test_padding_does_not_change_pooled_features(tiny):
    """Pooling covers the valid tokens only: the padding region's content must not leak in."""
    x, valid = _batch(tiny, [data.chelsea()])
    noisy = x.clone()
    # rows from ceil(170/16)*16 = 176 down are outside the valid token rows (zeroed anyway)
    noisy[:, :, 176:, :] = 255
    a = tiny.encode(x, valid, ALL_POOLING)
    b = tiny.encode(noisy, valid, ALL_POOLING)
    # the encoder's input is the same tensor, so the same kernels run on it: not one bit may move
    assert torch.equal(a, b)


def test_valid_token_mask_uses_ceil():
    mask = valid_token_mask(torch.tensor([[170, 256], [1, 17]]), (16, 16), 16)
    assert mask[0].sum(0).max() == 11 and mask[0].sum(1).max() == 16  # ceil(170/16) = 11 rows
    assert mask[1].sum() == 2  # 1 row x ceil(17/16) = 2 cols


def test_encode_order_dims_and_pooling_check(tiny):
    x, valid = _batch(tiny, _images()[:2])
    both = tiny.encode(x, valid, ["block_avg", "neck_avg"])
    assert both.shape == (2, 64 + 256)
    # one forward, sliced: the same computation on the same input, bit for bit on any CPU
    assert torch.equal(both[:, 64:], tiny.encode(x, valid, ["neck_avg"]))
    assert tiny.feature_dims() == {
        "neck_avg": 256,
        "neck_max": 256,
        "block_avg": 64,
        "interm_avg": 64,
    }
    with pytest.raises(ConfigError, match="neck_mean"):
        tiny.encode(x, valid, ["neck_mean"])


def test_identity_hashes_weights_file(tiny, tiny_ckpt):
    ident = tiny.identity()
    assert (
        ident["weights_sha256"]
        == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
        == weights_sha256(tiny_ckpt)
    )
    assert ident["variant"] == "custom" and ident["geometry"]["embed_dim"] == 64


@pytest.mark.parametrize(
    "variant,expect",
    [
        ("vit_b", (768, 12, 12, (2, 5, 8, 11))),
        ("vit_l", (1024, 24, 16, (5, 11, 17, 23))),
        ("vit_h", (1280, 32, 16, (7, 15, 23, 31))),
    ],
)
def test_detects_official_variants_from_shapes(variant, expect):
    with torch.device("meta"):  # shapes only: no vit_h weights are allocated
        sd = sam_model_registry[variant]().state_dict()
    g = infer_geometry(sd)
    assert (g.embed_dim, g.depth, g.num_heads, g.global_attn_indexes) == expect
    assert (g.variant, g.window_size, g.pos_embed_grid, g.out_chans, g.patch_size) == (
        variant,
        14,
        (64, 64),
        256,
        16,
    )


def test_non_official_shape_is_custom():
    with torch.device("meta"):
        sd = sam_model_registry["vit_b"]().state_dict()
    for k in [k for k in sd if "rel_pos" in k]:  # head_dim 48 -> 16 heads: not the official vit_b
        sd[k] = torch.empty(sd[k].shape[0], 48, device="meta")
    g = infer_geometry(sd)
    assert (g.variant, g.num_heads, g.embed_dim, g.depth) == ("custom", 16, 768, 12)


def test_variant_mismatch_names_both(vitb_ckpt):
    with pytest.raises(ConfigError) as err:
        SamBackbone.from_checkpoint(vitb_ckpt, img_size=256, variant="vit_l")
    msg = str(err.value)
    assert (
        "backbone.variant is vit_l" in msg
        and str(vitb_ckpt) in msg
        and "vit_b encoder (embed 768, depth 12)" in msg
    )


def test_truncated_file(tiny_ckpt, tmp_path):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        SamBackbone.from_checkpoint(bad, img_size=256)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("kind", ["text", "jpeg"])
def test_non_checkpoint_file(tmp_path, kind):
    from PIL import Image

    bad = tmp_path / f"not_weights_{kind}.pth"
    if kind == "text":
        bad.write_text("these are not the weights you are looking for\n")
    else:
        Image.fromarray(data.chelsea()).save(bad, format="JPEG")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        SamBackbone.from_checkpoint(bad, img_size=256)
    assert str(bad) in str(err.value)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("fmt", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, fmt):
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.pth"
    payload = {"image_encoder.pos_embed": _Payload(marker)}
    if fmt == "torch_save":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    # sanity: the payload does run when unpickled carelessly
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    with pytest.raises(CheckpointError) as err:
        SamBackbone.from_checkpoint(bad, img_size=256)
    assert str(bad) in str(err.value) and "could run code" in str(err.value)
    assert not marker.exists()


def test_missing_file_says_how_to_download(tmp_path):
    with pytest.raises(CheckpointError) as err:
        SamBackbone.from_checkpoint(tmp_path / "nope.pth")
    assert "does not exist" in err.value.message and str(tmp_path / "nope.pth") in err.value.message
    assert "samprobe weights download sam_vit_b --dir" in err.value.fix


def test_not_a_sam_state_dict(tmp_path):
    p = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, p)
    with pytest.raises(CheckpointError, match="does not hold a SAM image encoder"):
        SamBackbone.from_checkpoint(p, img_size=256)


def _neck(bb: SamBackbone) -> torch.Tensor:
    x, valid = _batch(bb, [data.coffee()])
    return bb.encode(x, valid, ALL_POOLING)


@pytest.mark.parametrize(
    "layout",
    ["encoder_only", "timm_pth", "timm_safetensors", "wrapped_model", "wrapped_state_dict"],
)
def test_other_layouts_load_the_same_weights(tiny, tiny_ckpt, tmp_path, layout):
    from safetensors.torch import save_file
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    official = torch.load(tiny_ckpt, weights_only=True)
    encoder_only = {
        k[len("image_encoder.") :]: v for k, v in official.items() if k.startswith("image_encoder.")
    }
    timm_sd = checkpoint_filter_fn(official, None)
    assert any("mlp.fc1" in k for k in timm_sd) and any("mlp.lin1" in k for k in encoder_only)
    path = tmp_path / ("w.safetensors" if layout == "timm_safetensors" else "w.pth")
    if layout == "encoder_only":
        torch.save(encoder_only, path)
    elif layout == "timm_pth":
        torch.save(timm_sd, path)
    elif layout == "timm_safetensors":
        save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(path))
    else:
        torch.save({layout.split("_", 1)[1]: official}, path)
    # the same weights from another file layout: the same model on the same input, bit for bit
    assert torch.equal(_neck(SamBackbone.from_checkpoint(path, img_size=256)), _neck(tiny))


@pytest.mark.slow
def test_timm_pretrained_name_with_local_file(vitb_ckpt, tiny_ckpt):
    via_timm = SamBackbone.from_checkpoint(
        vitb_ckpt, img_size=256, timm_model="samvit_base_patch16.sa1b"
    )
    direct_sd = to_timm_keys(torch.load(vitb_ckpt, weights_only=True))
    for k, v in via_timm.encoder.state_dict().items():
        assert torch.equal(v, direct_sd[k]), k
    with pytest.raises(CheckpointError, match="does not fit timm model samvit_base_patch16"):
        SamBackbone.from_checkpoint(tiny_ckpt, img_size=256, timm_model="samvit_base_patch16.sa1b")


def test_img_size_512_interpolates_like_timm(tiny_ckpt):
    from functools import partial

    from timm.models.vision_transformer_sam import VisionTransformerSAM, checkpoint_filter_fn

    bb = SamBackbone.from_checkpoint(tiny_ckpt, img_size=512)
    enc = bb.encoder
    assert bb.grid == (32, 32) and enc.pos_embed.shape == (1, 32, 32, 64)
    assert enc.blocks[1].attn.rel_pos_h.shape == (63, 32)  # global block: 2*32-1
    assert enc.blocks[0].attn.rel_pos_h.shape == (27, 32)  # windowed block keeps 2*14-1
    # timm resizes pos_embed and global rel-pos on the fly when run above its build size.
    ref = VisionTransformerSAM(
        img_size=256,
        embed_dim=64,
        depth=2,
        num_heads=2,
        global_attn_indexes=(1,),
        window_size=14,
        use_rel_pos=True,
        num_classes=0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    ref.load_state_dict(checkpoint_filter_fn(torch.load(tiny_ckpt, weights_only=True), ref))
    x, valid = _batch(bb, [data.astronaut(), data.coffee()])
    with torch.inference_mode():
        inp = bb.preprocess(x, valid)
        _, neck = bb.trunk(inp)
        expected = ref.forward_features(inp)
    assert neck.shape == (2, 256, 32, 32)
    assert (neck - expected).abs().max().item() < 1e-4


def test_img_size_must_be_multiple_of_patch(tiny_ckpt):
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        SamBackbone.from_checkpoint(tiny_ckpt, img_size=250)


def test_registered_builder(tiny_ckpt):
    build = registry.BACKBONES["sam"].load_builder()  # detects the family, then builds it
    for builder in (build, build_sam):
        bb = builder(BackboneConfig(checkpoint=tiny_ckpt, img_size=256))
        assert isinstance(bb, SamBackbone) and bb.input_size == 256
        with pytest.raises(ConfigError, match="backbone.checkpoint"):
            builder(BackboneConfig(checkpoint=None))
    assert bb.identity() == build_sam(BackboneConfig(checkpoint=tiny_ckpt, img_size=256)).identity()


def test_weights_hash_is_remembered_per_file_version(tmp_path, monkeypatch):
    from samprobe import io as sio

    w = tmp_path / "w.pth"
    w.write_bytes(b"a" * 1000)
    first = weights_sha256(w)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert json.loads(sio.sha256_store().read_text())[str(w.resolve())]["sha256"] == first
    # A new process (cache cleared) takes the stored hash for the same file version: no read.
    sio._cached_sha256.cache_clear()
    with monkeypatch.context() as m:
        m.setattr("builtins.open", lambda *a, **k: pytest.fail("the weights file was read again"))
        assert weights_sha256(w) == first
    # Rewritten with the same size and mtime (as cp -p / rsync -a leave it): ctime tells, hashed
    # again.
    st = w.stat()
    w.write_bytes(b"b" * 1000)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    sio._cached_sha256.cache_clear()
    assert weights_sha256(w) == hashlib.sha256(b"b" * 1000).hexdigest()
    # An unreadable store, or no home directory at all, is only a re-hash, never an error.
    sio.sha256_store().write_text("{not json")
    sio._cached_sha256.cache_clear()
    assert weights_sha256(w) == hashlib.sha256(b"b" * 1000).hexdigest()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(
        Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home")))
    )
    sio._cached_sha256.cache_clear()
    assert (
        sio.sha256_store() is None and weights_sha256(w) == hashlib.sha256(b"b" * 1000).hexdigest()
    )


def test_checkpoint_is_memory_mapped_not_read(tmp_path):
    # A zip checkpoint is mapped, not read: building a backbone only for its fingerprint (train,
    # evaluate) costs no weight I/O. Linux shows the mapping in /proc/self/maps.
    ckpt = write_official_checkpoint(tmp_path / "mapped.pth", "tiny", img_size=256)
    sd = read_checkpoint(ckpt)
    assert str(ckpt) in Path("/proc/self/maps").read_text()
    del sd


def _official_block_outputs(sam, ref_in: torch.Tensor) -> list[torch.Tensor]:
    """Every official ``ImageEncoderViT`` block's output [B, C, gh, gw], read with forward hooks."""
    outs: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, o: outs.append(o.permute(0, 3, 1, 2)))
        for blk in sam.image_encoder.blocks
    ]
    try:
        with torch.no_grad():
            sam.image_encoder(ref_in)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.slow
def test_block_features_match_the_official_blocks(vitb_ckpt, vitb_official):
    """block_avg@i,j pools the official blocks' outputs; interm_avg the global blocks' (SAM-HQ's interm_embeddings)."""
    bb = SamBackbone.from_checkpoint(vitb_ckpt, img_size=256)
    images = _images()[1:3]
    ref_in, hws = _official_inputs(vitb_official, images, bb.input_size)
    blocks = _official_block_outputs(vitb_official, ref_in)

    def ref_avg(i: int) -> torch.Tensor:  # 1-based block number, pooled over the valid tokens
        return torch.stack(
            [
                f[:, : math.ceil(h / 16), : math.ceil(w / 16)].mean((1, 2))
                for f, (h, w) in zip(blocks[i - 1], hws)
            ]
        )

    x, valid = _batch(bb, images)
    ours = bb.encode(x, valid, ["block_avg@6,12", "interm_avg", "block_avg"])
    assert (
        ours.shape
        == (2, 768 * 2 + 768 * 4 + 768)
        == (2, bb.pooled_dim(["block_avg@6,12", "interm_avg", "block_avg"]))
    )
    ref = torch.cat(
        [ref_avg(6), ref_avg(12), *[ref_avg(i) for i in (3, 6, 9, 12)], ref_avg(12)], dim=1
    )
    assert (ours - ref).abs().max().item() < 1e-4
    assert F.cosine_similarity(ours, ref).min().item() >= 0.9999
    # block 12 is the last block: block_avg@12 is block_avg
    torch.testing.assert_close(ours[:, 768:1536], ours[:, -768:])
    assert bb.sources(["block_avg@6,12"]) == {"block@6", "block@12"}  # no neck computed for it
