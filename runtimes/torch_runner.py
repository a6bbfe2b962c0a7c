"""The reference model as a runner: a checkpoint folder (or bundled name) in PyTorch."""

from __future__ import annotations

import numpy as np

from starlift.core.extras import require

from .base import ModelMeta, Runner

_NP_KV = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, checkpoint, dtype: str | None = "fp32", threads: int | None = None,
                 compute_dtype: str | None = None):
        """``compute_dtype``: activations and cache in this dtype, weights kept in ``dtype``
        (``load_checkpoint``'s ``compute_dtype``: a big fp16 checkpoint computed in fp32)."""
        super().__init__()
        self.checkpoint, self.dtype, self.threads = checkpoint, dtype, threads
        self.compute_dtype = compute_dtype
        self.model = None

    def _activate_impl(self) -> None:
        require("torch", "safetensors", purpose="the torch backend")
        import torch

        from starlift.model import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = load_checkpoint(self.checkpoint, dtype=self.dtype, compute_dtype=self.compute_dtype)

    def _read_metadata_impl(self) -> ModelMeta:
        c = self.model.config
        self._dtype = self.model.model.compute_dtype or next(self.model.parameters()).dtype
        dtype = str(self._dtype).removeprefix("torch.")
        return ModelMeta(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size,
                         np.dtype(_NP_KV[dtype]), c.max_position_embeddings)

    def empty_past(self, batch: int):
        return [t for kv in self.model.empty_past(batch) for t in kv]

    def past_to_numpy(self, past) -> list[np.ndarray]:
        import torch

        return [t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in past]

    def past_from_numpy(self, arrays):
        import torch

        return [torch.from_numpy(np.ascontiguousarray(a)).to(self._dtype) for a in arrays]

    def _run_impl(self, input_ids, attention_mask, position_ids, past, logits_to_keep=0):
        import torch

        pairs = list(zip(past[0::2], past[1::2], strict=True))
        with torch.inference_mode():
            logits, present = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                         torch.from_numpy(position_ids), pairs,
                                         logits_to_keep=logits_to_keep)
        return logits.numpy(), [t for kv in present for t in kv]

    def _deactivate_impl(self) -> None:
        self.model = None
