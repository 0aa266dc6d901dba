"""Classifier heads on cached features.

``Head`` is the single head a checkpoint holds (linear or MLP; feature standardisation with the
train mean/std is part of it, so it classifies raw cached features with no extra state).
``StackedHeads`` is H heads of the same shape trained together in one batched forward, as in
DINOv2's linear evaluation: weights stacked as [H, D, C], one einsum per layer for all heads.
``AttentiveProbe`` classifies a spatial token grid [N, T, C] (``features.spatial``) by attention
pooling with one learned query; ``StackedAttentiveProbe`` is H of them in one forward.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("linear", "mlp")  # on pooled features [N, D]; "attentive" reads the grid [N, T, C]

STEP_ELEMENTS = 1 << 25
"""Values of the input one forward may take ([B, D] or [B, T, C]): 128 MB at fp32. An attentive
step holds a few activations of the input's size, so grid batches are cut to this (pooled rows,
at most a few thousand values each, never are)."""


def rows_per_step(row_numel: int, most: int) -> int:
    """Rows of ``row_numel`` values per forward: ``most``, fewer when they would pass
    STEP_ELEMENTS."""
    return max(1, min(most, STEP_ELEMENTS // max(row_numel, 1)))


class StandardisedHead(nn.Module):
    """Base of every head: standardisation of each input channel with the training mean / std
    (buffers ``mean``, ``std`` [C]) is part of the head."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_normalisation(self, features: torch.Tensor) -> None:
        """features: [N, C] pooled training features, or [N, T, C] training grids. Grid statistics
        are over all tokens of an evenly strided sample of whole images (striding the flattened
        tokens would sample a few grid positions only)."""
        if features.dim() == 3:
            # at most STATS_SAMPLES tokens
            features = features[:: stats_stride(len(features), features.shape[1])]
            features = features.reshape(-1, features.shape[-1])
        mean, std = feature_stats(features)
        self.mean.copy_(mean)
        self.std.copy_(std)


class Head(StandardisedHead):
    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        kind: str = "linear",
        hidden: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim)
        self.spec = {
            "kind": kind,
            "in_dim": in_dim,
            "num_classes": num_classes,
            "hidden": hidden,
            "dropout": dropout,
        }
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, num_classes)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:
            raise ValueError(f"unknown head kind {kind!r}")
        # Zero output layer: a feature that is constant in training gets no gradient, so a random
        # initial weight on it would survive and fire on new images (ReLU features dead in train).
        last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> logits [B, num_classes]."""
        return self.net((x - self.mean) / self.std)


STATS_SAMPLES = 16384


def stats_stride(n: int, tokens: int = 1) -> int:
    """Stride of the evenly strided sample of ``n`` training rows (of ``tokens`` tokens each)
    that the standardisation statistics are computed on: at most STATS_SAMPLES tokens. Training
    that streams reads exactly these rows, so both paths standardise alike."""
    return max(1, -(-n // max(1, STATS_SAMPLES // tokens)))


def feature_stats(features: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of [N, D] features (fp16 caches, large N): one pass of sums
    and sums of squares, shifted by the first row so a large mean costs no precision, in float32
    chunks that stay in cache, accumulated in float64 (var_mean over dim 0 was 8x slower)."""
    # an evenly strided sample estimates them to ~1%: plenty for scaling
    if len(features) > STATS_SAMPLES:
        features = features[:: stats_stride(len(features))]
    n, d = features.shape
    shift = features[:1].to("cpu", torch.float32) if n else torch.zeros(1, d)  # [1, D]
    total, squares = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, chunk):
        part = features[i : i + chunk].to("cpu", torch.float32) - shift  # [chunk, D]
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean_shifted = total / max(n, 1)
    m2 = (squares / max(n, 1) - mean_shifted * mean_shifted).clamp_min(0)
    mean = mean_shifted + shift[0].double()
    std = m2.sqrt().float()
    # Floor relative to the typical scale: a feature (nearly) constant in training must not
    # become huge on new images (ReLU features dead on the train set do fire elsewhere).
    return mean.float(), std.clamp_min(1e-3 + 1e-2 * float(std.mean()))


def head_from_spec(
    spec: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> Head | AttentiveProbe:
    """The single head a checkpoint's ``head`` entry describes, in eval mode."""
    if spec["kind"] == "attentive":
        head: Head | AttentiveProbe = AttentiveProbe(
            spec["in_dim"],
            spec["num_classes"],
            spec["spatial"],
            spec["attn_heads"],
            spec["dropout"],
        )
    else:
        head = Head(
            spec["in_dim"], spec["num_classes"], spec["kind"], spec["hidden"], spec["dropout"]
        )
    head.load_state_dict(state_dict)
    return head.eval()


def _heads_second(w: torch.Tensor) -> torch.Tensor:
    """[H, D, C] with the memory layout of [D, H, C]: ``_all_heads_matmul``'s [D, H*C] operand
    and its gradient are then views, not a permuted copy of every weight each step (the
    optimizer's ops are elementwise and keep the layout)."""
    return w.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _all_heads_matmul(
    z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: torch.Tensor | None = None
) -> torch.Tensor:
    """z [B, D] shared by all heads, w [H, D, C], b [H, C] -> z @ w[h] + b[h] as [H, B, C]
    (``heads`` [H']: those only, [H', B, C]): one [B, D] x [D, H*C] addmm instead of H small
    matmuls (the weight gradient is one GEMM too, and the bias is added inside the GEMM rather
    than by a pass over the strided [H, B, C] view)."""
    _, D, C = w.shape
    w_dhc = w.permute(1, 0, 2)  # [D, H, C], contiguous (``_heads_second``)
    if heads is not None:
        # one copy, still [D, H', C]
        w_dhc, b = (
            w_dhc.index_select(1, heads),
            b.index_select(0, heads),
        )
    H = w_dhc.shape[1]
    out = torch.addmm(b.reshape(1, H * C), z, w_dhc.reshape(D, H * C))  # [B, H*C]
    return out.view(-1, H, C).transpose(0, 1)


def select_heads(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """t[heads] along the head dim 0, keeping t's memory layout (a [H, D, C] weight stored as
    [D, H, C] stays so: ``_all_heads_matmul`` needs it as a view)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # dims outermost first in memory
    # contiguous, memory order
    picked = t.permute(order).index_select(order.index(0), heads.to(t.device))
    return picked.permute([order.index(d) for d in range(t.dim())])


def pack_heads(model: nn.Module, heads: torch.Tensor) -> nn.Module:
    """A copy of a stacked model (every parameter [H, ...]) holding only ``heads``: training the
    heads still alive costs nothing for the stopped ones (no per-step gather of their weights,
    no optimizer passes over them). Buffers (normalisation) are copied as they are."""
    # not deep-copied
    generator, model.dropout_generator = (
        getattr(model, "dropout_generator", None),
        None,
    )
    packed = copy.deepcopy(model)
    model.dropout_generator = packed.dropout_generator = generator
    for module in packed.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(
                    select_heads(p.detach(), heads), requires_grad=p.requires_grad
                )
    packed.num_heads = len(heads)
    return packed


class StackedHeadsBase(StandardisedHead):
    """Base of the stacked forms: H heads (one per sweep setting) trained in one forward, every
    parameter with a leading H dimension, one shared standardisation. The loss is the sum of the
    heads' losses, so head h's gradient depends on head h only; each head gets its own lr and
    weight decay from the stacked optimizer (``train.optim``: ``StackedSGD``, ``StackedAdamW``)."""

    kind: str

    def __init__(self, num_heads: int, in_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__(in_dim)
        self.num_heads, self.in_dim, self.num_classes, self.dropout = (
            num_heads,
            in_dim,
            num_classes,
            dropout,
        )
        self.dropout_generator: torch.Generator | None = None

    def standardize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] (or grids [B, T, D]) raw features -> standardised, the shape of x (what
        ``forward`` feeds the heads), into ``out`` when given. One fused pass,
        x * (1/std) + (-mean/std): memory-bound."""
        inv = 1.0 / self.std
        return torch.addcmul(-self.mean * inv, x, inv, out=out)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        """Inverted dropout in training. Masks come from our own generator (not the global RNG),
        so a resumed run draws the same masks."""
        if not (self.training and self.dropout > 0):
            return h
        keep = (
            torch.rand(h.shape, generator=self.dropout_generator, device=h.device) >= self.dropout
        )
        return h * keep / (1 - self.dropout)

    def spec(self) -> dict[str, Any]:
        """The single head's description (a checkpoint's ``head.spec``), for ``head_from_spec``."""
        raise NotImplementedError

    def head_state(
        self, h: int, params: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Head h as the single head's state dict (``params``: these tensors instead of the
        parameters)."""
        raise NotImplementedError

    def to_head(
        self, h: int, params: dict[str, torch.Tensor] | None = None
    ) -> Head | AttentiveProbe:
        return head_from_spec(self.spec(), self.head_state(h, params))


class StackedHeads(StackedHeadsBase):
    """H independent linear or MLP heads evaluated in one pass: [B, D] -> logits [H, B, C]."""

    def __init__(
        self,
        num_heads: int,
        in_dim: int,
        num_classes: int,
        kind: str = "linear",
        hidden: int = 512,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose from {HEAD_KINDS}")
        super().__init__(num_heads, in_dim, num_classes, dropout)
        self.kind, self.hidden = kind, hidden
        if kind == "linear":
            # Zero init (as Head): a random weight on a feature that carries no signal in training
            # gets no gradient to remove it and stays as noise in the logits (measured: -1 to -4
            # points after 3 SGD epochs on 1280-d features with N(0, 0.01), bench/heads.py).
            # [H, D, C]
            self.w = nn.Parameter(_heads_second(torch.zeros(num_heads, in_dim, num_classes)))
            self.b = nn.Parameter(torch.zeros(num_heads, num_classes))  # [H, C]
        else:
            # nn.Linear's default init (kaiming-uniform bound 1/sqrt(fan_in)).
            b1, b2 = 1 / math.sqrt(in_dim), 1 / math.sqrt(hidden)
            # [H, D, K]
            self.w1 = nn.Parameter(
                _heads_second(
                    (torch.rand(num_heads, in_dim, hidden, generator=generator) * 2 - 1) * b1
                )
            )
            # [H, K]
            self.b1 = nn.Parameter(
                (torch.rand(num_heads, hidden, generator=generator) * 2 - 1) * b1
            )
            # [H, K, C]
            self.w2 = nn.Parameter(
                (torch.rand(num_heads, hidden, num_classes, generator=generator) * 2 - 1) * b2
            )
            # [H, C]
            self.b2 = nn.Parameter(
                (torch.rand(num_heads, num_classes, generator=generator) * 2 - 1) * b2
            )

    def forward(
        self, x: torch.Tensor, heads: torch.Tensor | None = None, standardized: bool = False
    ) -> torch.Tensor:
        """x: [B, D] raw features (or ``standardize(x)`` with standardized=True) -> logits
        [H, B, C]; ``heads`` (indices [H']): only these heads, [H', B, C] (stopped heads cost
        nothing)."""
        z = x if standardized else self.standardize(x)
        pick = (lambda t: t) if heads is None else (lambda t: t.index_select(0, heads))
        if self.kind == "linear":
            return _all_heads_matmul(z, self.w, self.b, heads)
        h = self._dropout(F.gelu(_all_heads_matmul(z, self.w1, self.b1, heads)))  # [H, B, K]
        return torch.bmm(h, pick(self.w2)) + pick(self.b2)[:, None, :]

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    def head_state(
        self, h: int, params: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Head h as a ``Head`` state dict (nn.Linear stores weight as [out, in])."""
        p = params if params is not None else dict(self.named_parameters())
        state = {"mean": self.mean.clone(), "std": self.std.clone()}
        if self.kind == "linear":
            state.update(
                {"net.weight": p["w"][h].t().contiguous().clone(), "net.bias": p["b"][h].clone()}
            )
        else:
            state.update(
                {
                    "net.0.weight": p["w1"][h].t().contiguous().clone(),
                    "net.0.bias": p["b1"][h].clone(),
                    "net.3.weight": p["w2"][h].t().contiguous().clone(),
                    "net.3.bias": p["b2"][h].clone(),
                }
            )
        return {k: v.detach().float().cpu() for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# attentive probe over the token grid


LN_EPS = 1e-6


def default_attn_heads(dim: int) -> int:
    """Attention heads of the probe: 8 (as V-JEPA's / AIM's attentive probes), fewer when
    ``dim`` is not divisible."""
    return next(a for a in (8, 4, 2, 1) if dim % a == 0)


def _query_keys(
    query: torch.Tensor, k_weight: torch.Tensor, norm_weight: torch.Tensor, attn_heads: int
) -> torch.Tensor:
    """query [..., C], k_weight [..., C, C] (nn.Linear layout), norm_weight [..., C] -> [..., A, C].

    Attention head a scores token t as q_a . (W_k (g * n_t + b))_a / sqrt(d) with n_t the token
    layer-normalised without affine: that is n_t . (g * W_{k,a}^T q_a) / sqrt(d) plus a term the
    same for every token, which the softmax cancels. So the keys are never built: one [A, C]
    matrix scores every token ([B, T, C] x [C, A] instead of a [B, T, C] x [C, C] projection)."""
    C = query.shape[-1]
    d = C // attn_heads
    q = query.unflatten(-1, (attn_heads, d)).unsqueeze(-1)  # [..., A, d, 1]
    wk = k_weight.unflatten(-2, (attn_heads, d))  # [..., A, d, C]
    return (wk * q).sum(-2) * norm_weight.unsqueeze(-2) / math.sqrt(d)  # [..., A, C]


class AttentiveProbe(StandardisedHead):
    """Attention pooling over a token grid, then a linear classifier (the attentive probe of
    V-JEPA / AIM, reduced to one cross-attention):

        tokens -> standardise -> LayerNorm -> one learned query attends over the T tokens
        (A heads, linear key / value projections) -> LayerNorm -> Dropout -> Linear.

    Standardisation with the train mean/std per channel is part of the head, as for ``Head``.
    Grids are pooled from valid tokens only (``features.spatial``), so there is no padding mask.
    The value projection is applied after pooling (it is linear and the attention weights sum
    to 1, so W_v sum_t a_t x_t + b_v = sum_t a_t (W_v x_t + b_v)): [B, A, C] x [C, d] per head
    instead of projecting every token.
    """

    def __init__(
        self, in_dim: int, num_classes: int, spatial: int, attn_heads: int = 8, dropout: float = 0.0
    ) -> None:
        if in_dim % attn_heads:
            raise ValueError(f"in_dim {in_dim} must be divisible by attn_heads {attn_heads}")
        super().__init__(in_dim)
        self.spec = {
            "kind": "attentive",
            "in_dim": in_dim,
            "num_classes": num_classes,
            "spatial": spatial,
            "attn_heads": attn_heads,
            "dropout": dropout,
        }
        self.attn_heads = attn_heads
        self.norm = nn.LayerNorm(in_dim, eps=LN_EPS)
        # as timm's AttentionPoolLatent
        self.query = nn.Parameter(torch.randn(in_dim) * in_dim**-0.5)
        # a key bias shifts every token's score alike: no effect
        self.k = nn.Linear(in_dim, in_dim, bias=False)
        self.v = nn.Linear(in_dim, in_dim)
        self.out_norm = nn.LayerNorm(in_dim, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.zeros_(self.fc.weight)  # as Head: no random weight on what training never moves
        nn.init.zeros_(self.fc.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [N, T, C] raw grid -> pooled [N, C] (after the output LayerNorm)."""
        N, _, C = tokens.shape
        A = self.attn_heads
        # [N, T, C], affine below
        n = F.layer_norm((tokens - self.mean) / self.std, (C,), eps=self.norm.eps)
        qk = _query_keys(self.query, self.k.weight, self.norm.weight, A)  # [A, C]
        attn = torch.softmax(n @ qk.T, dim=1)  # [N, T, A], over the tokens
        pooled = (
            attn.transpose(1, 2) @ n
        ) * self.norm.weight + self.norm.bias  # [N, A, C]: weighted mean of LN(tokens)
        v = torch.einsum("nac,adc->nad", pooled, self.v.weight.unflatten(0, (A, -1)))  # [N, A, d]
        return self.out_norm(v.reshape(N, C) + self.v.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [N, T, C] raw grid -> logits [N, num_classes]."""
        return self.fc(self.drop(self.pool(tokens)))


class StackedAttentiveProbe(StackedHeadsBase):
    """H attentive probes (one per sweep setting) in one forward: grid [B, T, C] -> logits
    [H, B, K].

    Same interface as ``StackedHeads`` (``standardize``, ``forward(x, heads, standardized)``,
    ``spec``, ``head_state``, ``to_head``); parameters carry a leading H dimension. The grid is
    shared by every setting and never copied per setting: the input LayerNorm is computed once
    (its per-setting affine folds into the query-key matrix and the pooled tokens, see
    ``_query_keys``), all H*A attention maps come from one [B*T, C] x [C, H*A] matmul, and the
    values are projected after pooling. So a step holds a few [B, T, C] activations, not
    H x B x T x C.
    """

    kind = "attentive"

    def __init__(
        self,
        num_heads: int,
        in_dim: int,
        num_classes: int,
        spatial: int,
        dropout: float = 0.0,
        attn_heads: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        H, C = num_heads, in_dim
        attn_heads = attn_heads or default_attn_heads(C)
        if C % attn_heads:
            raise ValueError(f"in_dim {C} must be divisible by attn_heads {attn_heads}")
        super().__init__(H, C, num_classes, dropout)
        self.attn_heads, self.spatial = attn_heads, spatial
        bound = 1 / math.sqrt(C)  # nn.Linear's default init

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        # [H, C]
        self.norm_w, self.norm_b = (
            nn.Parameter(torch.ones(H, C)),
            nn.Parameter(torch.zeros(H, C)),
        )
        self.query = nn.Parameter(torch.randn(H, C, generator=generator) * C**-0.5)  # [H, C]
        self.wk = uniform(H, C, C)  # [H, C_out, C_in], nn.Linear layout
        self.wv, self.bv = uniform(H, C, C), uniform(H, C)  # [H, C_out, C_in], [H, C]
        # [H, C]
        self.out_w, self.out_b = (
            nn.Parameter(torch.ones(H, C)),
            nn.Parameter(torch.zeros(H, C)),
        )
        self.wf = nn.Parameter(torch.zeros(H, C, num_classes))  # [H, C, K]; zero as Head
        self.bf = nn.Parameter(torch.zeros(H, num_classes))  # [H, K]

    def no_weight_decay(self) -> set[str]:
        """Per-setting vectors (norms, biases, the query) are not decayed, as timm's
        ``param_groups_weight_decay`` does: the sweep's L2 up to 0.1 would pull the LayerNorm
        gains to 0."""
        return {"norm_w", "norm_b", "query", "bv", "out_w", "out_b", "bf"}

    def forward(
        self, x: torch.Tensor, heads: torch.Tensor | None = None, standardized: bool = False
    ) -> torch.Tensor:
        """x: [B, T, C] raw grid (or ``standardize(x)`` with standardized=True) -> logits [H, B, K];
        ``heads`` (indices [H']): only these settings, [H', B, K]."""
        z = x if standardized else self.standardize(x)
        p = {
            k: v if heads is None else v.index_select(0, heads) for k, v in self.named_parameters()
        }
        H, (B, _, C), A = len(p["query"]), z.shape, self.attn_heads
        n = F.layer_norm(z, (C,), eps=LN_EPS)  # [B, T, C], shared by every setting
        qk = _query_keys(p["query"], p["wk"], p["norm_w"], A)  # [H, A, C]
        attn = torch.softmax(n @ qk.reshape(H * A, C).T, dim=1)  # [B, T, H*A], over the tokens
        pooled = (attn.transpose(1, 2) @ n).view(B, H, A, C)  # [B, H, A, C]
        pooled = pooled * p["norm_w"][None, :, None] + p["norm_b"][None, :, None]
        v = (
            torch.einsum("bhac,hadc->hbad", pooled, p["wv"].unflatten(1, (A, -1))).reshape(H, B, C)
            + p["bv"][:, None]
        )
        # [H, B, C]
        h = self._dropout(
            F.layer_norm(v, (C,), eps=LN_EPS) * p["out_w"][:, None] + p["out_b"][:, None]
        )
        return torch.bmm(h, p["wf"]) + p["bf"][:, None, :]

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "attentive",
            "in_dim": self.in_dim,
            "num_classes": self.num_classes,
            "spatial": self.spatial,
            "attn_heads": self.attn_heads,
            "dropout": self.dropout,
        }

    def head_state(
        self, h: int, params: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Setting h as an ``AttentiveProbe`` state dict."""
        p = params if params is not None else dict(self.named_parameters())
        state = {
            "mean": self.mean,
            "std": self.std,
            "norm.weight": p["norm_w"][h],
            "norm.bias": p["norm_b"][h],
            "query": p["query"][h],
            "k.weight": p["wk"][h],
            "v.weight": p["wv"][h],
            "v.bias": p["bv"][h],
            "out_norm.weight": p["out_w"][h],
            "out_norm.bias": p["out_b"][h],
            "fc.weight": p["wf"][h].t(),
            "fc.bias": p["bf"][h],
        }
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}
