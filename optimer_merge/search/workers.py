"""Who scores a search's trials: one evaluator in this process, or N long-lived Ray actors.

A ``TrialScorer`` is one evaluator with the vector pool loaded; ``score(weights, limit)`` merges
and evaluates, and returns a failure as a reason instead of raising. ``LocalWorkers`` holds one in
this process (``parallel: 1``, the default); ``RayWorkers`` holds N, each a Ray actor started once
per search with its own resources (GPUs per worker = tensor_parallel_size on GPU machines, CPU
threads on CPU machines), on a local Ray it always stops or a cluster at ``ray_address``. Both
``start(key, weights, limit)`` a trial on an idle worker (``idle()`` says how many there are) and
``wait()`` for the next one to finish, as ``(key, outcome)``; a worker that dies (killed, out of
memory) turns its trial into a failed trial and is started again. ``score_all`` runs a list of
trials side by side and yields the outcomes in the order given.
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
import tempfile
import time
from typing import Callable, Iterator

from optimer_merge.errors import ConfigError
from optimer_merge.io.quiet import redirect_fds
from optimer_merge.signals import on_sigterm


class TrialScorer:
    """One evaluator with the pool of ``spec`` loaded (its refusals come before the first trial)."""

    def __init__(self, config, spec, log: Callable[[str], None] = print):
        from optimer_merge.evaluation.evaluator import open_evaluator
        from optimer_merge.evaluation.objective import Objective
        from optimer_merge.search.pool import build_host_pool
        from optimer_merge.vectors.checks import VectorError

        self.config, self.log = config, log
        self.objective: Objective = config.load_objective()
        settings = config.evaluator_settings()
        if config.backend == "vllm":
            settings["pool"] = spec
        self.evaluator = open_evaluator(config.backend, config.base, log=log, **settings)
        self.host_pool = None  # the push fallback's pool, in this process
        if config.weight_update == "push":
            self.host_pool = build_host_pool(spec, log=log)
        else:
            info = self.evaluator.build_pool(spec)
            if info.get("nonfinite"):
                raise VectorError(f"NaN/Inf values in {', '.join(info['nonfinite'][:3])}")
        pool = self.host_pool or getattr(self.evaluator, "pool", None)
        self.relative_norms = dict(pool.relative_norms) if pool is not None else {}

    def score(self, weights: dict[str, float], limit: int | None) -> dict:
        """Merge in memory and score; a failure is returned as a reason, never raised."""
        c, ev = self.config, self.evaluator
        result = {"status": "ok", "reason": None, "score": None, "metrics": {}, "seconds": {}, "settings": c.operational()}
        start = time.perf_counter()
        try:
            if self.host_pool is not None:  # the explicit fallback: whole merged tensors
                ev.load_state_dict(dict(self.host_pool.merged(weights)))
            else:
                ev.set_weights(weights)
            result["bytes_sent"] = getattr(ev, "bytes_sent", 0)
        except Exception as error:  # noqa: BLE001 - recorded, the search goes on
            result.update(status="failed", reason=f"merge failed: {type(error).__name__}: {error}")
            result["seconds"]["merge"] = time.perf_counter() - start
            return result
        result["seconds"]["merge"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            results = ev.evaluate(self.objective.task_names(), limit, confirm_run_unsafe_code=c.confirm_run_unsafe_code, quiet=True)
            value, breakdown = self.objective.score(results)
            result["items"] = {task: n["effective"] for task, n in sorted(results.get("n-samples", {}).items())}
            result["metrics"] = {k: v["value"] for k, v in breakdown.items()}
            if not math.isfinite(value):
                bad = [k for k, v in result["metrics"].items() if not math.isfinite(v)]
                result.update(status="failed", reason=f"score is not finite ({', '.join(bad) or value} not finite)")
            else:
                result["score"] = value
        except Exception as error:  # noqa: BLE001
            result.update(status="failed", reason=f"evaluation failed: {type(error).__name__}: {error}")
        result["seconds"]["eval"] = time.perf_counter() - start
        return result

    def close(self) -> None:
        self.evaluator.close()


class LocalWorkers:
    """The one scorer in this process."""

    size = 1

    def __init__(self, config, spec, log: Callable[[str], None] = print):
        log(f"loading {config.base} on {config.backend}")
        self.scorer = TrialScorer(config, spec, log)
        self.relative_norms = self.scorer.relative_norms

        self.job: tuple | None = None

    def idle(self) -> int:
        return int(self.job is None)

    def start(self, key, weights: dict[str, float], limit: int | None) -> None:
        self.job = (key, weights, limit)

    def wait(self) -> tuple:
        """The started trial, run now (in this process)."""
        (key, weights, limit), self.job = self.job, None
        return key, self.scorer.score(weights, limit)

    def state(self) -> str:
        return ""

    def close(self) -> None:
        self.scorer.close()


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Refuse a cluster address nothing answers at, in seconds: ``ray.init`` itself retries for
    minutes. ``auto`` (a running local cluster or RAY_ADDRESS) and other URI schemes are left to Ray."""
    target = address.removeprefix("ray://")
    if address in ("auto", "local") or "://" in target:
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"ray_address {address!r}: expected HOST:PORT of the cluster's head (as `ray start --head` prints it), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()  # [v6 address]:port too
    except OSError as error:
        raise ConfigError(
            f"ray_address {address}: nothing answers at {host}:{port} ({error.strerror or error}); "
            "start the cluster's head there (`ray start --head`) or fix the address"
        ) from None


def _replay(said) -> None:
    """Write what a held-back stderr received (a temporary file, or None) to the real one."""
    if said is not None:
        said.seek(0)
        sys.stderr.write(said.read().decode(errors="replace"))
        said.close()


class RayWorkers:
    """N scorers, each a Ray actor; trials are dealt to idle actors, outcomes kept in order."""

    def __init__(self, config, spec, log: Callable[[str], None] = print):
        try:
            import ray
        except ImportError:
            raise ConfigError("parallel trials need Ray: pip install 'optimer-merge[ray]'") from None

        self.ray, self.config, self.spec, self.log = ray, config, spec, log
        self.size = config.parallel
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # without ray_address a new local Ray, even where a cluster runs or RAY_ADDRESS is set
            address = config.ray_address or "local"
            sigterm = signal.getsignal(signal.SIGTERM)
            # what Ray prints while joining a cluster is held back: a refused join retries for some
            # 20 s with a line each second, which the one-line error below says better
            said = tempfile.TemporaryFile() if config.ray_address else None
            try:
                # a local Ray's workers run at the driver's priority (Ray's default, nice 15, lets the
                # driver's optimizer preempt a trial whenever it asks ahead on a machine with few cores)
                local = {} if config.ray_address else {"_system_config": {"worker_niceness": 0}}
                with redirect_fds(said.fileno(), (2,)) if said else contextlib.nullcontext():
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True, **local)
                if callable(sigterm):
                    on_sigterm(sigterm)  # Ray's own would end the driver without stopping its workers
            except ConnectionError as error:
                hint = ""
                if "InvalidAuthToken" in str(error.__cause__):  # the head was started with token authentication
                    hint = ("; the cluster asks for a token: set RAY_AUTH_MODE=token, with the cluster's token in "
                            "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")  # fmt: skip
                    said.truncate(0)  # its retries said only that
                raise ConfigError(f"ray_address {config.ray_address}: cannot join the Ray cluster ({error}){hint}") from None
            finally:
                _replay(said)
        # GPUs per worker wherever the cluster has GPUs (a multi-node head may have none itself)
        have = ray.cluster_resources()
        gpus = (config.tensor_parallel_size if config.backend == "vllm" else 1) if have.get("GPU", 0) > 0 else 0
        threads = config.threads if config.threads != "auto" else 1
        self._check_resources(have, threads, gpus)
        log(f"loading {config.base} on {config.backend} in {self.size} workers")
        self.actor_class = ray.remote(num_cpus=threads, num_gpus=gpus, max_restarts=0)(_Actor)
        log(f"starting {self.size} trial workers on Ray ({'cluster ' + config.ray_address if config.ray_address else 'local'})")
        self.actors = [self._start() for _ in range(self.size)]
        self.restarts = 0
        self.free = list(range(self.size))  # idle workers, in order
        self.running: dict = {}  # future -> (key, worker index)
        # wait for every worker's model and pool (their refusals come before the first trial)
        try:
            norms = ray.get([actor.relative_norms.remote() for actor in self.actors])
        except ray.exceptions.RayTaskError as error:
            self.close()
            raise error.as_instanceof_cause() from None
        self.relative_norms = norms[0]

    def _check_resources(self, have: dict, threads: int, gpus: int) -> None:
        """Ray would wait forever for workers the cluster cannot hold: a local Ray that lacks them is
        refused; a cluster (which may grow) is warned about."""
        need = {"CPU": threads * self.size, "GPU": gpus * self.size}
        short = [f"{need[k]:g} {k}s ({self.size} x {threads if k == 'CPU' else gpus})" for k in need if need[k] > have.get(k, 0)]
        if not short:
            return
        where = f"the Ray cluster at {self.config.ray_address}" if self.config.ray_address else "this machine's Ray"
        message = (f"parallel {self.size} workers need {' and '.join(short)}; {where} has "
                   f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs")  # fmt: skip
        if self.started_ray and not self.config.ray_address:
            self.close()
            raise ConfigError(f"{message}; lower parallel (or threads, tensor_parallel_size)")
        self.log(f"warning: {message}; the workers wait until the cluster has room")

    def _start(self):
        return self.actor_class.remote(self.config.model_dump(mode="json"), self.spec)

    def idle(self) -> int:
        return len(self.free)

    def start(self, key, weights: dict[str, float], limit: int | None) -> None:
        """Start a trial on the first idle worker (the caller may work meanwhile)."""
        worker = self.free.pop(0)
        self.running[self.actors[worker].score.remote(weights, limit)] = (key, worker)

    def wait(self) -> tuple:
        """The next trial to finish, as (key, outcome); a worker that died is started again."""
        ray = self.ray
        done, _ = ray.wait(list(self.running), num_returns=1)
        key, worker = self.running.pop(done[0])
        try:
            outcome = ray.get(done[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            outcome = {"status": "failed", "reason": f"worker {worker} died: {type(error).__name__}: {reason}",
                       "score": None, "metrics": {}, "seconds": {}, "settings": self.config.operational()}  # fmt: skip
            self.log(f"trial worker {worker} died; starting it again")
            self.actors[worker] = self._start()
            self.restarts += 1
        self.free.append(worker)
        return key, outcome

    def state(self) -> str:
        restarts = f", {self.restarts} restarted" if self.restarts else ""
        return f"workers {len(self.running)}/{self.size} busy{restarts}"

    def close(self) -> None:
        actors, self.actors = getattr(self, "actors", []), []
        try:  # every worker closes its evaluator at once (a vLLM engine takes seconds to stop), then ends
            if actors:
                self.ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=60)
        except Exception:  # noqa: BLE001 - a dead worker (or cluster) has nothing to close
            pass
        for actor in actors:
            self.ray.kill(actor)
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


class _Actor:
    """A TrialScorer inside a Ray actor (built from plain data: the config and the pool spec)."""

    def __init__(self, config: dict, spec):
        from optimer_merge.search.config import SearchConfig

        self.scorer = TrialScorer(SearchConfig.model_validate(config), spec, log=lambda _m: None)

    def score(self, weights: dict[str, float], limit: int | None) -> dict:
        return self.scorer.score(weights, limit)

    def relative_norms(self) -> dict[str, float]:
        return self.scorer.relative_norms

    def close(self) -> None:
        self.scorer.close()


def score_all(workers, jobs: list[tuple[dict, int | None]]) -> Iterator[dict]:
    """The outcomes of ``jobs`` (weights, limit), run side by side on the workers, in the order given,
    each as soon as it and those before it are done."""
    finished: dict[int, dict] = {}
    started = emitted = 0
    while emitted < len(jobs):
        while started < len(jobs) and workers.idle():
            workers.start(started, *jobs[started])
            started += 1
        key, outcome = workers.wait()
        finished[key] = outcome
        while emitted in finished:
            yield finished.pop(emitted)
            emitted += 1


def open_workers(config, spec, log: Callable[[str], None] = print):
    """The trial workers of ``config``: in this process for ``parallel: 1``, else on Ray."""
    return LocalWorkers(config, spec, log) if config.parallel == 1 else RayWorkers(config, spec, log)
