"""Classifier heads on pooled features. Feature standardisation (train mean/std) is part of
the head, so a checkpoint classifies raw cached features with no extra state."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
        self.mean.copy_(features.mean(0))
        std = features.std(0, unbiased=False)
        # Floor relative to the typical scale: near-constant features must not become huge.
        self.std.copy_(std.clamp_min(1e-3 + 1e-2 * float(std.mean())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> logits [B, num_classes]."""
        return self.net((x - self.mean) / self.std)


def head_from_spec(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Head:
    head = Head(spec["in_dim"], spec["num_classes"], spec["kind"], spec.get("hidden", 512), spec.get("dropout", 0.0))
    head.load_state_dict(state_dict)
    return head.eval()
