"""Training a head on in-memory features: AdamW, warm-up + cosine, class-weighted loss,
early stopping that restores the best weights. Small enough to read in one sitting."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from samprobe.config import TrainConfig
from samprobe.errors import TrainingError
from samprobe.train.classes import IGNORE
from samprobe.train.heads import Head


@dataclass
class TrainResult:
    head: Head
    best_epoch: int
    best_score: float
    last_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def _monitor_score(metrics: dict[str, float], monitor: str) -> float:
    """Higher is better."""
    return -metrics["val_loss"] if monitor == "val_loss" else metrics[f"val_{monitor}"]


def _val_metrics(head: Head, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, num_classes: int,
                 untrained_classes: int) -> dict[str, float]:
    """y: head targets with IGNORE for untrained classes (errors in accuracy, absent from the loss).
    ``untrained_classes``: how many untrained classes appear in y; each adds a recall of 0."""
    with torch.no_grad():
        logits = head(x)
        pred = logits.argmax(1)
        known = y != IGNORE
        loss = F.cross_entropy(logits[known], y[known], weight=weights).item() if known.any() else float("nan")
        correct = (pred == y)
        recalls = [correct[y == c].float().mean().item() for c in range(num_classes) if (y == c).any()]
        n_classes_present = len(recalls) + untrained_classes
        bal = float(np.sum(recalls) / n_classes_present) if n_classes_present else 0.0
        tp = torch.bincount(pred[correct], minlength=num_classes).float()
        pp = torch.bincount(pred, minlength=num_classes).float()
        support = torch.bincount(y[known], minlength=num_classes).float()
        prec = torch.where(pp > 0, tp / pp.clamp_min(1), torch.zeros_like(tp))
        rec = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-12), torch.zeros_like(tp))
        macro_f1 = f1[support > 0].mean().item() if (support > 0).any() else 0.0
    return {"val_loss": loss, "val_accuracy": correct.float().mean().item(), "val_balanced_accuracy": bal, "val_macro_f1": macro_f1}


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               class_weights: np.ndarray, cfg: TrainConfig, seed: int, val_untrained_classes: int = 0,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """x_*: float32 [N, D]; y_*: head targets [N] (IGNORE allowed in val only).
    ``val_untrained_classes``: distinct untrained classes among the val samples (for balanced accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = len(class_weights)
    xt, yt = torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long()
    xv, yv = torch.from_numpy(x_val).float(), torch.from_numpy(y_val).long()
    if (yt < 0).any() or (yt >= num_classes).any():
        raise TrainingError("a training target is outside the head's classes", fix="this is a bug in class mapping; please report it")
    if not torch.isfinite(xt).all():
        raise TrainingError("training features contain NaN/inf", fix="run `samprobe cache verify` and re-extract")
    weights = torch.from_numpy(class_weights).float()

    head = Head(xt.shape[1], num_classes, cfg.head)
    head.set_normalisation(xt)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, min(total // 20, 5 * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    has_val = len(xv) > 0
    best_score, best_epoch, best_state, stale = -math.inf, 0, copy.deepcopy(head.state_dict()), 0
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        perm = torch.randperm(len(xt), generator=gen)
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            loss = F.cross_entropy(head(xt[idx]), yt[idx], weight=weights)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step + 1}",
                                    fix=f"lower train.lr (now {cfg.lr}) or check the features with `samprobe cache verify`")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        head.eval()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / len(xt), "lr": sched.get_last_lr()[0]}
        if has_val:
            row.update(_val_metrics(head, xv, yv, weights, num_classes, val_untrained_classes))
            score = _monitor_score(row, cfg.monitor)
        else:
            score = -row["train_loss"]
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if score > best_score + cfg.min_delta:
            best_score, best_epoch, best_state, stale = score, epoch, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    last_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return TrainResult(head, best_epoch, best_score, last_state, history)
