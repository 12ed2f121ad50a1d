"""The `optimer` merge method for mergekit: task arithmetic against the base, fp32 accumulation.

Recipe parameters: per model `weight` (required, any sign); global `scale` (default 1.0) and
`normalize` (default false: true divides by the sum of weights). The result is returned in float32
(float64 for float64 inputs) and mergekit casts it to the recipe's `out_dtype` when one is set.
Non-finite or boolean `weight` or `scale` values are refused when mergekit resolves the
parameters, before it merges any tensor; values the rule cannot merge with (weights summing to 0
under `normalize`), and a merge with NaN/Inf values (an input model holds some), are one `Error:`
line under `mergekit-yaml`.
"""

from __future__ import annotations

import click
import torch
from mergekit.merge_methods import (
    BasePolicy,
    BatchParameter,
    InputContract,
    MergeMethod,
    ParameterScope,
    TensorBatch,
    merge_method,
)
from pydantic import AllowInfNan, BeforeValidator
from typing_extensions import Annotated

from optimer_merge.errors import UserError
from optimer_merge.io.yaml_config import not_boolean
from optimer_merge.merge.rule import merge_tensor
from optimer_merge.vectors.checks import is_finite

METHOD_NAME = "optimer"

# A finite number, never a YAML boolean (`weight: true` would merge as 1.0). Strings stay allowed:
# PyYAML reads `5e-1` as one, and mergekit turns it into the number.
Number = Annotated[float, BeforeValidator(not_boolean), AllowInfNan(False)]


@merge_method(
    name=METHOD_NAME,
    pretty_name="OptiMer (task arithmetic over distribution vectors)",
    reference_url="https://arxiv.org/abs/2603.28858",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def optimer_merge(
    batch: TensorBatch,
    weight: Annotated[torch.Tensor, BatchParameter(Number, ParameterScope.NON_BASE)],
    scale: Number = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    if batch.base_index is None:
        raise RecipeValueError("optimer needs a base model: set `base_model:` in the recipe")
    base = batch.tensors[batch.base_index]
    if not base.is_floating_point():
        raise TypeError("optimer merges floating-point tensors only")
    models = [t for i, t in enumerate(batch.tensors) if i != batch.base_index]
    try:
        merged = merge_tensor(base, models, weight, scale=scale, normalize=normalize)
    except ValueError as error:  # the recipe's values: one line under mergekit-yaml
        raise RecipeValueError(str(error)) from None
    if not is_finite(merged):  # never written: a NaN model looks like any other until it is used
        raise RecipeValueError(
            "optimer: the merged weights have NaN/Inf values: an input model holds some (a diverged training run? "
            "`optimer-merge vectors extract` names the model and tensor) or the weights are too large for float32"
        )
    return merged


class RecipeValueError(click.ClickException, ValueError, UserError):
    """A recipe value or input the method cannot merge with; click (which runs `mergekit-yaml`), and
    `optimer-merge merge`, print it as one `Error: ...` line instead of a traceback."""


def register() -> MergeMethod:
    """Register `optimer` in mergekit's method registry (idempotent); return the method."""
    from mergekit import merge_methods

    if METHOD_NAME not in {m.spec.name for m in merge_methods.registered_methods()}:
        merge_methods.register(optimer_merge)
    return merge_methods.get(METHOD_NAME)


register()
