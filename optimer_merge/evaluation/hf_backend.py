"""The ``hf`` backend: the model in this process through lm-eval's HFLM, in the dtype asked for
(bf16 works), on one device or spread with ``device_map``; the pool sits next to each parameter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch

from optimer_merge.errors import ConfigError
from optimer_merge.evaluation.evaluator import HARMLESS_WARNINGS, LMEvalEvaluator


class HFEvaluator(LMEvalEvaluator):
    backend = "hf"

    def __init__(
        self,
        model: str | Path,
        *,
        batch_size: int = 16,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str | None = None,
        threads="auto",
        max_length: int | None = None,
        log=print,
    ):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from optimer_merge.io.checkpoints import check_model_folder
        from optimer_merge.io.quiet import drop_messages

        check_model_folder(model, "model", tokenizer=True)
        super().__init__(model, dtype=dtype, threads=threads, log=log)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        hf_logging.disable_progress_bar()
        placement = {"device_map": device_map} if device_map else {}
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype), **placement)
        if not device_map:
            self.model.to(self.device)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # Log-probabilities in float32 whatever the model's dtype: lm-eval otherwise takes the
        # log-softmax and sums a document's tokens in the model's dtype, which in bf16 rounds a
        # document's log-likelihood to 3 significant digits (-391.84 became -400.0) and hides the
        # difference between two merges. vLLM computes them in float32 already.
        with drop_messages(("lm_eval.models.huggingface",), HARMLESS_WARNINGS):
            self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, device=self.device, batch_size=batch_size, max_length=max_length,
                           softmax_dtype="float32")  # fmt: skip
        self.pool = None

    def build_pool(self, spec) -> dict:
        from optimer_merge.search.pool import build_module_pool

        start = time.perf_counter()
        self.pool = build_module_pool(self.model, spec, log=self.log)
        return {"tensors": len(self.pool.entries), "bytes": self.pool.nbytes, "placement": self.pool.placement, "seconds": time.perf_counter() - start}

    def set_weights(self, weights: Mapping[str, float]) -> dict:
        if self.pool is None:
            raise RuntimeError("set_weights needs build_pool first")
        start = time.perf_counter()
        self.pool.apply(weights)
        if any(p.is_cuda for p in self.model.parameters()):
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "bytes_sent": 0}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from optimer_merge.io.hub_layout import live_names

        names = live_names(self.model, list(tensors))
        live = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for key, tensor in tensors.items():
                if key not in names:
                    raise ConfigError(f"{key} is not a parameter of the loaded model")
                live[names[key]].copy_(tensor)

    def close(self) -> None:
        self.pool = None
