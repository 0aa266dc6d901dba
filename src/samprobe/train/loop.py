"""Training a grid of heads in one pass, on features in memory or streamed from the cache
(``train.stream.CachedRows``: only where the batches come from changes).

Every (lr, weight_decay) setting of the sweep is one head of a ``StackedHeads`` (pooled
features [N, D]) or a ``StackedAttentiveProbe`` (token grids [N, T, C]): one batched
forward for all of them (DINOv2-style linear evaluation), the sum of their class-weighted
losses, and a per-head optimizer (``train.optimizer``: SGD with Nesterov momentum by default,
or AdamW). Warm-up + cosine schedule, gradient accumulation, autocast,
early stopping per head (a head that stops improving is frozen; the best weights of each head
are kept), and the whole state is a dict of tensors/builtins so a run resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from samprobe.config import TrainConfig
from samprobe.device import (
    autocast_context,
    is_oom,
    matmul_dtype,
    needs_grad_scaler,
    resolve_precision,
)
from samprobe.errors import CheckpointError, DeviceError, TrainingError
from samprobe.train.classes import IGNORE
from samprobe.train.heads import (
    AttentiveProbe,
    Head,
    StackedAttentiveProbe,
    StackedHeads,
    pack_heads,
    rows_per_step,
)
from samprobe.train.optim import (
    StackedAdamW,
    StackedSGD,
    pack_optimizer,
    unpack_optimizer,
    warmup_cosine,
)
from samprobe.train.stream import CachedRows, all_finite, non_finite_error

log = logging.getLogger("samprobe")
VAL_METRICS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1")
DIVERGED_LOSS = 4.0
DIVERGED_RISE = 10.0
"""A head whose epoch training loss is both above DIVERGED_LOSS x ln(classes) (the class-weighted
loss of a uniform guess is ln(classes)) and DIVERGED_RISE times its lowest so far is diverging:
stopped, and never the selected head. Both, as high-lr heads can start far above ln(classes) and
recover (attentive probes at lr 0.5: 12 at epoch 1), while a diverging one grows by orders of
magnitude (mlp at lr 20 on digits: 1.1, 495, 1.3e8, ...)."""
NOISE_SIGMAS = 2.0
"""Pruning margin floor: this many standard deviations of the monitored score's sampling noise."""


def score_noise(y_val: np.ndarray, num_classes: int, num_untrained: int, monitor: str) -> float:
    """Standard deviation, at its largest (every recall or accuracy 0.5), of a head's validation
    score from the sampling of the validation images alone: binomial per class for balanced
    accuracy (and macro-F1, as a stand-in), over all images for accuracy. 0 for val_loss (no bound)."""
    y = np.asarray(y_val)
    known = y[y >= 0]
    if monitor == "val_loss" or len(known) == 0:
        return 0.0
    if monitor == "accuracy":
        return 0.5 / math.sqrt(len(y))
    support = np.bincount(known, minlength=num_classes)
    support = support[support > 0]
    return float(0.5 * math.sqrt(float(np.sum(1.0 / support))) / (len(support) + num_untrained))


def sweep_grid(cfg: TrainConfig) -> list[tuple[float, float]]:
    """(lr, weight_decay) per head; the single (lr, weight_decay) when the sweep lists are empty."""
    lrs = list(cfg.sweep.lrs) or [cfg.lr]
    wds = list(cfg.sweep.weight_decays) or [cfg.weight_decay]
    return [(float(lr), float(wd)) for lr in lrs for wd in wds]


def micro_batches(batch_size: int, accumulate: int, row_numel: int) -> tuple[int, int]:
    """(rows per forward, forwards per optimizer step) for ``train.batch_size`` / ``train.accumulate``.

    A batch whose input would pass STEP_ELEMENTS values (grids: B x T x C; e.g. 512 x 32*32 x 256
    at features.spatial 32) is cut into equal parts accumulated as ``train.accumulate`` does, so
    the default batch size fits whatever the grid; pooled features are never cut."""
    parts = math.ceil(batch_size / rows_per_step(row_numel, batch_size))
    return math.ceil(batch_size / parts), accumulate * parts


def _stacked_model(
    cfg: TrainConfig,
    num_heads: int,
    shape: tuple[int, ...],
    num_classes: int,
    generator: torch.Generator,
) -> StackedHeads | StackedAttentiveProbe:
    """The sweep's heads for training features of ``shape``: pooled [N, D] (linear, mlp) or
    grids [N, S*S, C] (attentive)."""
    grid = cfg.head == "attentive"
    side = math.isqrt(shape[1]) if len(shape) == 3 else 0
    if len(shape) != (3 if grid else 2) or (grid and side * side != shape[1]):
        raise TrainingError(
            f"train.head {cfg.head} trains on "
            f"{'token grids [N, S*S, C]' if grid else 'pooled features [N, D]'}, "
            f"got features of shape {tuple(shape)}",
            fix="pass load_grid(cache, records, features.spatial) for attentive heads, "
            "load_features(cache, records) for linear / mlp",
        )
    if grid:
        return StackedAttentiveProbe(
            num_heads, shape[2], num_classes, side, cfg.dropout, generator=generator
        )
    return StackedHeads(
        num_heads, shape[1], num_classes, cfg.head, cfg.hidden, cfg.dropout, generator=generator
    )


def _param_groups(model: torch.nn.Module, num_heads: int) -> list[dict[str, Any]]:
    """Optimizer groups: every parameter with the sweep's weight decay, except those the model
    names in ``no_weight_decay()`` (a second group with decay 0)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    named = list(model.named_parameters())
    groups: list[dict[str, Any]] = [{"params": [p for n, p in named if n not in skip]}]
    if skip:
        groups.append(
            {"params": [p for n, p in named if n in skip], "head_wd": torch.zeros(num_heads)}
        )
    return groups


def _describe(spec: dict[str, Any]) -> str:
    """A head spec as the config keys that set it, for messages."""
    if spec["kind"] == "attentive":
        return f"train.head attentive (features.spatial {spec['spatial']})"
    return f"train.head {spec['kind']}" + (
        f" (train.hidden {spec['hidden']})" if spec["kind"] == "mlp" else ""
    )


@dataclass
class SweepResult:
    model: StackedHeads | StackedAttentiveProbe  # holds every head's best weights
    grid: list[tuple[float, float]]
    best_index: int
    best_epoch: int
    best_score: float
    head: Head | AttentiveProbe  # the selected head, best weights
    last_head: Head | AttentiveProbe  # the selected head, weights of the last epoch
    table: list[dict[str, Any]]  # one row per head (sweep.csv)
    history: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Subnormal floats as zero while training: confident heads push softmax probabilities and
    their gradients below 1e-38, and x86 arithmetic on subnormals is ~100x slower (digits set,
    lr 0.5: 1.5 -> 0.4 s for the whole sweep, same result). The mode is per thread (the one
    driving torch; oneDNN/OpenMP workers keep theirs); the caller's mode is restored after."""
    was_flushing = float(torch.tensor([1e-39]) * 1.0) == 0.0  # torch has no getter for the mode
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushing)


def _place_features(x: np.ndarray | CachedRows, device: torch.device) -> torch.Tensor | CachedRows:
    """[N, D] (or grids [N, T, C]) float32 on the device as one tensor when it fits in half the free memory;
    otherwise pinned on the host and moved batch by batch. Streamed features stay where they are."""
    if isinstance(x, CachedRows):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if device.type != "cuda":
        return t
    free, _ = torch.cuda.mem_get_info(device)
    return t.to(device) if t.numel() * 4 < free // 2 else t.pin_memory()


class _PinnedGather:
    """Rows of the training features as a batch on the device. Features on the device: one
    ``index_select`` there. Features left on the host (too large for the GPU): gathered into
    one of two pinned buffers in turn and copied ``non_blocking``, so the next batch is
    gathered while the GPU still copies and runs this one; an event per buffer says when it
    may be reused."""

    def __init__(self, features: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.features, self.device = features, device
        self.staged = features.device != device and features.is_pinned()
        if self.staged:
            shape = (min(batch_size, len(features)), *features.shape[1:])
            self.buffers = [
                torch.empty(shape, dtype=features.dtype, pin_memory=True) for _ in range(2)
            ]
            self.copied: list[Any] = [None, None]
            self.turn = 0

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.staged:
            # 2.5x faster than x[idx]
            return self.features.index_select(0, idx).to(self.device, non_blocking=True)
        k, self.turn = self.turn, 1 - self.turn
        if self.copied[k] is not None:
            self.copied[k].synchronize()  # its previous copy to the device has finished
        buf = self.buffers[k][: len(idx)]
        torch.index_select(self.features, 0, idx, out=buf)
        batch = buf.to(self.device, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record()
        return batch


class _WeightedCrossEntropy(torch.autograd.Function):
    """Per-head class-weighted mean cross-entropy with a hand-written backward: one softmax
    pass kept for the gradient (softmax - onehot, weighted). log_softmax + gather and their
    autograd backward cost 4-8x this on the CPU for small C ([8, 512, 10]: 1.8 -> 0.2 ms)."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, sample_w: torch.Tensor
    ) -> torch.Tensor:
        """logits [H, B, C] fp32, target [B] in 0..C-1, sample_w [B] (summing to 1) -> losses [H].
        Per-head targets and weights (cross-fitting: each head its own rows): target, sample_w [H, B]."""
        m = logits.amax(-1, keepdim=True)  # [H, B, 1]
        e = (logits - m).exp_()
        s = e.sum(-1, keepdim=True)
        at_target = target.view(-1, target.shape[-1], 1).expand(logits.shape[0], -1, 1)  # [H, B, 1]
        nll = (m + s.log() - logits.gather(2, at_target)).squeeze(2)  # [H, B]
        if ctx.needs_input_grad[0]:  # validation (no grad) needs the losses only
            ctx.save_for_backward(e.div_(s), at_target, sample_w)  # softmax [H, B, C]
        return nll @ sample_w if sample_w.dim() == 1 else (nll * sample_w).sum(1)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, at_target, sample_w = ctx.saved_tensors
        w = sample_w.view(-1, sample_w.shape[-1], 1) * grad_loss.view(-1, 1, 1)  # [H, B, 1]
        return (probs * w).scatter_add_(2, at_target, -w), None, None


def _head_losses(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [H, B, C], y [B] head targets (IGNORE allowed), or [H, B] per head -> weighted mean
    CE per head [H], as F.cross_entropy(weight=..., ignore_index=IGNORE) computes it for each head."""
    known = y != IGNORE
    target = y.clamp_min(0)
    w = torch.where(known, weights[target], torch.zeros((), device=y.device))  # [B] / [H, B]
    return _WeightedCrossEntropy.apply(
        logits.float(), target, w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    )


@torch.no_grad()
def evaluate_heads(
    model: StackedHeads | StackedAttentiveProbe,
    x: torch.Tensor | CachedRows,
    y: torch.Tensor,
    weights: torch.Tensor,
    *,
    num_untrained: int,
    device: torch.device,
    precision: str,
    batch_size: int = 4096,
    heads: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Validation metrics of every head (or of ``heads``, indices [H']), each [H] ([H']). y [N]: head
    targets with IGNORE for samples of untrained classes: errors in accuracy, recall 0 for their
    ``num_untrained`` classes in balanced accuracy and F1 0 in macro-F1, left out of the loss.
    y [H, N] (cross-fitting): each head's own targets, IGNORE = not that head's sample (left out)."""
    model.eval()
    H, C = model.num_heads if heads is None else len(heads), model.num_classes
    heads = None if heads is None else heads.to(device)
    y = y.to(device)
    per_head = y.dim() == 2
    if per_head and heads is not None:
        y = y.index_select(0, heads)
    # filled in place, nothing allocated per batch outlives it: a predictions tensor kept per
    # batch sat above that batch's freed logits in the heap, which glibc then kept resident (60k
    # rows x 8 heads x 1000 classes: 1.26 GB more; test_train_stream's validation growth test)
    pred, loss_num = (
        torch.empty(H, y.shape[-1], dtype=torch.long, device=device),
        torch.zeros(H, device=device),
    )
    if isinstance(x, CachedRows):  # read in storage order: the targets follow it
        y = y.index_select(y.dim() - 1, x.storage_order_on(device))
        batches: Iterator[torch.Tensor] = x.in_storage_order(batch_size)
    else:
        batches = (x[i : i + batch_size] for i in range(0, y.shape[-1], batch_size))
    i = 0
    for batch in batches:
        xb, yb = batch.to(device, non_blocking=True), y[..., i : i + len(batch)]
        with autocast_context(device, precision):
            logits = model(xb, heads)
        # the first maximum, as argmax; 1.4x faster for small C
        pred[:, i : i + len(batch)] = logits.max(-1).indices
        i += len(batch)
        known = yb != IGNORE
        loss_num += _head_losses(logits, yb, weights) * torch.where(
            known, weights[yb.clamp_min(0)], 0.0
        ).sum(-1)
    known = y != IGNORE
    w_total = torch.where(known, weights[y.clamp_min(0)], 0.0).sum(-1)
    correct = (pred == y).float()  # IGNORE never equals a prediction
    if per_head:
        target, known = y.clamp_min(0), known.float()
        support = torch.zeros(H, C, device=device).scatter_add_(1, target, known)  # [H, C]
        tp = torch.zeros(H, C, device=device).scatter_add_(1, target, correct)
        pp = torch.zeros(H, C, device=device).scatter_add_(1, pred, known)
        counted = known.sum(1)
    else:
        # counts by scatter_add, not a product with a one-hot [N, C]: that held N x C as int64 and
        # twice as float32 (300 k val rows x 1000 classes: 4.8 GB, the peak RSS of bench/scale.py's
        # full run). Counts are integers below 2^24: exact either way, the same values.
        target, known = y.clamp_min(0), known.float()  # [N]
        support = torch.zeros(C, device=device).scatter_add_(0, target, known)  # [C]
        tp = torch.zeros(H, C, device=device).scatter_add_(1, target.expand(H, -1), correct)
        pp = torch.zeros(H, C, device=device).scatter_add_(
            1, pred, torch.ones_like(pred, dtype=torch.float)
        )
        counted = torch.full((H,), float(len(y)), device=device)
    present = support > 0
    n_present = present.sum(-1) + num_untrained
    recall = torch.where(present, tp / support.clamp_min(1), 0.0)
    precision_ = torch.where(pp > 0, tp / pp.clamp_min(1), 0.0)
    f1 = torch.where(
        precision_ + recall > 0,
        2 * precision_ * recall / (precision_ + recall).clamp_min(1e-12),
        0.0,
    )
    denom = n_present.clamp_min(1).float()
    return {
        "val_loss": torch.where(w_total > 0, loss_num / w_total.clamp_min(1e-12), float("nan")),
        "val_accuracy": correct.sum(1) / counted.clamp_min(1),
        "val_balanced_accuracy": (recall * present).sum(1) / denom,
        "val_macro_f1": (f1 * present).sum(1) / denom,
    }


EVAL_LOGITS = 1 << 22
"""Logits [H, B, C] per validation forward (16 MB at fp32): B is cut to it, at most 4096 rows."""


def _progress_at_start(num_heads: int) -> dict[str, Any]:
    """A sweep's progress before its first epoch, by ``SweepTrainer`` attribute (tensors are per
    head, [H, ...]). ``state_dict`` saves and ``load_state_dict`` restores exactly these; the
    epoch history is not among them (it lives in metrics.jsonl, so last.pt does not grow)."""
    return {
        "epoch": 0,
        "best_score": torch.full((num_heads,), -math.inf),
        "best_epoch": torch.zeros(num_heads, dtype=torch.long),
        "best_metrics": torch.full(
            (num_heads, len(VAL_METRICS) + 1), math.nan
        ),  # train_loss + VAL_METRICS
        "stale": torch.zeros(num_heads, dtype=torch.long),  # epochs since the head last improved
        "sweep_stale": 0,  # epochs since the best head of the sweep last improved
        "alive": torch.ones(num_heads, dtype=torch.bool),
        "diverged": torch.zeros(num_heads, dtype=torch.bool),
        "min_train_loss": torch.full(
            (num_heads,), math.inf
        ),  # lowest epoch train loss: divergence test
        "status": ["training"] * num_heads,
    }


_PROGRESS = tuple(_progress_at_start(0))


def _copied(value: Any) -> Any:
    """A tensor cloned, a list copied (its entries shared), an int as it is."""
    return value.clone() if torch.is_tensor(value) else copy.copy(value)


class SweepTrainer:
    """The state of a sweep; ``run`` trains to the end, ``state_dict`` / ``load_state_dict``
    hold everything needed to continue after a kill.

    Cross-fitting (``samprobe inspect``) passes ``grid`` (one (lr, weight_decay) per head, settings
    may repeat), per-head targets y_train / y_val [H, N] with IGNORE where a row is not that head's,
    and ``independent``: every head is kept (no pruning, no stop when the leading head stalls)."""

    def __init__(
        self,
        x_train: np.ndarray | CachedRows,
        y_train: np.ndarray,
        x_val: np.ndarray | CachedRows,
        y_val: np.ndarray,
        *,
        class_weights: np.ndarray,
        cfg: TrainConfig,
        seed: int,
        val_untrained_classes: int = 0,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        grid: list[tuple[float, float]] | None = None,
        independent: bool = False,
    ) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.precision = (
            resolve_precision(self.device, precision) if precision == "auto" else precision
        )
        self.seed = seed
        self.grid = sweep_grid(cfg) if grid is None else [(float(lr), float(wd)) for lr, wd in grid]
        self.independent = independent
        H, C = len(self.grid), len(class_weights)
        yt = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
        if yt.dim() == 2 and yt.shape[0] != H:
            raise TrainingError(
                f"per-head targets [{yt.shape[0]}, N] for {H} heads",
                fix="pass one row of targets per head",
            )
        trained = yt[yt != IGNORE] if yt.dim() == 2 else yt
        if len(trained) == 0:
            raise TrainingError(
                "no training samples", fix="check data_report.json and the split settings"
            )
        if (trained < 0).any() or (trained >= C).any():
            # Cannot happen through ClassMapping.to_head; guards direct API use, where an
            # out-of-range
            # target would fail deep in the loss with a bare index error.
            raise TrainingError(
                f"training targets must be head indices 0..{C - 1} of active classes "
                f"(got {int(trained.min())}..{int(trained.max())})",
                fix="map labels with ClassMapping.to_head; samples of untrained classes cannot be "
                "training targets",
            )
        # streamed features are checked as they are read
        if any(not isinstance(x, CachedRows) and not all_finite(x) for x in (x_train, x_val)):
            raise non_finite_error()
        self.num_untrained = int(val_untrained_classes)
        self.xt, self.yt = _place_features(x_train, self.device), yt.to(self.device)
        self.xv = _place_features(x_val, self.device)
        self.yv = torch.as_tensor(np.asarray(y_val), dtype=torch.long)
        self.weights = torch.as_tensor(class_weights, dtype=torch.float32, device=self.device)

        # All randomness comes from generators this trainer owns and checkpoints (none from the
        # global RNG).
        self.gen = torch.Generator().manual_seed(seed)  # init and batch order
        self.dropout_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.model = _stacked_model(cfg, H, x_train.shape, C, self.gen)
        self.model.dropout_generator = self.dropout_gen
        self.model.set_normalisation(
            torch.from_numpy(
                x_train.stats_sample()
                if isinstance(x_train, CachedRows)
                else np.asarray(x_train, dtype=np.float32)
            )
        )
        self.model.to(self.device)
        # bf16/fp16 matmuls: train features standardised once, in that dtype (they round the same
        # fp32 values as per batch, so training is unchanged): half the gather traffic, no cast
        # per batch. fp32 (and streamed features): standardised per batch, in place: no second
        # copy of the set.
        self.standardize_batches = (
            isinstance(self.xt, CachedRows) or self._matmul_dtype() == torch.float32
        )
        self.zt = self.xt if self.standardize_batches else self._standardized(self.xt)
        del self.xt
        opt_cls = StackedSGD if cfg.optimizer == "sgd" else StackedAdamW
        self.opt = opt_cls(
            _param_groups(self.model, H),
            torch.tensor([g[0] for g in self.grid]),
            torch.tensor([g[1] for g in self.grid]),
            decoupled=cfg.weight_decay_mode == "decoupled",
        )
        row = math.prod(x_train.shape[1:])  # values per sample: D, or T*C for a grid
        self.batch_size, self.accumulate = micro_batches(cfg.batch_size, cfg.accumulate, row)
        # rows per validation forward: also bounded by the logits [H, B, C], which the loss copies
        # a few times (8 heads x 1000 classes at 4096 rows: a 330 MB peak; at 512: 42 MB)
        self.eval_batch = min(rows_per_step(row, 4096), max(1, EVAL_LOGITS // (H * C)))
        self.micro_steps = math.ceil(len(self.zt) / self.batch_size)
        self.per_head_targets = yt.dim() == 2
        self.opt_steps = math.ceil(self.micro_steps / self.accumulate)
        total = self.opt_steps * cfg.epochs
        warmup = max(1, min(total // 20, cfg.warmup_epochs * self.opt_steps))
        # no pruning before: every lr still ramps up
        self.warmup_end_epoch = math.ceil(warmup / self.opt_steps)
        self.noise_floor = NOISE_SIGMAS * score_noise(
            np.asarray(y_val), C, self.num_untrained, cfg.monitor
        )
        self.diverge_loss = DIVERGED_LOSS * math.log(max(C, 2))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(total, warmup))
        # GradScaler only for fp16 (bf16/fp32 need none); the torch.amp form, not torch.cuda.amp.
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(precision) else None

        self.best = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        vars(self).update(_progress_at_start(H))
        self.history: list[
            dict[str, Any]
        ] = []  # one row per epoch; saved in metrics.jsonl, not last.pt

    # --- one epoch -----------------------------------------------------------------------

    def _train_epoch(self) -> torch.Tensor:
        """One pass over the training set; returns the mean training loss per head [H] (0 for
        stopped heads). Stopped heads cost nothing: the epoch trains a packed copy of the live
        heads and their optimizer state, written back at its end (a kill loses that epoch: last.pt
        is written between epochs)."""
        heads = self.alive.nonzero().flatten()  # [H'] heads that train this epoch
        if len(heads) == len(self.grid):
            return self._train_steps(self.model, self.opt, heads)
        full = list(self.model.parameters())
        model = pack_heads(self.model, heads)
        packed = list(model.parameters())
        opt = pack_optimizer(self.opt, full, packed, heads)
        train_loss = self._train_steps(model, opt, heads)
        with torch.no_grad():
            for f, p in zip(full, packed):
                f.index_copy_(0, heads.to(f.device), p)
        unpack_optimizer(opt, self.opt, full, packed, heads)
        return train_loss

    def _train_steps(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, heads: torch.Tensor
    ) -> torch.Tensor:
        """The epoch's optimizer steps for ``model`` / ``opt`` holding ``heads`` (indices [H'] into the grid).

        Between optimizer steps nothing here waits for the device: the batch order
        goes to the features' device once per epoch, features that stay on the host are gathered
        into two pinned buffers in turn, and non-finite losses are zeroed on the device and
        looked at once per optimizer step (one wait per accumulation, not per forward)."""
        device = self.device
        model.train()
        # per-head targets (cross-fitting): the rows of these heads
        heads_y = heads.to(self.yt.device)
        # [H'], sample-weighted
        loss_sum = torch.zeros(len(heads), dtype=torch.float64, device=device)
        # [H'] non-finite since the last step
        broke = torch.zeros(len(heads), dtype=torch.bool, device=device)
        opt.zero_grad(set_to_none=True)
        # heads of ``model`` in the forward; None = all (until one diverges)
        sub: torch.Tensor | None = None
        for step, (zb, rows) in enumerate(self._epoch_batches()):
            if self.standardize_batches:
                zb = model.standardize(zb, out=zb)
            yb = self.yt.index_select(self.yt.dim() - 1, rows)
            if self.per_head_targets:  # [H, B] -> the rows of the heads in this forward
                yb = yb.index_select(0, heads_y)
                yb = yb if sub is None else yb.index_select(0, sub)
            with autocast_context(device, self.precision):
                logits = model(zb, sub, standardized=True)  # [H'', B, C]
            losses = _head_losses(logits, yb, self.weights)  # [H''], fp32
            finite = torch.isfinite(losses.detach())
            # a diverged head's NaN stays in its own gradients
            losses = torch.where(finite, losses, 0.0)
            if sub is None:
                broke |= ~finite
            else:
                broke.index_copy_(0, sub, broke[sub] | ~finite)
            loss = losses.sum() / self.accumulate
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            rows_in_batch = yb.shape[-1]  # yb [B], or [H'', B] per head
            if sub is None:
                loss_sum.add_(losses.detach(), alpha=rows_in_batch)
            else:
                loss_sum.index_add_(0, sub, losses.detach().double() * rows_in_batch)
            if (step + 1) % self.accumulate == 0 or step + 1 == self.micro_steps:
                if bool(broke.any()):  # the one wait per optimizer step
                    self._drop_diverged(broke, heads, opt, step)
                    sub = self.alive[heads].nonzero().flatten().to(device)
                    broke.zero_()
                    # Their NaN grads must not reach a shared check (GradScaler); heads left out of
                    # the forward have zero grads.
                    dead = (~self.alive[heads]).nonzero().flatten().to(device)
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.index_fill_(0, dead, 0.0)
                if self.scaler:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                self.sched.step()
                for packed_group, group in zip(opt.param_groups, self.opt.param_groups):
                    # the schedule's factor (a no-op unless packed)
                    packed_group["lr"] = group["lr"]
        out = torch.zeros(len(self.grid), dtype=torch.float64)
        out[heads] = loss_sum.cpu()
        return (out / len(self.zt)).float()

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's ``micro_steps`` batches in a new random order from ``self.gen``: (features
        [B, ...] on the device, a copy of their own; their rows, on the targets' device). In
        memory: a permutation of all rows, gathered batch by batch. Streamed: shuffled chunks of
        the shard files (``stream.CachedRows.epoch``)."""
        if isinstance(self.zt, CachedRows):
            for zb, rows in self.zt.epoch(self.gen, self.batch_size):
                yield zb.to(self.device, non_blocking=True), rows.to(self.yt.device)
            return
        perm = torch.randperm(len(self.zt), generator=self.gen)
        # once per epoch, not per step
        perm_z, perm_y = perm.to(self.zt.device), perm.to(self.yt.device)
        gather = _PinnedGather(self.zt, self.batch_size, self.device)
        for step in range(self.micro_steps):
            rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield gather(perm_z[rows]), perm_y[rows]

    def _drop_diverged(
        self, broke: torch.Tensor, heads: torch.Tensor, opt: torch.optim.Optimizer, step: int
    ) -> None:
        """Stop the heads of ``model`` flagged in ``broke`` ([H'], loss NaN/inf since the last optimizer step)."""
        stopped = torch.zeros(len(self.grid), dtype=torch.bool)
        stopped[heads[broke.cpu()]] = True
        if opt is not self.opt:
            opt.freeze(stopped[heads])
        self._diverged(stopped, step)

    @torch.no_grad()
    def _standardized(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] / [N, T, C] float32 (device or pinned host) -> standardised, in the matmul dtype, same placement."""
        chunk = rows_per_step(math.prod(x.shape[1:]), 8192)
        dtype = self._matmul_dtype()
        out = (
            torch.empty(x.shape, dtype=dtype, pin_memory=x.is_pinned())
            if x.device != self.device
            else torch.empty(x.shape, dtype=dtype, device=x.device)
        )
        for i in range(0, len(x), chunk):
            out[i : i + chunk] = (
                self.model.standardize(x[i : i + chunk].to(self.device)).to(dtype).to(out.device)
            )
        return out

    def _matmul_dtype(self) -> torch.dtype:
        return matmul_dtype(self.precision)

    def _diverged(self, heads: torch.Tensor, step: int) -> None:
        where = f"epoch {self.epoch + 1}, step {step + 1}"
        for h in heads.nonzero().flatten().tolist():
            self.status[h] = f"diverged at {where}"
        self.alive &= ~heads
        self.diverged |= heads
        self.opt.freeze(heads)
        # The last live heads diverging ends training; it is an error only when no head (one
        # stopped earlier, e.g. pruned) holds best weights with a finite score to fall back on.
        if not self.alive.any() and not torch.isfinite(self._selectable_scores()).any():
            lrs = sorted({g[0] for g in self.grid})
            raise TrainingError(
                f"loss became NaN/inf at {where} for every head (lr "
                f"{', '.join(f'{lr:g}' for lr in lrs)})",
                fix="the learning rate is too high for these features: lower train.lr / "
                "train.sweep.lrs (e.g. divide by 10), or use precision: fp32",
            )

    def _selectable_scores(self) -> torch.Tensor:
        """Best scores, -inf for diverged heads (never selected, whatever their early score)."""
        return torch.where(self.diverged, -math.inf, self.best_score)

    def _end_epoch(self, train_loss: torch.Tensor) -> dict[str, Any]:
        cfg = self.cfg
        has_val = len(self.xv) > 0
        # A finite but exploding loss (lr too high) is divergence too: its early best score is luck.
        trained = self.alive.clone()
        exploding = (
            self.alive
            & (train_loss > self.diverge_loss)
            & (train_loss > DIVERGED_RISE * self.min_train_loss)
        )
        for h in exploding.nonzero().flatten().tolist():
            self.status[h] = (
                f"diverged at epoch {self.epoch}: train loss {float(train_loss[h]):.4g}, over "
                f"{DIVERGED_RISE:g}x its lowest ({float(self.min_train_loss[h]):.4g}) and over "
                f"{DIVERGED_LOSS:g} x "
                f"ln classes ({self.diverge_loss:.3g}; a uniform guess scores ln classes)"
            )
        self.min_train_loss = torch.where(
            trained, torch.minimum(self.min_train_loss, train_loss), self.min_train_loss
        )
        if exploding.any():
            self.alive &= ~exploding
            self.diverged |= exploding
            self.opt.freeze(exploding)
            if not self.alive.any() and not torch.isfinite(self._selectable_scores()).any():
                raise TrainingError(
                    f"every head diverged by epoch {self.epoch} (train loss above "
                    f"{self.diverge_loss:.3g})",
                    fix="the learning rate is too high for these features: lower train.lr / "
                    "train.sweep.lrs (e.g. divide by 10)",
                )
        if has_val and not self.alive.any():  # the last live heads just diverged
            val = {k: torch.full_like(train_loss, math.nan) for k in VAL_METRICS}
            score = torch.full_like(train_loss, -math.inf)
        elif has_val:
            # Only heads that trained this epoch: a stopped head's metrics cannot change.
            training = self.alive.nonzero().flatten()
            part = evaluate_heads(
                self.model,
                self.xv,
                self.yv,
                self.weights,
                num_untrained=self.num_untrained,
                device=self.device,
                precision=self.precision,
                batch_size=self.eval_batch,
                heads=training,
            )
            val = {
                k: torch.full_like(train_loss, math.nan).index_copy_(0, training, v.float().cpu())
                for k, v in part.items()
            }
            score = -val["val_loss"] if cfg.monitor == "val_loss" else val[f"val_{cfg.monitor}"]
        else:
            val = {k: torch.full_like(train_loss, math.nan) for k in VAL_METRICS}
            score = -train_loss
        score = torch.nan_to_num(score, nan=-math.inf)
        was_alive = self.alive.clone()
        leader_before = float(self._selectable_scores().max())
        improved = was_alive & (score > self.best_score + cfg.min_delta)
        for name, p in self.model.named_parameters():
            mask = improved.to(p.device).view((-1,) + (1,) * (p.dim() - 1))
            self.best[name] = torch.where(mask, p.detach(), self.best[name])
        current = torch.stack([train_loss] + [val[k] for k in VAL_METRICS], 1)  # [H, 1 + M]
        self.best_metrics = torch.where(improved[:, None], current, self.best_metrics)
        self.best_score = torch.where(improved, score, self.best_score)
        self.best_epoch = torch.where(improved, torch.tensor(self.epoch), self.best_epoch)
        self.stale = torch.where(improved, 0, self.stale + was_alive.long())
        stopped = was_alive & (self.stale >= cfg.patience)
        for h in stopped.nonzero().flatten().tolist():
            self.status[h] = f"early-stopped at epoch {self.epoch}"
        self.alive &= ~stopped
        self.opt.freeze(stopped)
        # Early stopping on the best as well: once the leading score has not improved for
        # `patience` epochs, heads still improving below it cannot change the pick; stop them all.
        self.sweep_stale = (
            0
            if float(self._selectable_scores().max()) > leader_before + cfg.min_delta
            else self.sweep_stale + 1
        )
        if self.sweep_stale >= cfg.patience and self.alive.any() and not self.independent:
            for h in self.alive.nonzero().flatten().tolist():
                self.status[h] = (
                    f"stopped at epoch {self.epoch}: the best head did not improve for "
                    f"{cfg.patience} epochs"
                )
            self.opt.freeze(self.alive.clone())
            self.alive[:] = False
        pruned = self._prune()

        lead = (
            int(torch.argmax(torch.where(was_alive, score, -math.inf)))
            if was_alive.any()
            else self.best_index
        )
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "train_loss": float(train_loss[lead]),
            "lr": float(self.grid[lead][0] * self.sched.get_last_lr()[0]),
        }
        if has_val:
            row.update({k: float(val[k][lead]) for k in VAL_METRICS})
        row.update(
            {
                "head": lead,
                "best_head": self.best_index,
                "heads_training": int(self.alive.sum()),
                "stopped": {"pruned": pruned, "diverged": exploding.nonzero().flatten().tolist()},
                "heads": [
                    {
                        "lr": g[0],
                        "weight_decay": g[1],
                        "training": bool(trained[h]),
                        **(
                            {
                                "train_loss": float(train_loss[h]),
                                **({k: float(val[k][h]) for k in VAL_METRICS} if has_val else {}),
                            }
                            if trained[h]
                            else {}
                        ),
                    }
                    for h, g in enumerate(self.grid)
                ],
            }
        )
        self.history.append(row)
        return row

    @property
    def prune_margin(self) -> float | None:
        """The margin pruning uses: ``sweep.prune_margin``, raised to the noise floor of the
        monitored score on this validation set (a smaller gap can be sampling luck); None = off."""
        margin = self.cfg.sweep.prune_margin
        return None if margin is None else max(margin, self.noise_floor)

    def _prune(self) -> list[int]:
        """Stop heads whose best score is more than ``prune_margin`` below the leading head's
        (Hyperband-style): a setting that far behind does not win, and the batched forward then
        skips it. Best scores, not this epoch's: a head in a dip is not cut. Never during warm-up
        (every lr is still ramping up, so the ranking says little). Returns the heads pruned."""
        margin = self.prune_margin
        if (
            margin is None
            or self.independent
            or not self.alive.any()
            or len(self.xv) == 0
            or self.epoch < self.warmup_end_epoch
        ):
            return []  # without a validation set the score is the training loss, where more decay always looks worse
        lead = float(self._selectable_scores().max())
        pruned = self.alive & (self.best_score < lead - margin)
        loss = self.cfg.monitor == "val_loss"
        name = "val_loss" if loss else f"val_{self.cfg.monitor}"
        for h in pruned.nonzero().flatten().tolist():
            best, leading = (
                (-float(self.best_score[h]), -lead) if loss else (float(self.best_score[h]), lead)
            )
            self.status[h] = (
                f"pruned at epoch {self.epoch}: best {name} {best:.4f}, more than "
                f"{margin:.4g} (sweep.prune_margin {self.cfg.sweep.prune_margin:g}"
                + (
                    f", noise floor {self.noise_floor:.4g}"
                    if self.noise_floor > self.cfg.sweep.prune_margin
                    else ""
                )
                + f") from the leading head's {leading:.4f}"
            )
        self.alive &= ~pruned
        self.opt.freeze(pruned)
        return pruned.nonzero().flatten().tolist()

    @property
    def best_index(self) -> int:
        """Head with the highest best score (lowest index on ties: deterministic), diverged heads left out."""
        return int(torch.argmax(self._selectable_scores()))

    # --- driving -------------------------------------------------------------------------

    def run(
        self,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        on_state: Callable[[SweepTrainer], None] | None = None,
        until_epoch: int | None = None,
    ) -> SweepResult:
        """Train until every head stopped or ``cfg.epochs`` (or ``until_epoch``: a planned stop,
        as a kill would leave it); ``on_state`` after every epoch (the caller writes last.pt there)."""
        end = self.cfg.epochs if until_epoch is None else min(until_epoch, self.cfg.epochs)
        while self.epoch < end and self.alive.any():
            with flush_denormals(), self._oom_as_device_error(self.epoch + 1):
                train_loss = self._train_epoch()
                self.epoch += 1
                row = self._end_epoch(train_loss)
            if on_epoch:
                on_epoch(row)
            if on_state:
                on_state(self)
        if self.done:
            for h in range(len(self.grid)):
                if self.status[h] == "training":
                    self.status[h] = f"finished {self.epoch} epochs"
        return self.result()

    @contextlib.contextmanager
    def _oom_as_device_error(self, epoch: int) -> Iterator[None]:
        """Out of memory mid-epoch: one message with the settings that decide the memory (the
        epoch is lost; last.pt holds the one before)."""
        try:
            yield
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise DeviceError(
                f"out of memory on {self.device} in epoch {epoch} training {int(self.alive.sum())} "
                f"{self.cfg.head} heads on {self.batch_size} samples per step",
                fix="halve train.batch_size and double train.accumulate (the same effective "
                "batch), or train fewer "
                "sweep settings at once; `samprobe train --resume` continues from the last "
                "finished epoch",
            ) from None

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs or not bool(self.alive.any())

    def result(self) -> SweepResult:
        b = self.best_index
        if not math.isfinite(float(self._selectable_scores()[b])):
            raise TrainingError(
                "no head reached a finite validation score without diverging",
                fix="lower train.lr / train.sweep.lrs",
            )
        last_head = self.model.to_head(b)
        # the live model stays as is: training may go on (resume)
        best_model = copy.deepcopy(self.model)
        # early stopping restores the best weights
        best_model.load_state_dict({**self.model.state_dict(), **self.best})
        cols = ("train_loss",) + VAL_METRICS
        table = []
        for h, (lr, wd) in enumerate(self.grid):
            row = {
                "head": h,
                "lr": lr,
                "weight_decay": wd,
                "best_epoch": int(self.best_epoch[h]),
                f"best_{self.cfg.monitor}"
                if self.cfg.monitor != "val_loss"
                else "best_val_loss": float(-self.best_score[h])
                if self.cfg.monitor == "val_loss"
                else float(self.best_score[h]),
                **{c: float(self.best_metrics[h, i]) for i, c in enumerate(cols)},
                "status": self.status[h],
                "selected": h == b,
            }
            table.append(row)
        return SweepResult(
            best_model,
            self.grid,
            b,
            int(self.best_epoch[b]),
            float(self.best_score[b]),
            best_model.to_head(b),
            last_head,
            table,
            list(self.history),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bit for bit: tensors and builtins only (weights_only loads it)."""
        return {
            "grid": [list(g) for g in self.grid],
            "optimizer_name": self.cfg.optimizer,
            "head_spec": self.model.spec(),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "best": {k: v.detach().cpu().clone() for k, v in self.best.items()},
            **{name: _copied(getattr(self, name)) for name in _PROGRESS},
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            # read from the cache's shards (stream.CachedRows): a resume reads them so again
            "streamed": isinstance(self.zt, CachedRows),
            "rng": {
                "batches": self.gen.get_state(),
                "dropout": self.dropout_gen.get_state(),
                "dropout_device": self.dropout_gen.device.type,
            },
        }

    def load_state_dict(
        self, state: dict[str, Any], history: list[dict[str, Any]] | None = None
    ) -> None:
        """``history``: the epoch rows so far (metrics.jsonl); the state holds none, so that writing
        it every epoch costs the same at epoch 3000 as at epoch 1."""
        grid = [tuple(float(v) for v in g) for g in state["grid"]]
        if grid != self.grid or state["model"]["mean"].shape != self.model.mean.shape:
            raise CheckpointError(
                f"last.pt was written by a sweep over {len(grid)} settings on "
                f"{state['model']['mean'].shape[0]}-d "
                f"features; this config gives {len(self.grid)} settings on {self.model.in_dim}-d",
                fix="resume with the config of the interrupted run (run_dir/config.yaml), or "
                "train without --resume",
            )
        saved_spec, spec = state["head_spec"], self.model.spec()
        same_kind = [saved_spec["kind"], saved_spec.get("spatial")] == [
            spec["kind"],
            spec.get("spatial"),
        ]
        shapes = {k: v.shape for k, v in self.model.state_dict().items()}
        if not same_kind or {k: v.shape for k, v in state["model"].items()} != shapes:
            raise CheckpointError(
                f"last.pt was written for {_describe(saved_spec)} heads, this config trains "
                f"{_describe(spec)} heads",
                fix="resume with the config of the interrupted run (run_dir/config.yaml), or "
                "train without --resume",
            )
        saved_opt = state["optimizer_name"]
        if saved_opt != self.cfg.optimizer:
            raise CheckpointError(
                f"last.pt was written with train.optimizer {saved_opt}; this config has "
                f"{self.cfg.optimizer}",
                fix=f"resume with the config of the interrupted run (train.optimizer: "
                f"{saved_opt}), or train without --resume",
            )
        self.model.load_state_dict(state["model"])
        self.best = {k: v.to(self.device) for k, v in state["best"].items()}
        vars(self).update({name: _copied(state[name]) for name in _PROGRESS})
        self.history = list(history or [])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["rng"]["batches"])  # a CPU generator wherever training runs: exact
        self._restore_dropout_rng(state["rng"])

    def _restore_dropout_rng(self, rng: dict[str, Any]) -> None:
        """The dropout generator lives on the training device, and a CUDA generator's state (seed,
        offset) means nothing to a CPU one (or back): resumed on another device type, dropout
        draws from a fresh stream seeded by the seed and epoch (batch order stays exact)."""
        saved_on = rng["dropout_device"]
        if saved_on == self.dropout_gen.device.type:
            self.dropout_gen.set_state(rng["dropout"])
            return
        self.dropout_gen.manual_seed(self.seed + 1 + 1_000_003 * self.epoch)
        log.warning(
            f"train: last.pt was written on {saved_on}, resuming on "
            f"{self.device.type}: dropout continues from a new random stream, the batch order is "
            f"unchanged"
        )
