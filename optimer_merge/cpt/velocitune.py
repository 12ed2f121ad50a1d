"""Velocitune's rule (Luo et al., ACL 2025): domains that are far from their target loss get more data.

Learning velocity V_i = clip((l_i - t_i) / (l_init_i - t_i), 0, 1), with l_i the current held-out
loss, l_init_i the loss before training and t_i the target (where t_i >= l_init_i: 1 while l_i > t_i,
else 0); then w_i <- w_i exp(V_i) / sum_j w_j exp(V_j).
Targets come from a scaling-law fit L(D) = E + B / D^beta to a short proxy run, evaluated at the
tokens each domain will see in the full run. With ``refit`` (the default), each update refits the
law on the run's own held-out losses once three updates are in, extrapolated to the tokens each
domain will have seen at the end under its current weight, and takes the lower of that and the
proxy's target: a short proxy at constant learning rate predicts less progress than the full run
makes, so its targets alone are reached early and every velocity drops to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls


def velocities(losses: dict[str, float], initial: dict[str, float], targets: dict[str, float]) -> dict[str, float]:
    """V_i for every domain. Where the initial loss is already at or below the target (a proxy run
    that predicted no progress), V_i is the rule's limit as that span shrinks to 0: 1 while the loss
    is above the target, else 0, so a domain that gets worse than at the start is not starved."""
    out = {}
    for name, loss in losses.items():
        span, above = initial[name] - targets[name], loss - targets[name]
        out[name] = float(above > 0) if span <= 0 else min(max(above / span, 0.0), 1.0)
    return out


def update_weights(weights: dict[str, float], velocity: dict[str, float]) -> dict[str, float]:
    """w_i exp(V_i), renormalised to sum to 1."""
    raised = {name: w * math.exp(velocity.get(name, 0.0)) for name, w in weights.items()}
    total = sum(raised.values())
    return {name: v / total for name, v in raised.items()}


@dataclass(frozen=True)
class ScalingLaw:
    """L(D) = E + B / D^beta, fitted on (tokens seen, held-out loss) points."""

    E: float
    B: float
    beta: float

    def __call__(self, tokens: float) -> float:
        return self.E + self.B / max(tokens, 1.0) ** self.beta


def fit_scaling_law(tokens: list[float], losses: list[float]) -> ScalingLaw:
    """Least squares over a grid of beta, with E >= 0 and B >= 0 solved exactly for each beta.

    Deterministic and robust on a handful of noisy points, unlike a free three-parameter fit.
    """
    d = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = d > 0
    d, y = d[keep], y[keep]
    if len(d) < 3:
        raise ValueError(f"a scaling-law fit needs at least 3 points with tokens > 0, got {len(d)}")
    best: tuple[float, ScalingLaw] | None = None
    for beta in np.logspace(-2, 0.5, 120):
        x = d ** -beta
        (e, b), residual = nnls(np.stack([np.ones_like(x), x], axis=1), y)
        sse = float(residual**2)
        if best is None or sse < best[0] - 1e-12:
            best = (sse, ScalingLaw(float(e), float(b), float(beta)))
    assert best is not None
    return best[1]


def refit_targets(
    history: list[dict],
    losses: dict[str, float],
    seen: dict[str, float],
    weights: dict[str, float],
    remaining_tokens: float,
    targets: dict[str, float],
    fits: dict[str, dict],
) -> dict[str, float]:
    """Targets from the run's own curve: L(D) fitted on the earlier updates' (tokens, loss) and the
    current one, at the tokens each domain reaches by the end (its current weight times the tokens
    left), less the proxy's decay gain; each the lower of that and the proxy-fitted target.
    Targets the user gave (not in ``fits``) are kept, and so are all with fewer than three points."""
    points = [h for h in history if "tokens" in h]
    if len(points) + 1 < 3:
        return dict(targets)
    out = {}
    for name, target in targets.items():
        if name not in fits:
            out[name] = target
            continue
        law = fit_scaling_law([h["tokens"][name] for h in points] + [seen[name]], [h["losses"][name] for h in points] + [losses[name]])
        final = seen[name] + weights[name] * remaining_tokens
        out[name] = min(target, law(final) - fits.get(name, {}).get("decay_gain", 0.0))
    return out
