"""Gemma 3 checkpoint names as the hub has them, against the names transformers 5 gives live modules.

transformers 5.x saves the SigLIP tower of Gemma3ForConditionalGeneration as ``vision_tower.*``;
the released checkpoints (and mergekit's ``gemma3vl`` definition) use ``vision_tower.vision_model.*``.
"""

from __future__ import annotations

import json
from pathlib import Path

from optimer_merge.io.files import write_json

VISION_PREFIX, HUB_VISION_PREFIX = "vision_tower.", "vision_tower.vision_model."


def hub_name(key: str) -> str:
    """The released checkpoints' name of a tensor saved by transformers 5."""
    if key.startswith(VISION_PREFIX) and not key.startswith(HUB_VISION_PREFIX):
        return HUB_VISION_PREFIX + key[len(VISION_PREFIX):]
    return key


def live_name(key: str) -> str:
    """The transformers 5 name of a tensor named as in the released checkpoints."""
    return VISION_PREFIX + key[len(HUB_VISION_PREFIX):] if key.startswith(HUB_VISION_PREFIX) else key


def to_hub_layout(model_dir: str | Path) -> bool:
    """Rename ``vision_tower.*`` to ``vision_tower.vision_model.*`` in place; True if anything changed.

    Text-only checkpoints are left untouched; transformers still loads the renamed ones.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    renamed = False
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as reader:
            keys = list(reader.keys())
            if all(hub_name(k) == k for k in keys):
                continue
            metadata = reader.metadata() or {"format": "pt"}
            tensors = {hub_name(k): reader.get_tensor(k) for k in keys}
        save_file(tensors, str(path), metadata=metadata)
        renamed = True
    if renamed and index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {hub_name(k): v for k, v in index["weight_map"].items()}
        write_json(index_path, index)
    return renamed


def live_names(model, keys) -> dict[str, str]:
    """The live parameter name transformers gives each checkpoint tensor name of ``model``.

    transformers 5 renames checkpoint keys while loading (a multimodal Gemma 3's
    ``language_model.model.*`` lives at ``model.language_model.*``); this applies the model's own
    renaming rules. A key that a weight *converter* (not a plain renaming) transforms has no
    single live tensor and is left out, as is a key that names no live parameter.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    live = dict(model.named_parameters(remove_duplicate=False))
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, live)
        if converted is None and name in live:
            names[key] = name
        elif live_name(key) in live:
            names[key] = live_name(key)
    return names
