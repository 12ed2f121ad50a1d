"""Ask/tell optimizers over box-bounded merge weights: SMAC3 (default), Optuna's TPE, random.

All three maximise a score, propose uniform averaging (w_i = 1/K, clipped into the bounds) first,
and are deterministic for a seed: asked again after the same tells, they
propose the same weights. The search relies on that to resume by replaying its trial log.

Why SMAC's BlackBoxFacade: the space is a handful of continuous weights and every evaluation is
expensive, which is the case it is built for (a Gaussian process with a Matérn kernel and expected
improvement, a Sobol initial design). The HPO facade's random forest suits many, often
categorical, hyperparameters and cheap, noisy evaluations; here it models a smooth low-dimensional
response worse for the same number of trials.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np


# SMAC's own proposal settings. Ours (optimer_merge.search.config.Acquisition) take 0.05-0.08 s per
# ask + tell at 4-6 weights over 100 trials against these 1.5-2 s (benchmarks/search.py).
SMAC_DEFAULTS = {"challengers": 1000, "local_search_iterations": 10, "local_search_steps": None, "plateau_walk": 10, "vectorize": 2, "gp_restarts": 10, "gp_refit_growth": 0.0}


class Optimizer(Protocol):
    def ask(self) -> dict[str, float]: ...

    def tell(self, weights: dict[str, float], score: float) -> None: ...


def uniform_point(bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    k = len(bounds)
    return {n: float(min(max(1.0 / k, lo), hi)) for n, (lo, hi) in bounds.items()}


class RandomSearch:
    """Uniform sampling in the box (after the uniform-averaging point)."""

    def __init__(self, bounds: dict[str, tuple[float, float]], seed: int):
        self.bounds, self.rng, self.asked = bounds, np.random.default_rng(seed), 0

    def ask(self) -> dict[str, float]:
        self.asked += 1
        if self.asked == 1:
            return uniform_point(self.bounds)
        return {n: float(self.rng.uniform(lo, hi)) if hi > lo else lo for n, (lo, hi) in self.bounds.items()}

    def tell(self, weights: dict[str, float], score: float) -> None:
        pass


class TPESearch:
    """Optuna's TPE sampler (the paper's), uniform averaging enqueued as the first trial."""

    def __init__(self, bounds: dict[str, tuple[float, float]], seed: int):
        try:
            import optuna
        except ImportError:
            raise ValueError("optimizer `tpe` needs Optuna: pip install 'optimer-merge[tpe]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.bounds = bounds
        # constant liar: proposals asked together (parallel trials) avoid each other
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
        self.study.enqueue_trial(uniform_point(bounds))
        self.pending = []

    def ask(self) -> dict[str, float]:
        trial = self.study.ask()
        self.pending.append(trial)
        return {n: float(trial.suggest_float(n, lo, hi)) for n, (lo, hi) in self.bounds.items()}

    def tell(self, weights: dict[str, float], score: float) -> None:
        trial = self.pending.pop(0)
        self.study.tell(trial, score)


class SMACSearch:
    """SMAC3's BlackBoxFacade (GP + EI): uniform averaging, a Sobol design of 2K points, then the model.

    ``acquisition`` sets the cost of each proposal: ``challengers`` (random points scored by the
    acquisition function), ``local_search_iterations``, ``local_search_steps`` and ``plateau_walk``
    (local search from the best points), ``vectorize`` (neighbours scored per model call), ``gp_restarts`` (restarts of the
    GP's hyperparameter fit) and ``gp_refit_growth`` (the fraction by which the trials grow between
    such fits)."""

    def __init__(self, bounds: dict[str, tuple[float, float]], seed: int, workdir, initial_points: int | None = None, acquisition: dict | None = None):
        from ConfigSpace import Configuration, ConfigurationSpace, Constant, Float
        from smac import BlackBoxFacade, Scenario
        from smac.acquisition.maximizer import LocalAndSortedRandomSearch

        from optimer_merge.search.config import Acquisition

        settings = Acquisition(**(acquisition or {})).model_dump()

        space = ConfigurationSpace(seed=seed)
        space.add([Float(n, (lo, hi)) if hi > lo else Constant(n, lo) for n, (lo, hi) in bounds.items()])
        # n_trials is a budget SMAC itself never enforces in ask/tell use; it is kept fixed so that
        # raising `trials` later continues the very same sequence of proposals.
        scenario = Scenario(space, deterministic=True, n_trials=100_000, seed=seed, output_directory=workdir, name="smac")
        n_initial = 2 * len(bounds) if initial_points is None else initial_points
        uniform = Configuration(space, values=uniform_point(bounds))
        design = BlackBoxFacade.get_initial_design(scenario, n_configs=n_initial, additional_configs=[uniform])
        select = design.select_configurations
        # SMAC appends extra points after its Sobol points; uniform averaging goes first instead,
        # so even a search shorter than the initial design scores it.
        design.select_configurations = lambda: [uniform] + [c for c in select() if c != uniform]
        logging.getLogger("smac").setLevel(logging.ERROR)
        maximizer = LocalAndSortedRandomSearch(
            configspace=space, challengers=settings["challengers"], local_search_iterations=settings["local_search_iterations"],
            n_steps_plateau_walk=settings["plateau_walk"], seed=seed,
        )  # fmt: skip
        local = maximizer._local_search
        local._max_steps = settings["local_search_steps"]
        _make_local_search_deterministic(local)
        # neighbours scored per model call: one vectorized call instead of many small ones
        local._vectorization_min_obtain, local._vectorization_max_obtain = settings["vectorize"], 8 * settings["vectorize"]
        model = _GrowthRefittedGP(
            space, BlackBoxFacade.get_kernel(scenario), n_restarts=settings["gp_restarts"], normalize_y=True, seed=seed,
            refit_growth=settings["gp_refit_growth"],
        )  # fmt: skip
        self.smac = BlackBoxFacade(
            scenario, _never_called, model=model, initial_design=design, acquisition_maximizer=maximizer, overwrite=True, logging_level=40
        )
        _vectorize_x_best(self.smac._config_selector)
        self.pending, self.names = [], list(bounds)

    def ask(self) -> dict[str, float]:
        info = self.smac.ask()
        self.pending.append(info)
        values = dict(info.config)
        return {n: float(values[n]) for n in self.names}

    def tell(self, weights: dict[str, float], score: float) -> None:
        from smac.runhistory.dataclasses import TrialValue

        self.smac.tell(self.pending.pop(0), TrialValue(cost=-score))


def _growth_refitted_gp():
    from smac.model.gaussian_process import GaussianProcess

    class GrowthRefittedGP(GaussianProcess):
        """SMAC's GP, its kernel hyperparameters fitted again only once the data has grown by
        ``refit_growth`` (0.1: 10%) since the last fit: every trial while there are few (when the
        fit matters most and is cheap), every tenth at 100 trials. The trainings between condition
        the GP on the new data with the last hyperparameters (cheap)."""

        def __init__(self, *args, refit_growth: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self._refit_growth, self._fitted_on = refit_growth, 0

        def _train(self, X, y, optimize_hyperparameters: bool = True):
            refit = optimize_hyperparameters and len(X) >= (1 + self._refit_growth) * self._fitted_on
            if refit:
                self._fitted_on = len(X)
            return super()._train(X, y, optimize_hyperparameters=refit)

    return GrowthRefittedGP


def _GrowthRefittedGP(*args, **kwargs):
    return _growth_refitted_gp()(*args, **kwargs)


def _vectorize_x_best(selector) -> None:
    """SMAC finds the incumbent EI improves on by predicting every earlier trial in its own model
    call (the cost of a proposal grows with the trials); the same prediction in one call."""

    def x_best(X):
        mean = selector._model.predict_marginalized(X)[0][:, 0]
        best = int(np.argmin(mean))
        return X[best], float(mean[best])

    selector._get_x_best = x_best


def _make_local_search_deterministic(local_search) -> None:
    """SMAC's local search deduplicates its start points through a ``set`` of configurations, whose
    order follows Python's per-process string hashing, so the same seed gave different proposals
    in different processes (and a resumed search could not replay its log). Sorting the start
    points by their values makes the order, and so the proposals, the same in every process."""
    original = local_search._get_initial_points

    def ordered(*args, **kwargs):
        return sorted(original(*args, **kwargs), key=lambda config: tuple(config.get_array()))

    local_search._get_initial_points = ordered


def _never_called(config, seed: int = 0) -> float:
    raise RuntimeError("the search evaluates trials itself (ask/tell)")


def make_optimizer(kind: str, bounds: dict[str, tuple[float, float]], seed: int, workdir, initial_points: int | None = None, acquisition: dict | None = None) -> Optimizer:
    if kind == "smac":
        return SMACSearch(bounds, seed, workdir, initial_points, acquisition)
    if kind == "tpe":
        return TPESearch(bounds, seed)
    if kind == "random":
        return RandomSearch(bounds, seed)
    raise ValueError(f"unknown optimizer {kind!r}; choose smac, tpe or random")
