"""Tolerances for comparing float results: from the dtype's epsilon and the size of the values,
never from the rounding one machine happened to produce.

Two correct evaluations of one float computation differ because they round at different points:
another GEMM blocking (CPUs split a dot product differently: an AMD EPYC gave 1.43e-6 where this
Intel machine stayed below the old atol of 1e-6), another batch size or thread count, a fused
kernel. A sum of n terms, in any order, is within n*u*sum|x_i| of the exact sum (u = eps/2;
Higham, *Accuracy and Stability of Numerical Algorithms*, sec. 4.2), so two evaluations of it are
within n*eps*sum|x_i| of each other, with sum|x_i| <= n * max|x_i|. Chained layers add their
reduction lengths. These bounds are worst cases: far above what any machine shows, far below the
O(1) relative differences of a real bug (a wrong head, a wrong mask, a leaking pad).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def eps(dtype: Any) -> float:
    """Machine epsilon of a torch or numpy float dtype (float16 2**-10, bfloat16 2**-7, float32 2**-23)."""
    return (
        float(torch.finfo(dtype).eps)
        if isinstance(dtype, torch.dtype)
        else float(np.finfo(dtype).eps)
    )


def magnitude(*values: Any) -> float:
    """The largest absolute value among tensors / arrays (the scale their rounding errors are relative to)."""
    return max(
        float(
            np.abs(
                np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
            ).max()
        )
        for v in values
    )


def rounding_atol(dtype: Any, *, terms: int, scale: float) -> float:
    """Largest difference two evaluations of a computation in ``dtype`` may show when its longest
    chain of accumulations adds ``terms`` values of magnitude at most ``scale``."""
    return terms * eps(dtype) * scale


def close_after_rounding(dtype: Any, *, terms: int, scale: float) -> dict[str, float]:
    """``rtol=0, atol=rounding_atol(...)``, for ``torch.testing.assert_close`` / ``np.testing.assert_allclose``."""
    return {"rtol": 0.0, "atol": rounding_atol(dtype, terms=terms, scale=scale)}


def close_after_storage(
    stored: Any, compute: Any = torch.float32, *, terms: int, scale: float
) -> dict[str, float]:
    """Values computed in ``compute`` and rounded to ``stored`` (the fp16 cache): the two sides may
    differ by one ulp of ``stored`` (a compute-level difference crossing a rounding boundary), so
    ``rtol = eps(stored)``, plus the compute-level difference for values near zero."""
    return {
        "rtol": eps(stored),
        "atol": rounding_atol(compute, terms=terms, scale=scale) + eps(stored) * 2.0**-14,
    }


def reduction_terms(model: torch.nn.Module, tokens: int = 0) -> int:
    """The ``terms`` of a network's forward: every layer's fan-in (the length of the sums it
    accumulates: in_channels/groups x kernel for convolutions, in_features for linear layers, the
    normalised size for layer norms) added along the layers, plus ``tokens`` per attention layer
    (the softmax-weighted sum over keys)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            total += m.in_channels // m.groups * int(np.prod(m.kernel_size))
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features
        elif isinstance(m, torch.nn.LayerNorm):
            total += int(np.prod(m.normalized_shape))
        elif "Attention" in type(m).__name__:
            total += tokens
    return total


def efficientnet_lite0_terms() -> int:
    """``reduction_terms`` of timm's tf_efficientnet_lite0 (the test backbone), built without weights."""
    import timm

    return reduction_terms(
        timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    )
