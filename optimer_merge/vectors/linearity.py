"""How straight a CPT run's path through weight space is, the premise of merging its vector.

For one run folder of `optimer-merge train` with v = theta_final - theta_base: the cosine between
the vector at mid-run (its checkpoint) and at the end, where the mid-run point projects onto v
(t_mid = <v_mid, v> / ||v||^2), and the held-out loss of every eval set of the run along
theta_base + t v for t in T_GRID, next to the loss of the run's own mid-run checkpoint. On a
straight path the checkpoint's loss sits on the line at t_mid; the losses at t = 1 and t = 0 are
the run's own final and initial held-out losses (same blocks, same batches).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from optimer_merge.errors import ConfigError

T_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def mid_checkpoint(run: Path, steps: int) -> tuple[int, Path] | None:
    """The run's kept checkpoint nearest to half its steps (before the end), if any."""
    found = []
    for path in (run / "checkpoints").glob("step-*.ckpt"):
        match = re.fullmatch(r"step-(\d+)\.ckpt", path.name)
        if match and path.is_file() and 0 < int(match.group(1)) < steps:
            found.append((int(match.group(1)), path))
    return min(found, key=lambda s: abs(s[0] - steps / 2)) if found else None


def linearity(run: str | Path, grid: tuple[float, ...] = T_GRID) -> dict:
    """Linearity of one finished single-process CPT run (see the module's docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimer_merge.cpt import datasets as ds
    from optimer_merge.cpt.config import TrainConfig
    from optimer_merge.cpt.trainer import held_out_losses

    run = Path(run)
    meta_path, record = run / "train_meta.json", run / "run_config.json"
    if not meta_path.is_file() or not (run / "model").is_dir() or not record.is_file():
        raise ConfigError(f"{run} is not a finished `optimer-merge train` run (no train_meta.json, model/ or run_config.json)")
    meta = json.loads(meta_path.read_text())
    config = TrainConfig.model_validate(json.loads(record.read_text())["config"])
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.base)
    params = dict(model.named_parameters())
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    final = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).state_dict()
    v = {k: final[k].float() - theta0[k] for k in theta0}
    vv = sum(float((x.double() ** 2).sum()) for x in v.values())

    sets = {}
    for spec in [*config.datasets, *config.eval_datasets]:
        source = ds.eval_source(spec)
        if source is not None:
            sets[spec.name] = ds.load_blocks(spec, "dev", tokenizer, config.seq_len, config.token_dir(run), source)

    def losses() -> dict[str, float]:
        return held_out_losses(model, sets, config.eval_blocks, config.micro_batch_size)

    def place(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    line = {}
    for t in grid:
        place({k: theta0[k] + t * v[k] for k in theta0})
        line[str(t)] = losses()
    result = {"run": str(run), "steps": meta["steps"], "relative_norm": (vv / sum(float((x.double() ** 2).sum()) for x in theta0.values())) ** 0.5,
              "line": line, "mid": None}  # fmt: skip
    mid = mid_checkpoint(run, meta["steps"])
    if mid is not None:
        step, path = mid
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        v_mid = {k: state[k].float() - theta0[k] for k in theta0}
        dot = sum(float((v_mid[k].double() * v[k].double()).sum()) for k in theta0)
        mm = sum(float((x.double() ** 2).sum()) for x in v_mid.values())
        place({k: state[k].float() for k in theta0})
        result["mid"] = {"step": step, "cosine_with_final": dot / (mm * vv) ** 0.5, "t": dot / vv, "loss": losses()}
    place(theta0)
    return result
