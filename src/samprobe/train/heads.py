"""Classifier heads on cached features.

``Head`` is the single head a checkpoint holds (linear or MLP; feature standardisation with the
train mean/std is part of it, so it classifies raw cached features with no extra state).
``StackedHeads`` is H heads of the same shape trained together in one batched forward, as in
DINOv2's linear evaluation: weights stacked as [H, D, C], one einsum per layer for all heads.
``AttentiveProbe`` pools a spatial token grid [N, T, C] with one learned query.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("linear", "mlp")


class Head(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, kind: str = "linear", hidden: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.spec = {"kind": kind, "in_dim": in_dim, "num_classes": num_classes, "hidden": hidden, "dropout": dropout}
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, num_classes)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"unknown head kind {kind!r}")
        # Zero output layer: a feature that is constant in training gets no gradient, so a random
        # initial weight on it would survive and fire on new images (ReLU features dead in train).
        last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def set_normalisation(self, features: torch.Tensor) -> None:
        """features: [N, in_dim] training features."""
        mean, std = feature_stats(features)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> logits [B, num_classes]."""
        return self.net((x - self.mean) / self.std)


STATS_SAMPLES = 16384


def feature_stats(features: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of [N, D] features (fp16 caches, large N): one pass of sums
    and sums of squares, shifted by the first row so a large mean costs no precision, in float32
    chunks that stay in cache, accumulated in float64 (var_mean over dim 0 was 8x slower)."""
    if len(features) > STATS_SAMPLES:  # an evenly strided sample estimates them to ~1%: plenty for scaling
        features = features[::-(-len(features) // STATS_SAMPLES)]
    n, d = features.shape
    shift = features[:1].to("cpu", torch.float32) if n else torch.zeros(1, d)  # [1, D]
    total, squares = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, chunk):
        part = features[i:i + chunk].to("cpu", torch.float32) - shift  # [chunk, D]
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean_shifted = total / max(n, 1)
    m2 = (squares / max(n, 1) - mean_shifted * mean_shifted).clamp_min(0)
    mean = mean_shifted + shift[0].double()
    std = m2.sqrt().float()
    # Floor relative to the typical scale: a feature (nearly) constant in training must not
    # become huge on new images (ReLU features dead on the train set do fire elsewhere).
    return mean.float(), std.clamp_min(1e-3 + 1e-2 * float(std.mean()))


def head_from_spec(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Head:
    head = Head(spec["in_dim"], spec["num_classes"], spec["kind"], spec.get("hidden", 512), spec.get("dropout", 0.0))
    head.load_state_dict(state_dict)
    return head.eval()


def _heads_second(w: torch.Tensor) -> torch.Tensor:
    """[H, D, C] with the memory layout of [D, H, C]: ``_all_heads_matmul``'s [D, H*C] operand
    and its gradient are then views, not a permuted copy of every weight each step (the
    optimizer's ops are elementwise and keep the layout)."""
    return w.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _all_heads_matmul(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z [B, D] shared by all heads, w [H, D, C], b [H, C] -> z @ w[h] + b[h] as [H, B, C]: one
    [B, D] x [D, H*C] addmm instead of H small matmuls (the weight gradient is one GEMM too, and
    the bias is added inside the GEMM rather than by a pass over the strided [H, B, C] view)."""
    H, D, C = w.shape
    out = torch.addmm(b.reshape(1, H * C), z, w.permute(1, 0, 2).reshape(D, H * C))  # [B, H*C]
    return out.view(-1, H, C).transpose(0, 1)


class StackedHeads(nn.Module):
    """H independent heads evaluated in one pass: [B, D] -> logits [H, B, C].

    The loss is the sum of the heads' losses, so head h's gradient depends on head h only;
    each head gets its own lr and weight decay from ``StackedAdamW``.
    """

    def __init__(self, num_heads: int, in_dim: int, num_classes: int, kind: str = "linear", hidden: int = 512,
                 dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose from {HEAD_KINDS}")
        self.kind, self.num_heads, self.in_dim, self.num_classes = kind, num_heads, in_dim, num_classes
        self.hidden, self.dropout = hidden, dropout
        self.dropout_generator: torch.Generator | None = None
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if kind == "linear":
            # Zero init (as Head): a random weight on a feature that carries no signal in training
            # gets no gradient to remove it and stays as noise in the logits (measured: -1 to -4
            # points after 3 SGD epochs on 1280-d features with N(0, 0.01), bench/heads.py).
            self.w = nn.Parameter(_heads_second(torch.zeros(num_heads, in_dim, num_classes)))  # [H, D, C]
            self.b = nn.Parameter(torch.zeros(num_heads, num_classes))  # [H, C]
        else:
            # nn.Linear's default init (kaiming-uniform bound 1/sqrt(fan_in)).
            b1, b2 = 1 / math.sqrt(in_dim), 1 / math.sqrt(hidden)
            self.w1 = nn.Parameter(_heads_second((torch.rand(num_heads, in_dim, hidden, generator=generator) * 2 - 1) * b1))  # [H, D, K]
            self.b1 = nn.Parameter((torch.rand(num_heads, hidden, generator=generator) * 2 - 1) * b1)  # [H, K]
            self.w2 = nn.Parameter((torch.rand(num_heads, hidden, num_classes, generator=generator) * 2 - 1) * b2)  # [H, K, C]
            self.b2 = nn.Parameter((torch.rand(num_heads, num_classes, generator=generator) * 2 - 1) * b2)  # [H, C]

    def set_normalisation(self, features: torch.Tensor) -> None:
        mean, std = feature_stats(features)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def standardize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] raw features -> standardised [B, D] (what ``forward`` feeds the heads), into
        ``out`` when given. One fused pass, x * (1/std) + (-mean/std): memory-bound."""
        inv = 1.0 / self.std
        return torch.addcmul(-self.mean * inv, x, inv, out=out)

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None, standardized: bool = False) -> torch.Tensor:
        """x: [B, D] raw features (or ``standardize(x)`` with standardized=True) -> logits
        [H, B, C]; ``heads`` (indices [H']): only these heads, [H', B, C] (stopped heads cost nothing)."""
        z = x if standardized else self.standardize(x)
        pick = (lambda t: t) if heads is None else (lambda t: t.index_select(0, heads))
        if self.kind == "linear":
            return _all_heads_matmul(z, pick(self.w), pick(self.b))
        h = F.gelu(_all_heads_matmul(z, pick(self.w1), pick(self.b1)))  # [H, B, K]
        if self.training and self.dropout > 0:
            # Masks from our own generator (not the global RNG), so a resumed run draws the same masks.
            keep = torch.rand(h.shape, generator=self.dropout_generator, device=h.device) >= self.dropout
            h = h * keep / (1 - self.dropout)
        return torch.bmm(h, pick(self.w2)) + pick(self.b2)[:, None, :]

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "num_classes": self.num_classes, "hidden": self.hidden,
                "dropout": self.dropout}

    def head_state(self, h: int, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Head h as a ``Head`` state dict (nn.Linear stores weight as [out, in])."""
        p = params if params is not None else dict(self.named_parameters())
        state = {"mean": self.mean.clone(), "std": self.std.clone()}
        if self.kind == "linear":
            state.update({"net.weight": p["w"][h].t().contiguous().clone(), "net.bias": p["b"][h].clone()})
        else:
            state.update({"net.0.weight": p["w1"][h].t().contiguous().clone(), "net.0.bias": p["b1"][h].clone(),
                          "net.3.weight": p["w2"][h].t().contiguous().clone(), "net.3.bias": p["b2"][h].clone()})
        return {k: v.detach().float().cpu() for k, v in state.items()}

    def to_head(self, h: int, params: dict[str, torch.Tensor] | None = None) -> Head:
        return head_from_spec(self.spec(), self.head_state(h, params))


class AttentiveProbe(nn.Module):
    """Attentive pooling over a token grid, then a linear classifier.

    One learned query attends over the T tokens of each image (multi-head attention), as the
    attentive probes of V-JEPA / AIM do; ``mask`` marks padding tokens to ignore, so letterbox
    padding never dilutes the pooled feature.
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"in_dim {in_dim} must be divisible by num_heads {num_heads}")
        self.spec = {"kind": "attentive", "in_dim": in_dim, "num_classes": num_classes, "num_heads": num_heads, "dropout": dropout}
        self.norm = nn.LayerNorm(in_dim)
        self.query = nn.Parameter(torch.randn(1, 1, in_dim) * 0.02)
        self.attn = nn.MultiheadAttention(in_dim, num_heads, dropout=dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [N, T, C]; mask: [N, T] bool, True = padding. -> pooled [N, C]."""
        kv = self.norm(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1)  # [N, 1, C]
        pooled, _ = self.attn(q, kv, kv, key_padding_mask=mask, need_weights=False)  # [N, 1, C]
        return self.out_norm(pooled[:, 0])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [N, T, C] -> logits [N, num_classes]."""
        return self.fc(self.pool(tokens, mask))
