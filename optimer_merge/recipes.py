"""Load, validate and run mergekit YAML recipes with the `optimer` method registered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml


def load_recipe(path: str | Path):
    """Parse a mergekit recipe file into mergekit's own MergeConfiguration (validated)."""
    from mergekit.config import MergeConfiguration

    from optimer_merge.merge_method import register

    register()
    text = Path(path).read_text(encoding="utf-8")
    return MergeConfiguration.model_validate(yaml.safe_load(text)), text


def run_recipe(
    recipe: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    lazy_unpickle: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    threads: int | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict:
    """Merge with mergekit's own `run_merge`, exactly as `mergekit-yaml RECIPE OUT` does.

    Returns a summary (method, inputs, seconds) for logging.
    """
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config, source = load_recipe(recipe)
    merge_options = MergeOptions(
        device=device,
        lazy_unpickle=lazy_unpickle,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        num_threads=threads,
        quiet=quiet,
        **options,
    )
    merge_options.apply_global_options()
    start = time.perf_counter()
    run_merge(config, str(out_dir), options=merge_options, config_source=source)
    return {
        "method": config.merge_method,
        "models": [str(m.model.path) for m in config.referenced_models()],
        "out": str(out_dir),
        "seconds": round(time.perf_counter() - start, 3),
    }
