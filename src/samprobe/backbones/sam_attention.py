"""Fast SAM attention for inference: same weights and numbers as timm/segment_anything, less memory traffic.

timm's SAM attention folds heads into the batch (3-D q/k/v) and materialises the decomposed
relative-position bias as a dense [B*heads, N, N] mask before ``scaled_dot_product_attention``.
For a global block at 1024 px (N = 4096) that mask is 800 MB in fp32 per image, and on CPU the
fused kernel with a mask runs far below matmul peak. Here scores are computed in chunks that
stay in cache (one head, 16 token rows of queries at 1024 px), the two bias terms are added by
broadcasting ([rows, W, 1, Wk] and [rows, W, Hk, 1] views, never [N, N]), then softmax and
``@ v`` on the same chunk. Measured on the idle 2-core AVX-512-BF16 CPU, bf16, one 64x64
global block, one image: timm 0.87 s, this 0.33 s (2 MB chunks). Small windows (14x14) fold
the bias into the score matmul instead: 0.052 s -> 0.023 s for 300 window-heads.

On CUDA those loops are the wrong trade: one vit_b trunk forward at batch 8 issues ~7,300
small kernels (1,536 chunk iterations, counted from the loop bounds) where timm issues ~360,
and a GPU idles between small kernels. There (``choose_attention``)
the bias is built as an additive mask for a few hundred (batch*head) slices at a time and
handed to ``F.scaled_dot_product_attention``, whose memory-efficient kernel takes an additive
mask: a handful of calls per block. The frozen relative-position tables are gathered once per
block, size, dtype and device (``SamAttention._tables``): no index tensors copied host to
device in every forward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer_sam import Attention, Block, get_rel_pos
from torch import nn

# Score elements per chunk: 2^22 bf16 = 8 MB, L3-resident. Smaller chunks (2^20) were as fast
# on an idle machine (0.33 s per global block) but each chunk is ~5 parallel regions, and on
# an oversubscribed machine (load 7 on 2 cores) 2^20 took 10.4 s vs 6.5 s for 2^22.
_CHUNK_ELEMS = 1 << 22
# Mask elements per SDPA call: 2^28 bf16 = 512 MB, e.g. 16 (image, head) slices of a 64x64
# global block; a few calls per block, memory bounded whatever the batch.
_SDPA_MASK_ELEMS = 1 << 28
ATTENTION_IMPLS = ("chunked", "sdpa")


log = logging.getLogger("samprobe")


def choose_attention(device: torch.device) -> str:
    """``chunked`` on the CPU (cache-sized loops, measured fastest there), ``sdpa`` on accelerators."""
    return "chunked" if torch.device(device).type == "cpu" else "sdpa"


def _folded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Small windows: fold the bias into one matmul, [q*scale, rel_h, rel_w] . [k, onehot(kh), onehot(kw)].

    Adding [.., Wk=14] slices by broadcasting is slow (tiny inner dim); a matmul with
    K = hd + Hk + Wk does the same sum at near-peak speed. q, k, v: [G, N, hd] -> [G, N, hd].
    """
    G, N, _ = q.shape
    H, W = hw
    tok = torch.arange(N, device=q.device)
    onehot_h = F.one_hot(tok // W, H).to(q.dtype)  # [N, Hk]: key row of each key token
    onehot_w = F.one_hot(tok % W, W).to(q.dtype)  # [N, Wk]: key column
    # [G, N, hd+Hk+Wk]
    qa = torch.cat([q * scale, rel_h.reshape(G, N, H), rel_w.reshape(G, N, W)], dim=-1)
    ka = torch.cat([k, onehot_h.expand(G, N, H), onehot_w.expand(G, N, W)], dim=-1)
    out = torch.empty_like(q)
    groups = max(1, _CHUNK_ELEMS // (N * N))
    for g0 in range(0, G, groups):
        g1 = min(G, g0 + groups)
        a = torch.matmul(qa[g0:g1], ka[g0:g1].transpose(-2, -1))  # [g, N, N]
        # Written in place (a leading-dim slice of out is contiguous): one copy less per group.
        torch.matmul(a.softmax(-1), v[g0:g1], out=out[g0:g1])
    return out


def _chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Large grids: scores for a few query rows of one head at a time, on top of the chunk's bias.

    Folding would triple K here (64 + 64 + 64) for no saving, and a dense bias is [N, N] per head.
    The chunk is first filled with rel_h + rel_w (one broadcast write), then the score matmul
    accumulates into it (``baddbmm_``, beta = 1): 3 passes over the chunk instead of 5 for
    matmul-then-two-adds (-7% per global attention), and one bf16 rounding instead of three.
    """
    G, N, _ = q.shape
    H, W = hw
    qs = q * scale
    # Transposed once, contiguous: a strided k^T made bmm copy the keys again for every chunk.
    kt = k.transpose(-2, -1).contiguous()  # [G, hd, N]
    out = torch.empty_like(q)
    rows = max(1, min(H, _CHUNK_ELEMS // (W * N)))  # token rows of queries per chunk
    groups = max(1, min(G, _CHUNK_ELEMS // (rows * W * N)))  # (batch*head) slices per chunk
    for g0 in range(0, G, groups):
        g1 = min(G, g0 + groups)
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            # bias[g, (h, w), (kh, kw)] = rel_h[g, h, w, kh] + rel_w[g, h, w, kw]: [g, r, W, Hk, Wk]
            # (out= keeps the chunk contiguous: a plain broadcast add may pick a permuted layout.)
            a = q.new_empty(g1 - g0, (r1 - r0) * W, N)  # [g, r*W, N]
            torch.add(
                rel_h[g0:g1, r0:r1, :, :, None],
                rel_w[g0:g1, r0:r1, :, None, :],
                out=a.view(g1 - g0, r1 - r0, W, H, W),
            )
            a.baddbmm_(qs[g0:g1, r0 * W : r1 * W], kt[g0:g1])
            # Written in place (the slice is contiguous): saves one copy per chunk.
            torch.matmul(a.softmax(-1), v[g0:g1], out=out[g0:g1, r0 * W : r1 * W])
    return out


def _sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    hw: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """The bias as an additive mask [g, N, N] for groups of slices, one fused SDPA call per group.

    The mask rows are allocated 8 elements wide-aligned (N=196 -> 200) and viewed back to N:
    the memory-efficient kernel wants 16-byte aligned mask rows and would otherwise copy the
    mask into a padded one on every call. q, k, v go in 4-D ([1, g, N, hd]): the fused kernels
    take 4-D inputs only (3-D falls back to the unfused math path).
    """
    G, N, hd = q.shape
    H, W = hw
    padded = N + (-N) % 8
    out = torch.empty_like(q)
    groups = max(1, min(G, _SDPA_MASK_ELEMS // (N * padded)))
    for g0 in range(0, G, groups):
        g1 = min(G, g0 + groups)
        mask = q.new_empty(g1 - g0, N, padded)[..., :N]  # [g, N, N], rows 16-byte aligned
        torch.add(
            rel_h[g0:g1, :, :, :, None],
            rel_w[g0:g1, :, :, None, :],
            out=mask.view(g1 - g0, H, W, H, W),
        )
        out[g0:g1] = F.scaled_dot_product_attention(
            q[None, g0:g1], k[None, g0:g1], v[None, g0:g1], attn_mask=mask[None], scale=scale
        )[0]
    return out


def rel_pos_tables(
    rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's [2S-1, hd] tables -> per-offset embeddings (Rh [H, Hk, hd], Rw [W, Wk, hd]) in ``dtype``."""
    H, W = hw
    return get_rel_pos(H, H, rel_pos_h).to(dtype), get_rel_pos(W, W, rel_pos_w).to(dtype)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    hw: tuple[int, int],
    scale: float,
    impl: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + B_rel) v with SAM's decomposed relative-position bias.

    q, k, v: [G, N, hd] (G = batch * heads, N = H * W tokens); tables: ``rel_pos_tables`` ->
    [G, N, hd]. ``impl``: chunked | sdpa (None: ``choose_attention`` for q's device).
    """
    G, N, hd = q.shape
    H, W = hw
    Rh, Rw = tables  # [H, Hk, hd], [W, Wk, hd]
    qr = q.view(G, H, W, hd)
    # Bias terms use the unscaled q, as in SAM: bias[g, (h, w), (kh, kw)] = rel_h[g, h, w, kh] +
    # rel_w[g, h, w, kw]
    rel_h = torch.einsum("ghwc,hkc->ghwk", qr, Rh)  # [G, H, W, Hk]
    rel_w = torch.einsum("ghwc,wkc->ghwk", qr, Rw)  # [G, H, W, Wk]
    impl = impl or choose_attention(q.device)
    if impl == "sdpa":
        return _sdpa_attention(q, k, v, rel_h, rel_w, hw, scale)
    if impl != "chunked":
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    attend = _folded_attention if hd >= H + W else _chunked_attention
    return attend(q, k, v, rel_h, rel_w, hw, scale)


class SamAttention(Attention):
    """timm's SAM ``Attention`` (same parameters) with the rel-pos attention above.

    ``impl`` (class default None = by device, ``choose_attention``) may be set per module."""

    impl: str | None = None

    def _tables(self, hw: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``rel_pos_tables`` for this block, gathered once per (size, dtype, device) and reused:
        the encoder is frozen. Keyed by the tables' version too, so an in-place weight load is seen."""
        device = self.rel_pos_h.device
        key = (
            hw,
            dtype,
            device,
            self.rel_pos_h._version,
            self.rel_pos_w._version,
            self.rel_pos_h.data_ptr(),
            self.rel_pos_w.data_ptr(),
        )
        cache = self.__dict__.setdefault("_rel_tables", {})
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = rel_pos_tables(self.rel_pos_h, self.rel_pos_w, hw, dtype)
        return cache[key]

    def _attend(self, qkv: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """qkv [3, G, N, hd] head-major (G = batch * heads) -> [G, N, hd], outside autocast."""
        q, k, v = qkv.unbind(0)
        # training the encoder: no cache
        tables = (
            self._tables(hw, q.dtype)
            if not torch.is_grad_enabled()
            else rel_pos_tables(self.rel_pos_h, self.rel_pos_w, hw, q.dtype)
        )
        return rel_pos_attention(q, k, v, tables, hw, self.scale, self.impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # [B, H, W, C] (windows count as batch)
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C))  # [B, N, 3C]
        # Autocast is switched off inside so every op below runs in the dtype qkv produced
        # (bf16 softmax: autocast's fp32 softmax would double the N x N traffic).
        with torch.autocast(device_type=x.device.type, enabled=False):
            # One copy to head-major layout: strided q/k/v make every chunk's matmul slower.
            # (.contiguous(), not reshape: with B = 1 reshape can merge B and h as a strided view.)
            # [3, B, h, N, hd]
            qkv = qkv.view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).contiguous()
            o = self._attend(qkv.view(3, B * self.num_heads, N, -1), (H, W))  # [B*h, N, hd]
            o = o.view(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1)  # [B, N, C]
        return self.proj(o).view(B, H, W, -1)

    def forward_windows(self, x: torch.Tensor, ws: int) -> torch.Tensor:
        """Windowed attention of the whole [B, H, W, C] map, = window_partition + attn + unpartition.

        qkv and proj run on the H*W real tokens only (timm runs them on the padded map: +20% at
        64 -> 70). SAM pads the normed tokens with zeros, so a pad token's qkv is exactly the
        qkv bias; those keys and values still take part in border windows, as in SAM.
        """
        B, H, W, C = x.shape
        h = self.num_heads
        Hp, Wp = H + (-H) % ws, W + (-W) % ws
        nh, nw = Hp // ws, Wp // ws
        qkv = self.qkv(x)  # [B, H, W, 3C]
        with torch.autocast(device_type=x.device.type, enabled=False):
            if (Hp, Wp) != (H, W):
                padded = qkv.new_empty(B, Hp, Wp, 3 * C)
                padded[:, :H, :W] = qkv
                pad_value = (
                    self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * C)
                ).to(qkv.dtype)
                padded[:, H:] = pad_value
                padded[:, :H, W:] = pad_value
                qkv = padded
            # [B, nh, ws, nw, ws, 3, h, hd] -> [3, B, nh, nw, h, ws, ws, hd]: one copy, head-major
            # windows
            qkv = qkv.view(B, nh, ws, nw, ws, 3, h, -1).permute(5, 0, 1, 3, 6, 2, 4, 7).contiguous()
            # [B*nW*h, ws*ws, hd]
            o = self._attend(qkv.view(3, B * nh * nw * h, ws * ws, -1), (ws, ws))
            # [B, nh, nw, h, ws, ws, hd] -> [B, nh, ws, nw, ws, h, hd] -> [B, Hp, Wp, C], crop the
            # padding
            o = o.view(B, nh, nw, h, ws, ws, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, C)
            # Contiguous 2-D rows for proj: a strided 4-D input turns F.linear into a bmm that
            # copies the weight once per row of the map.
            o = o[:, :H, :W].reshape(B, H * W, C)
        return self.proj(o).view(B, H, W, C)


def _onednn_linear_gelu_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_UNFUSABLE_DTYPES: set[torch.dtype] = set()
"""Dtypes oneDNN refused the fused linear for on this CPU: an AMD EPYC (avx512_bf16, no AMX)
raised "could not create a primitive descriptor for the inner product" at bf16."""


class SamMlp(Mlp):
    """timm's ``Mlp`` (same parameters); on the CPU in inference without autocast (the extractor's
    ``use_precision`` casts the weights instead), fc1 and its exact (erf) GELU run
    as one oneDNN linear with the GELU in the GEMM's epilogue instead of a second pass over the
    [N, 4C] activations. vit_b MLP, same run, AMX Xeon, 2 threads: 8192 tokens bf16 61 -> 44 ms,
    2048 tokens bf16 7.3 -> 6.7 ms, fp32 46 -> 38 ms; results within the dtype's rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fusable = (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            # the oneDNN op is not autocast-aware: under autocast fc1 would run in fp32
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and self.fc1.weight.requires_grad)
            and isinstance(self.act, nn.GELU)
            and self.act.approximate == "none"
            and isinstance(self.drop1, nn.Identity | nn.Dropout)
            and isinstance(self.norm, nn.Identity)
            and not (self.training and self.drop1.p)
            and x.dtype not in _UNFUSABLE_DTYPES
            and _onednn_linear_gelu_available()
        )
        if not fusable:
            return super().forward(x)
        try:
            x = torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.fc1.weight, self.fc1.bias, "gelu", [], "none"
            )
        except RuntimeError as exc:  # oneDNN has no such kernel for this CPU and dtype
            _UNFUSABLE_DTYPES.add(x.dtype)
            log.debug(f"SamMlp: fc1 + GELU unfused at {x.dtype} ({str(exc)[:120]})")
            return super().forward(x)
        return self.drop2(self.fc2(x))


class SamBlock(Block):
    """timm's SAM ``Block`` whose attention runs ``SamAttention`` and MLP ``SamMlp`` (forwards only differ)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.attn.use_rel_pos:
            raise ValueError("SamBlock needs relative-position attention, as every SAM encoder has")
        # Same modules, same parameters: only the forwards change, so switching the class is exact.
        self.attn.__class__ = SamAttention
        if type(self.mlp) is Mlp:
            self.mlp.__class__ = SamMlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size == 0:
            return super().forward(x)
        B, H, W, C = x.shape
        x = x + self.drop_path1(
            self.ls1(self.attn.forward_windows(self.norm1(x), self.window_size))
        )
        x = x.reshape(B, H * W, C)  # MLP is faster for N, L, C tensor
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)
