"""The OptiMer merge rule, in one place: out = base + scale * sum_i c_i * (theta_i - base).

Both the registered mergekit method and the in-memory trial merge call these functions, so a
recipe merged by stock `mergekit-yaml` and a search trial compute the same weights.
"""

from __future__ import annotations

from typing import Iterable

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16/fp16 never accumulate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(
    weights: torch.Tensor, scale: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """Turn per-model weights (shape [..., K]) into the coefficients c_i that multiply each delta.

    With ``normalize`` the weights are divided by their sum, so they read as mixture ratios and
    ``scale`` as the total step along the mixed direction.
    """
    weights = weights.to(accumulation_dtype(weights.dtype))
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)
        if bool((total.abs() < 1e-12).any()):
            raise ValueError(
                "optimer: normalize=true needs weights whose sum is not 0 "
                f"(got weights {weights.tolist()}); set normalize: false or change the weights"
            )
        weights = weights / total
    return weights * scale


def add_weighted(
    out: torch.Tensor, deltas: Iterable[torch.Tensor], coeffs: torch.Tensor
) -> torch.Tensor:
    """Add sum_i coeffs[..., i] * deltas[i] into ``out`` (an accumulation-dtype buffer we own).

    ``coeffs`` has shape [K] or [B, K] for deltas shaped [B, ...]; returns ``out``.
    """
    columns = coeffs.unbind(-1)
    for delta, column in zip(deltas, columns, strict=True):
        if column.ndim:
            column = column.reshape(column.shape + (1,) * (delta.ndim - column.ndim))
        out.addcmul_(delta.to(out.dtype), column.to(out.dtype))
    return out


def merge_tensor(
    base: torch.Tensor,
    models: Iterable[torch.Tensor],
    weights: torch.Tensor,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """base + scale * sum_i w_i (theta_i - base), accumulated in float32/float64.

    Inputs are borrowed and never modified; the result is in the accumulation dtype.
    """
    dtype = accumulation_dtype(base.dtype)
    base_acc = base.to(dtype)
    coeffs = coefficients(weights, scale, normalize)
    # The deltas are formed one model at a time, so memory stays at ~3 tensors per group.
    out = torch.zeros_like(base_acc)
    add_weighted(out, (model.to(dtype) - base_acc for model in models), coeffs)
    return out.add_(base_acc)
