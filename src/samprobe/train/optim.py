"""Per-head optimizers for stacked heads (``StackedSGD``: SGD with Nesterov momentum, the
default; ``StackedAdamW``), and the warm-up + cosine schedule.

Both are a ``StackedOptimizer``: every parameter has a leading head dimension H and each head
has its own lr and weight decay (tensors [H]). They are real ``torch.optim.Optimizer``s, so
LambdaLR, GradScaler and state_dict/load_state_dict work unchanged; the group's scalar ``lr``
is the schedule factor that multiplies every head's base lr. ``frozen`` heads (early-stopped or
diverged) are not updated at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from samprobe.train.heads import select_heads


def _on_device(
    opt: torch.optim.Optimizer, group: dict, key: str, device: torch.device
) -> torch.Tensor:
    """``group[key]``, a small per-head host tensor ([H] lr, decay, frozen), on ``device``: copied
    once per change (freeze replaces it), not once per parameter and step. Each pageable
    host-to-device copy waits for the GPU to finish its queue."""
    host = group[key]
    if host.device == device:
        return host
    cache = opt.__dict__.setdefault("_device_copies", {})
    slot = (id(group), key, device)
    hit = cache.get(slot)
    if hit is None or hit[0] is not host or hit[1] != host._version:
        hit = cache[slot] = (host, host._version, host.to(device))
    return hit[2]


class StackedOptimizer(torch.optim.Optimizer):
    """Base of the per-head optimizers: group settings ``head_lr`` and ``head_wd`` [H],
    ``decoupled`` (weight decay applied to the weights, else an L2 term added to the gradient),
    ``frozen`` bool [H]."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        head_lr: torch.Tensor,
        head_wd: torch.Tensor,
        decoupled: bool,
        **defaults: Any,
    ) -> None:
        head_lr = torch.as_tensor(head_lr, dtype=torch.float32)
        head_wd = torch.as_tensor(head_wd, dtype=torch.float32)
        super().__init__(
            params,
            {
                "lr": 1.0,
                **defaults,
                "head_lr": head_lr,
                "head_wd": head_wd,
                "decoupled": decoupled,
                "frozen": torch.zeros(len(head_lr), dtype=torch.bool),
            },
        )

    def freeze(self, heads: torch.Tensor) -> None:
        """heads: bool [H]; these heads are never updated again."""
        for group in self.param_groups:
            group["frozen"] = group["frozen"] | heads.cpu()


class StackedAdamW(StackedOptimizer):
    """AdamW (decoupled weight decay, bias correction, as torch.optim.AdamW) per head."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        head_lr: torch.Tensor,
        head_wd: torch.Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decoupled: bool = True,
    ) -> None:
        """decoupled=False: the decay is an L2 term added to the gradient (Adam + L2), whose
        fixed point is the L2-regularised optimum that scikit-learn's LogisticRegression finds."""
        super().__init__(params, head_lr, head_wd, decoupled, betas=betas, eps=eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.dim() - 1)  # broadcast [H] over the head's parameter
                live = ~_on_device(self, group, "frozen", p.device).view(shape)
                lr = (_on_device(self, group, "head_lr", p.device) * group["lr"]).view(shape) * live
                wd = _on_device(self, group, "head_wd", p.device).view(shape)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # A frozen head's gradient may be NaN (diverged): keep it out of the moments.
                all_live = not bool(group["frozen"].any())
                grad = (
                    p.grad
                    if all_live
                    else torch.where(
                        live, p.grad, torch.zeros((), dtype=p.grad.dtype, device=p.device)
                    )
                )
                if not group["decoupled"]:
                    grad = grad + (wd if all_live else wd * live) * p
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                if group["decoupled"]:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, per head
                denom = (v / bc2).sqrt_().add_(group["eps"])
                p.addcdiv_(m * (lr / bc1), denom, value=-1.0)
        return loss


class StackedSGD(StackedOptimizer):
    """SGD with Nesterov momentum (as torch.optim.SGD(momentum, nesterov=True), dampening 0)
    per head. The default for linear probes, as DINOv2's linear evaluation: on
    standardised features it reaches the L2 optimum's accuracy in 2-3 epochs where Adam needs
    15+ (its per-coordinate steps of size ~lr keep the many weak/noise dimensions jittering;
    measured in bench/heads.py)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        head_lr: torch.Tensor,
        head_wd: torch.Tensor,
        momentum: float = 0.9,
        decoupled: bool = False,
    ) -> None:
        super().__init__(params, head_lr, head_wd, decoupled, momentum=momentum)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            mu = group["momentum"]
            any_frozen = bool(group["frozen"].any())  # a host tensor: no device wait
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.dim() - 1)  # broadcast [H] over the head's parameter
                # heads never updated again
                frozen = _on_device(self, group, "frozen", p.device).view(shape)
                # schedule x head lr
                lr = (_on_device(self, group, "head_lr", p.device) * group["lr"]).view(shape)
                if any_frozen:
                    lr = lr.masked_fill(frozen, 0.0)
                wd = _on_device(self, group, "head_wd", p.device).view(shape)
                # A frozen head's gradient may be NaN (diverged): keep it out of the momentum.
                # In place on p.grad (zero_grad follows every step), writing the frozen heads only.
                grad = p.grad.masked_fill_(frozen, 0.0) if any_frozen else p.grad
                if not group["decoupled"]:
                    # L2 in the gradient: the fixed point is the L2-regularised optimum
                    grad.addcmul_(wd, p)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()  # torch.optim.SGD's first step
                else:
                    buf = state["momentum_buffer"]
                    torch.add(grad, buf, alpha=mu, out=buf)  # mu * buf + grad in one pass
                grad.add_(state["momentum_buffer"], alpha=mu)  # Nesterov: grad + mu * buf
                if group["decoupled"]:
                    p.mul_(1 - lr * wd)
                p.addcmul_(grad, lr, value=-1.0)
        return loss


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up to 1, then cosine to 0 at ``total_steps``."""
    warmup_steps = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (
            1
            + math.cos(
                math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            )
        )

    return factor


def _per_head(value: object, heads: torch.Tensor, num_heads: int) -> object:
    """A group setting or state entry restricted to ``heads`` when it is per head ([H, ...])."""
    if torch.is_tensor(value):
        return (
            select_heads(value, heads)
            if value.dim() and value.shape[0] == num_heads
            else value.clone()
        )
    return value


def pack_optimizer(
    opt: StackedOptimizer, full: list[torch.Tensor], packed: list[torch.Tensor], heads: torch.Tensor
) -> StackedOptimizer:
    """A stacked optimizer for ``packed`` (the parameters of ``pack_heads(model, heads)``, in the
    order of ``full``): every group's per-head settings and every state entry restricted to
    ``heads``."""
    num_heads = len(opt.param_groups[0]["head_lr"])
    to_packed = {id(f): p for f, p in zip(full, packed)}
    groups = [
        {
            **{k: _per_head(v, heads, num_heads) for k, v in g.items() if k != "params"},
            "params": [to_packed[id(p)] for p in g["params"]],
        }
        for g in opt.param_groups
    ]
    new = type(opt)(groups, groups[0]["head_lr"], groups[0]["head_wd"])
    for f, p in zip(full, packed):
        if opt.state.get(f):
            new.state[p] = {k: _per_head(v, heads, num_heads) for k, v in opt.state[f].items()}
    return new


def unpack_optimizer(
    packed_opt: torch.optim.Optimizer,
    opt: torch.optim.Optimizer,
    full: list[torch.Tensor],
    packed: list[torch.Tensor],
    heads: torch.Tensor,
) -> None:
    """Write ``packed_opt``'s state for ``heads`` back into ``opt`` (the inverse of
    ``pack_optimizer``)."""
    for f, p in zip(full, packed):
        for key, value in packed_opt.state.get(p, {}).items():
            state = opt.state[f]
            if value.dim():
                if key not in state:  # created during the packed steps (first momentum step)
                    state[key] = torch.zeros_like(f, memory_format=torch.preserve_format)
                state[key].index_copy_(0, heads.to(value.device), value)
            else:
                state[key] = value.clone()
