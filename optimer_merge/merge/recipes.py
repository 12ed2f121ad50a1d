"""Load, check and run mergekit YAML recipes with the `optimer` method registered.

``load_recipe`` refuses what stock mergekit would silently ignore or fail on late: unknown keys at
the top level and unknown parameter names for the recipe's method (typos such as ``normalise``),
parameter values the method's own types reject (``weight: .nan``), unknown dtypes, inputs the
method's contract rejects (no base where it needs one, a model listed twice), parameters it
requires but a model lacks, and local models that do not exist.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

from optimer_merge.errors import ConfigError, InputNotFound

MERGE_MARKER = "mergekit_config.yml"  # mergekit writes the recipe it ran here


class RecipeError(ConfigError):
    """A recipe that mergekit would reject, ignore in part, or fail on midway."""


def _parameter_blocks(raw: dict) -> Iterator[tuple[str, dict]]:
    """(where, parameters mapping) for every `parameters:` block of a recipe."""

    def blocks(node: Any, where: str) -> Iterator[tuple[str, dict]]:
        if not isinstance(node, dict):
            return
        if isinstance(node.get("parameters"), dict):
            yield f"{where}parameters", node["parameters"]
        for key in ("models", "slices", "sources"):
            children = node.get(key)
            if isinstance(children, list):
                for i, child in enumerate(children):
                    yield from blocks(child, f"{where}{key}[{i}].")
        if isinstance(node.get("modules"), dict):
            for name, module in node["modules"].items():
                yield from blocks(module, f"{where}modules.{name}.")

    yield from blocks(raw, "")


def _scalars(setting: Any) -> Iterator[Any]:
    """The plain values of a parameter setting (a value, a gradient list, or filtered entries)."""
    if isinstance(setting, dict):
        yield from _scalars(setting.get("value"))
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    elif setting is not None:
        yield setting


def check_recipe(raw: Any, path: str | Path) -> None:
    """Refuse unknown keys, unknown or invalid parameters and missing local models (see module doc)."""
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from optimer_merge.merge.mergekit_method import register

    register()
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping (merge_method, base_model, models, ...) at the top level")
    unknown = sorted(set(raw) - set(MergeConfiguration.model_fields))
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; mergekit knows {', '.join(MergeConfiguration.model_fields)}")
    name = raw.get("merge_method")
    methods = sorted(m.spec.name for m in merge_methods.registered_methods())
    if name not in methods:
        raise RecipeError(f"{path}: unknown merge_method {name!r}; choose one of {', '.join(methods)}")
    specs = {p.name: p for p in merge_methods.get(name).spec.parameters}
    for where, block in _parameter_blocks(raw):
        for key, setting in block.items():
            if key not in specs:
                raise RecipeError(f"{path}: {where}: unknown parameter {key!r} for {name}; it takes {', '.join(specs) or 'none'}")
            for value in _scalars(setting):
                try:
                    specs[key].validate(value)
                except ValidationError as error:
                    message = error.errors()[0]["msg"].removeprefix("Value error, ")
                    raise RecipeError(f"{path}: {where}.{key}: {message}" + ("" if "got" in message else f" (got {value!r})")) from None


def check_structure(config, path: str | Path) -> None:
    """What mergekit checks only once it plans or runs the merge: dtypes, the method's contract on its
    inputs (a base where it needs one, no model twice), parameters it requires for every model, and
    for ``optimer`` with ``normalize``, weights that do not sum to 0."""
    from mergekit import merge_methods
    from mergekit.common import dtype_from_name

    for key in ("dtype", "out_dtype"):
        try:
            dtype_from_name(getattr(config, key))
        except RuntimeError:
            raise RecipeError(f"{path}: {key}: unknown dtype {getattr(config, key)!r}; use float32, bfloat16, float16 or float64") from None
    spec = merge_methods.get(config.merge_method).spec
    if not config.models:
        _check_slices(config, spec, path)
        return
    base = str(config.base_model.model.path) if config.base_model else None
    ids = [str(m.model.model.path) for m in config.models]
    if twice := _listed_twice(ids):
        raise RecipeError(f"{path}: model {twice} is listed twice under models; list each model once")
    try:
        spec.contract.validate_ids(ids + ([base] if base and base not in ids else []), base, group_name=config.merge_method)
    except ValueError as error:
        hint = "; set base_model" if "requires a base" in str(error) else ""
        raise RecipeError(f"{path}: {error}{hint}") from None
    shared = config.parameters or {}
    required = [p.name for p in spec.parameters if p.required and p.scope.value == "non_base"]
    for i, entry in enumerate(config.models):
        if str(entry.model.model.path) == base:
            continue
        missing = [name for name in required if name not in (entry.parameters or {}) and name not in shared]
        if missing:
            raise RecipeError(f"{path}: models[{i}] ({entry.model.model.path}): {config.merge_method} requires parameter {missing[0]!r}; "
                              f"set it under the model's parameters (or once under the top-level parameters)")  # fmt: skip
    _check_filters(config, spec, base, ids, path)
    weights = [(entry.parameters or {}).get("weight", shared.get("weight")) for entry in config.models if str(entry.model.model.path) != base]
    if config.merge_method == "optimer" and shared.get("normalize") is True and all(isinstance(w, (int, float)) for w in weights):
        if sum(weights) == 0:
            raise RecipeError(f"{path}: normalize: true divides by the sum of the weights, which is 0 ({weights}); set normalize: false or change the weights")


def _check_filters(config, spec, base: str | None, ids: list[str], path: str | Path) -> None:
    """A required parameter given only under filters (``weight: [{filter: mlp, value: 0.3}]``) must
    have a value for every tensor, as mergekit resolves it (the model's setting, then the top-level
    one); mergekit finds a tensor without one only midway through the merge. Checked on the tensor
    names of a local reference model (the base); nothing to check where it is not local."""
    from mergekit.config import evaluate_setting

    from optimer_merge.io.checkpoints import Checkpoint

    folder = Path(base or ids[0]).expanduser()
    required = [p for p in spec.parameters if p.required and p.scope.value == "non_base"]
    if not required or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return
    names = None
    shared = config.parameters or {}
    for i, entry in enumerate(config.models):
        if str(entry.model.model.path) == base:
            continue
        for parameter in required:
            settings = [s for s in ((entry.parameters or {}).get(parameter.name), shared.get(parameter.name)) if s is not None]
            if all(isinstance(s, (int, float, str, bool)) for s in settings):
                continue  # a plain value covers every tensor
            names = names if names is not None else Checkpoint.open(folder).names()
            for name in names:
                if all(evaluate_setting(name, s, validate=parameter.validate) is None for s in settings):
                    raise RecipeError(f"{path}: models[{i}] ({entry.model.model.path}): {parameter.name} has no value for tensor {name}: no filter "
                                      f"matches it; add an entry without `filter` as the default, e.g. {{value: 0.5}}")  # fmt: skip


def _check_slices(config, spec, path: str | Path) -> None:
    """The contract check mergekit runs on each output slice once it has loaded every model's config:
    a base the method needs (or is given) must be one of the slice's sources, no source twice."""
    groups = [(f"slices[{i}]", s) for i, s in enumerate(config.slices or [])]
    for name, module in (config.modules or {}).items():
        groups += [(f"modules.{name}.slices[{i}]", s) for i, s in enumerate(module.slices or [])]
    layer_counts: dict = {}
    for where, output in groups:
        base = output.base_model or config.base_model
        sources = [source.model for source in output.sources]
        if twice := _listed_twice([str(m.model.path) for m in sources]):
            raise RecipeError(f"{path}: {where}: model {twice} is listed twice among the slice's sources; list each model once")
        try:
            spec.contract.validate_ids(sources, base, group_name=config.merge_method)
        except ValueError as error:
            if base is not None and base not in sources:
                raise RecipeError(f"{path}: {where}: the base model {base.model.path} is not among this slice's sources; "
                                  f"add it as a source with the slice's layer_range") from None  # fmt: skip
            raise RecipeError(f"{path}: {where}: {error}") from None
        for i, source in enumerate(output.sources):
            if source.model not in layer_counts:  # a model in several slices: its config is read once
                layer_counts[source.model] = _layer_count(source.model)
            layers = layer_counts[source.model]
            start, stop = source.layer_range
            if layers is not None and not 0 <= start < stop <= layers:
                raise RecipeError(f"{path}: {where}.sources[{i}] ({source.model.model.path}): layer_range [{start}, {stop}] does not "
                                  f"fit the model's {layers} layers; give [start, stop] with 0 <= start < stop <= {layers}")  # fmt: skip


def _listed_twice(paths: list[str]) -> str | None:
    """The first (in sorted order) of the paths given more than once, if any."""
    return min((p for p in paths if paths.count(p) > 1), default=None)


def _layer_count(ref) -> int | None:
    """Layers of a local single-module model (what a slice's layer_range indexes); None where unknown."""
    from mergekit.architecture import arch_info_for_config

    if not (Path(str(ref.model.path)).expanduser() / "config.json").is_file():
        return None
    config = ref.config()
    arch = arch_info_for_config(config)
    if arch is None or len(arch.modules) != 1:
        return None
    return next(iter(arch.modules.values())).architecture.num_layers(config)


def load_recipe(path: str | Path):
    """Parse and check a mergekit recipe file; returns (MergeConfiguration, its text)."""
    from optimer_merge.io.yaml_config import parse_yaml, read_text, validation_message

    text = read_text(path, "recipe")  # a missing or malformed file is said before mergekit is imported (seconds)
    raw = parse_yaml(text, path)

    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from optimer_merge.io.checkpoints import Checkpoint

    check_recipe(raw, path)
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(f"{path}: " + validation_message(error, "mergekit recipe")) from None
    except RuntimeError as error:  # mergekit's own validators raise RuntimeError
        raise RecipeError(f"{path}: invalid mergekit recipe: {error}") from None
    if any(not str(ref.model.path).strip() for ref in config.referenced_models()):  # "" would be the working folder
        where = "base_model" if config.base_model and not str(config.base_model.model.path).strip() else "a model"
        raise RecipeError(f"{path}: {where} is an empty path; give the model's folder")
    check_structure(config, path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    tokenizer = [config.tokenizer_source] if config.tokenizer_source not in (None, "base", "union") else []
    for ref in [*config.referenced_models(), *tokenizer]:
        model = str(ref.model.path)
        local = model.startswith((".", "/", "~")) or model.count("/") > 1
        folder = Path(model).expanduser()
        if not folder.exists() and (local or offline):
            raise InputNotFound(f"{path}: model {model} does not exist" + ("" if local else " locally (HF_HUB_OFFLINE is set)"))
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            Checkpoint.open(folder)  # a truncated or corrupt shard is named now, not midway through the merge
    return config, text


def check_merge_target(out_dir: str | Path) -> Path:
    """A merge writes into a new or empty folder, or replaces an earlier merge's (never other files)."""
    from optimer_merge.errors import RunFolderError
    from optimer_merge.io.files import check_output_dir

    out = check_output_dir(out_dir, "merge output folder")
    if out.exists() and any(out.iterdir()) and not (out / MERGE_MARKER).exists():
        raise RunFolderError(f"merge output folder {out} is not empty and holds no earlier merge; choose a new or empty folder")
    if out.is_dir() and (folders := sorted(p.name for p in out.iterdir() if p.is_dir())):  # a merge writes files only
        raise RunFolderError(f"merge output folder {out} holds an earlier merge and also {', '.join(f + '/' for f in folders)}, which replacing "
                             "the merge would delete; move them out or choose another folder")  # fmt: skip
    return out


def local_models_absolute(config):
    """``config`` with each local model folder named by its absolute path. mergekit's model card asks
    the Hugging Face Hub whether a relative path with at most one '/' (`ja`, `runs/ja`) that exists
    here is also a Hub repo: offline that is an error, raised after the whole merge was written."""
    from mergekit.config import MergeConfiguration

    local = {
        str(ref): os.path.abspath(Path(ref.model.path).expanduser())
        for ref in config.referenced_models()
        if ref.lora is None and ref.model.revision is None and not Path(ref.model.path).is_absolute() and Path(ref.model.path).expanduser().is_dir()
    }  # fmt: skip
    if not local:
        return config

    def absolute(node):
        if isinstance(node, dict):
            return {k: local.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else absolute(v) for k, v in node.items()}
        return [absolute(v) for v in node] if isinstance(node, list) else node

    return MergeConfiguration.model_validate(absolute(config.model_dump(mode="json", exclude_none=True)))


def merge_size(config) -> int | None:
    """Bytes of the model a recipe writes (its base's tensors in the output dtype); None where the
    base is not a local folder."""
    from mergekit.common import dtype_from_name

    from optimer_merge.io.checkpoints import Checkpoint

    ref = config.base_model or next(iter(config.referenced_models()), None)
    folder = Path(str(ref.model.path)).expanduser() if ref is not None else None
    if folder is None or not any(folder.glob("*.safetensors")):
        return None
    return Checkpoint.open(folder).size_as(dtype_from_name(config.out_dtype or config.dtype))


def _lock_partial(partial: Path, out: Path) -> int:
    """Create and lock the folder a merge writes before renaming it to ``out``: a second merge into
    the same folder is refused while the first runs. Files a killed merge left there are removed.
    Returns the lock's descriptor (closing it unlocks)."""
    import shutil

    from optimer_merge.errors import RunFolderError
    from optimer_merge.io.run_folder import lock_or_warn

    partial.mkdir(parents=True, exist_ok=True)
    lock = os.open(partial, os.O_RDONLY)
    if not lock_or_warn(lock, partial, "merge"):
        os.close(lock)
        raise RunFolderError(f"another merge is writing {out} ({partial} is locked); wait for it to finish or choose another folder")
    for entry in partial.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return lock


def _check_float16_range(folder: Path, recipe: str | Path) -> None:
    """A merge written in float16 holds no Inf: the method checks the merge in float32, but the cast
    to float16 (largest value 65504) happens as mergekit writes it, so only the files can tell."""
    import torch

    from optimer_merge.io.checkpoints import Checkpoint
    from optimer_merge.merge.rule import CHUNK
    from optimer_merge.vectors.checks import is_finite

    ckpt = Checkpoint.open(folder)
    buffer = torch.empty(2 * CHUNK["cpu"], dtype=torch.float64)
    for name in ckpt.names():
        if ckpt.meta[name][0] == "F16" and not all(is_finite(piece, buffer) for piece in ckpt.pieces(name)):
            raise RecipeError(f"{recipe}: the merged tensor {name} overflows float16 (largest value 65504): the weights are too large "
                              "for a float16 output; set out_dtype: bfloat16 or float32, or use smaller weights")  # fmt: skip


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
    loaded: tuple | None = None,
    **options: Any,
) -> dict:
    """Merge with mergekit's own `run_merge`, exactly as `mergekit-yaml RECIPE OUT` does, into
    ``OUT.partial/NAME`` (so the model card carries OUT's name), renamed to OUT when complete (an
    earlier merge there is replaced).
    ``loaded``: the recipe as ``load_recipe`` returned it, when the caller read it already.

    Returns a summary (method, inputs, seconds) for logging.
    """
    import shutil

    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from optimer_merge.io.files import check_free_space
    from optimer_merge.io.quiet import drop_messages

    config, source = loaded or load_recipe(recipe)
    out = check_merge_target(out_dir)
    size = merge_size(config)
    if size is not None:
        check_free_space(out, size, "the merge")
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
    partial = out.with_name(out.name + ".partial")
    lock = _lock_partial(partial, out)
    # mergekit sets the deprecated `torch_dtype` on the configs it writes; transformers says so
    try:
        with drop_messages(("transformers.configuration_utils", "transformers.modeling_utils"), ("`torch_dtype` is deprecated",)):
            # the recipe as written goes to mergekit_config.yml; mergekit reads it with absolute paths
            run_merge(local_models_absolute(config), str(partial / out.name), options=merge_options, config_source=source)
        _check_float16_range(partial / out.name, recipe)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial / out.name, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays behind
        os.close(lock)
    return {
        "method": config.merge_method,
        "models": [str(m.model.path) for m in config.referenced_models()],
        "out": str(out_dir),
        "seconds": round(time.perf_counter() - start, 3),
    }
