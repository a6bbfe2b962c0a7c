"""Collect the residual stream of the reference model, layer by layer, with forward hooks.

Used to localize a parity failure (the reference side of ``starlift.evaluation.localize``) and by
the tracer to name the same values in the ONNX graph (``starlift.core.tensor_map``). Hooks
only read tensors: the model's code, its ops and its outputs are unchanged.

    with residual_stream(model) as taps:
        logits, present = model(ids, mask, pos, past)
    taps  # [embedding, layer 0 after attention, layer 0 after mlp, ..., final norm]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .modeling import Starcoder2


@contextmanager
def residual_stream(model: Starcoder2) -> Iterator[list[torch.Tensor]]:
    """A list that fills, during each forward pass in the block, with the tensors of
    ``starlift.core.tensor_map.points`` in their order (cleared when a new pass starts)."""
    taps: list[torch.Tensor] = []

    def embedding(module, args, out):
        taps.clear()  # a new forward pass starts at the embedding
        taps.append(out)

    def after_attention(module, args):  # the post-attention norm's input is x + attention
        taps.append(args[0])

    def after_mlp(module, args, out):  # the decoder layer returns (x + mlp, present)
        taps.append(out[0])

    def final_norm(module, args, out):
        taps.append(out)

    body = model.model
    handles = [body.embed_tokens.register_forward_hook(embedding)]
    for layer in body.layers:
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(after_attention))
        handles.append(layer.register_forward_hook(after_mlp))
    handles.append(body.norm.register_forward_hook(final_norm))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()
