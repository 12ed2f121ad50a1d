"""The OptiMer merge rule, in one place: out = base + scale * sum_i c_i * (theta_i - base).

The registered mergekit method and the search's resident pool both call ``combine``: the method
with deltas streamed one model at a time, the pool with a resident [K, n] block (one GEMV per
tensor). So a recipe merged by stock `mergekit-yaml` and a search trial compute the same weights.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16/fp16 never accumulate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(weights: torch.Tensor, scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Turn per-model weights (shape [..., K]) into the coefficients c_i that multiply each delta.

    With ``normalize`` the weights are divided by their sum, so they read as mixture ratios and
    ``scale`` as the total step along the mixed direction.
    """
    weights = torch.as_tensor(weights)
    weights = weights.to(accumulation_dtype(weights.dtype))
    if not (bool(torch.isfinite(weights).all()) and math.isfinite(scale)):
        raise ValueError(f"optimer: weights and scale must be finite numbers (got weights {weights.tolist()}, scale {scale})")
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)
        if bool((total.abs() < 1e-12).any()):
            raise ValueError(
                "optimer: normalize=true needs weights whose sum is not 0 "
                f"(got weights {weights.tolist()}); set normalize: false or change the weights"
            )
        weights = weights / total
    return weights * scale


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor | Iterable[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + sum_i coeffs[..., i] * deltas[i], in ``base``'s dtype (an accumulation dtype).

    ``deltas`` is either a [K, n] block with ``base`` flat [n] (one GEMV: a single read of the
    block, into ``out`` when given), or K tensors shaped like ``base``, each used once as it comes
    (``coeffs`` [K], or [B, K] for tensors batched along a leading B axis). Inputs are never
    modified.
    """
    if isinstance(deltas, torch.Tensor):
        return torch.addmv(base, deltas.T, coeffs.to(deltas.dtype), out=out)
    result = torch.zeros_like(base) if out is None else out.zero_()
    for delta, column in zip(deltas, coeffs.unbind(-1), strict=True):
        if column.ndim:
            column = column.reshape(column.shape + (1,) * (delta.ndim - column.ndim))
        result.addcmul_(delta.to(result.dtype), column.to(result.dtype))
    return result.add_(base)


def merge_tensor(
    base: torch.Tensor,
    models: Iterable[torch.Tensor],
    weights: torch.Tensor,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """base + scale * sum_i w_i (theta_i - base) from model tensors, accumulated in float32/float64.

    Inputs are borrowed and never modified; the result is in the accumulation dtype. The deltas
    are formed one model at a time, so memory stays at about three tensors.
    """
    base_acc = base.to(accumulation_dtype(base.dtype))
    coeffs = coefficients(weights, scale, normalize)
    return combine(base_acc, (model.to(base_acc.dtype) - base_acc for model in models), coeffs)
