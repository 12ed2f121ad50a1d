"""Deterministic tiny Gemma 3 models (text-only and multimodal) with a locally trained tokenizer.

Tests and the demo build their models here: no hub access, same bytes on every run. Saved
checkpoints use the Gemma 3 hub layout, so stock mergekit's `gemma3` and `gemma3vl` definitions
accept them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ModelKind = Literal["text", "multimodal"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer (Gemma's special-token ids: pad 0, eos 1, bos 2, unk 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ["<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def text_config(vocab_size: int, **overrides):
    """A Gemma3TextConfig of a few hundred thousand parameters (override any field)."""
    from transformers import Gemma3TextConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        sliding_window=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return Gemma3TextConfig(**fields)


def multimodal_config(vocab_size: int, tokenizer=None, **text_overrides):
    """A Gemma3Config with a one-layer SigLIP tower, laid out like the released Gemma 3 checkpoints."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_use_head=False,
    )
    ids = {"boi_token_index": 4, "eoi_token_index": 5, "image_token_index": 6}
    if tokenizer is not None:
        ids = {
            key: tokenizer.convert_tokens_to_ids(token)
            for key, token in zip(ids, SPECIAL_TOKENS[4:7])
        }
    return Gemma3Config(
        text_config=text_config(vocab_size, **text_overrides).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        **ids,
    )


def build_model(
    out_dir: str | Path,
    tokenizer,
    kind: ModelKind = "text",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **text_overrides,
) -> Path:
    """Initialise a tiny Gemma 3 deterministically from ``seed`` and save it (hub layout) to ``out_dir``."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "text":
        model = Gemma3ForCausalLM(text_config(vocab_size, **text_overrides))
    elif kind == "multimodal":
        model = Gemma3ForConditionalGeneration(
            multimodal_config(vocab_size, tokenizer, **text_overrides)
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}; use 'text' or 'multimodal'")
    model.to(dtype)
    return save_model(model, tokenizer, out_dir)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained, then rewrite the multimodal vision tower to the hub's key layout."""
    from transformers.utils import logging as hf_logging

    from optimer_merge.io.hub_layout import to_hub_layout

    out_dir = Path(out_dir)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    to_hub_layout(out_dir)
    return out_dir


def perturbed_copy(
    model_dir: str | Path, out_dir: str | Path, relative_scale: float = 0.01, seed: int = 1
) -> Path:
    """Copy a checkpoint with seeded Gaussian noise (``relative_scale`` of each tensor's std) added.

    A stand-in for a fine-tuned model where a test needs a distinct, reproducible delta.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as reader:
            metadata = reader.metadata()
            tensors = {}
            for key in reader.keys():
                t = reader.get_tensor(key)
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                    std = t.float().std() if t.numel() > 1 else t.float().abs()
                    t = (t.float() + noise * relative_scale * (std + 1e-3)).to(t.dtype)
                tensors[key] = t
        save_file(tensors, str(out_dir / path.name), metadata=metadata)
    return out_dir
