"""The tiny Gemma 3 factory: deterministic, hub layout, loadable by transformers."""

import hashlib

import torch
from safetensors import safe_open

from optimer_merge.io.hub_layout import to_hub_layout
from optimer_merge.testing import tiny


def digest(model_dir) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path, tiny_tokenizer):
    a = tiny.build_model(tmp_path / "a", tiny_tokenizer, seed=3)
    b = tiny.build_model(tmp_path / "b", tiny_tokenizer, seed=3)
    c = tiny.build_model(tmp_path / "c", tiny_tokenizer, seed=4)
    assert digest(a) == digest(b) != digest(c)


def test_tokenizer_has_gemma_special_ids(tiny_tokenizer):
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id) == (0, 1, 2)
    ids = tiny_tokenizer("def f(x):\n    return 1")["input_ids"]
    assert ids[0] == 2 and len(ids) > 3
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "def f(x):\n    return 1"
    # byte-level: any script round-trips, even one it never saw in training
    assert tiny_tokenizer.decode(tiny_tokenizer("日本語と中文")["input_ids"], skip_special_tokens=True) == "日本語と中文"


def test_multimodal_checkpoint_uses_hub_layout_and_reloads(tiny_zoo):
    from transformers import Gemma3ForConditionalGeneration

    base_dir = tiny_zoo / "tiny-multimodal" / "base"
    with safe_open(str(base_dir / "model.safetensors"), "pt") as reader:
        keys = list(reader.keys())
        stored = {k: reader.get_tensor(k) for k in keys}
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert any(k.startswith("language_model.model.layers.") for k in keys)

    model = Gemma3ForConditionalGeneration.from_pretrained(base_dir)
    loaded = model.state_dict()
    patch = loaded["model.vision_tower.embeddings.patch_embedding.weight"]
    assert torch.equal(patch, stored["vision_tower.vision_model.embeddings.patch_embedding.weight"])
    embed = loaded["model.language_model.embed_tokens.weight"]
    assert torch.equal(embed, stored["language_model.model.embed_tokens.weight"])


def test_to_hub_layout_is_idempotent(tiny_zoo):
    assert to_hub_layout(tiny_zoo / "tiny-multimodal" / "base") is False
    assert to_hub_layout(tiny_zoo / "tiny-text" / "base") is False
