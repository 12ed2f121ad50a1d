"""The OptiMer merge rule, in one place: out = base + scale * sum_i c_i * (theta_i - base).

``combine`` is the one function that computes it, for the registered mergekit method (model
tensors streamed one at a time) and for every search pool (rows resident in host, GPU or vLLM
worker memory): a recipe merged by stock `mergekit-yaml` and a search trial compute the same
weights. A row is either a model's own tensor theta_i (``relative``: kept as it is, so bf16 checkpoints
lose nothing before the final cast) or a distribution vector v_i.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import torch

# Elements per step when rows are resident, so temporaries stay small whatever the tensor's size
# (a 27B model's embedding has 1.4 G elements): on CPUs a step's two float32 buffers (1 MiB each)
# stay in cache (a 0.38 B model's merge with 4 rows on 2 cores: 0.9 s, against 1.3 s with 4 MiB
# buffers and 10x that with 64 MiB), on GPUs a step is large enough to hide kernel launches.
CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}


def pieces(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Flat views of a tensor, CHUNK elements each: element-wise checks and sums over them never
    allocate a temporary the size of the tensor."""
    flat = tensor.reshape(-1)
    step = CHUNK.get(tensor.device.type, CHUNK["cuda"])
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step]


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
    rows: Sequence[torch.Tensor] | Iterable[torch.Tensor],
    coeffs: torch.Tensor,
    *,
    relative: bool | Sequence[bool] = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + sum_i c_i * d_i with d_i = rows[i] - base where ``relative[i]``, else rows[i].

    Computed as (1 - sum of the relative c_i) * base + sum_i c_i * rows[i]: a model's delta is
    never formed, so each row costs one cast and one add (a quarter less memory traffic than
    forming d_i; the result differs from the literal formula by float32 rounding, far below a
    bf16 output's spacing). Accumulated in float32 (float64 for float64 bases) whatever the rows'
    dtypes and cast once: into ``out`` (any dtype; returned) or returned in the accumulation
    dtype. Inputs are never modified. ``rows`` is a sequence of K resident tensors (worked through
    in chunks of CHUNK elements, so temporaries stay small), or an iterable used once as it comes
    (mergekit's streamed models; then ``coeffs`` may be [B, K] for tensors batched along a leading
    B axis).
    """
    acc_dtype = accumulation_dtype(base.dtype)
    flags = [relative] * coeffs.shape[-1] if isinstance(relative, bool) else list(relative)
    if not isinstance(rows, Sequence) or coeffs.ndim != 1:
        base_coeff = 1.0 - coeffs[..., [i for i, rel in enumerate(flags) if rel]].sum(dim=-1)  # [] or [B]
        return _combine_streamed(base, rows, coeffs, base_coeff, acc_dtype, out)
    if out is not None and not out.is_contiguous():
        out.copy_(combine(base, rows, coeffs, relative=flags))
        return out
    result = out if out is not None else torch.empty(base.shape, dtype=acc_dtype, device=base.device)
    device = result.device  # rows kept in host memory are streamed to it chunk by chunk
    flat_base, flat_out = base.reshape(-1), result.view(-1)
    flat_rows = [row.reshape(-1) for row in rows]
    c = [float(v) for v in coeffs.tolist()]
    c_base = 1.0 - sum(weight for weight, rel in zip(c, flags, strict=True) if rel)  # the base's own coefficient
    step = CHUNK.get(device.type, CHUNK["cuda"])
    acc, row_buffer = (torch.empty(min(step, flat_base.numel()), dtype=acc_dtype, device=device) for _ in range(2))
    for start in range(0, flat_base.numel(), step):
        end = min(start + step, flat_base.numel())
        n = end - start
        acc[:n].copy_(flat_base[start:end], non_blocking=True)  # cast (and move) in the copy: no temporary
        if c_base != 1.0:
            acc[:n].mul_(c_base)
        for row, weight in zip(flat_rows, c, strict=True):
            row_buffer[:n].copy_(row[start:end], non_blocking=True)
            acc[:n].add_(row_buffer[:n], alpha=weight)
        flat_out[start:end].copy_(acc[:n])
    return result


def _combine_streamed(base, rows, coeffs, base_coeff, acc_dtype, out):
    def column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = values.to(acc_dtype)  # [] or [B], broadcast along the tensors' own axes
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    acc = base.to(acc_dtype) * column(base_coeff, base)
    for row, weights in zip(rows, coeffs.unbind(-1), strict=True):
        acc.addcmul_(row.to(acc_dtype), column(weights, acc))
    return acc if out is None else out.copy_(acc)


def merge_tensor(
    base: torch.Tensor,
    models: Iterable[torch.Tensor],
    weights: torch.Tensor,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """base + scale * sum_i w_i (theta_i - base) from model tensors, accumulated in float32/float64.

    Inputs are borrowed and never modified; the result is in the accumulation dtype. The models
    are used one at a time, so memory stays at about three tensors.
    """
    return combine(base, iter(models), coefficients(weights, scale, normalize), relative=True)
