"""Classification heads on the StarCoder2 body, as transformers' ``Starcoder2ForSequenceClassification``
and ``Starcoder2ForTokenClassification`` compute them (``GenericFor*Classification`` in
transformers' ``modeling_layers.py``).

Both share the causal LM's body (:class:`~starlift.model.modeling.Starcoder2Model`) and its
``forward(input_ids, attention_mask, position_ids, past) -> (logits, present)`` signature, so
the exporter traces them with the same code; ``score`` is a ``Linear(hidden, num_labels)``.
Logits are float32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from starlift.core.errors import UsageError

from .config import Starcoder2Config
from .modeling import KV, OnBody, Starcoder2Model


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of the token each row is classified by, exactly as transformers picks it.

    The rightmost token that is not ``pad_token_id`` (so left and right padding both work, and a
    row of nothing but padding gives 0); the last slot when there is no pad token. It reads the
    token ids, not the attention mask: a text that itself ends in the pad token is pooled where
    transformers pools it.
    """
    batch, length = input_ids.shape
    if pad_token_id is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    slots = torch.arange(length, device=input_ids.device, dtype=torch.int32)
    return (slots * non_pad).argmax(-1)


class _Classifier(OnBody):
    def __init__(self, config: Starcoder2Config, architecture: str):
        super().__init__()
        if config.head is None or config.head.architecture != architecture:
            raise UsageError(f"{type(self).__name__} needs a config with architectures=[{architecture!r}], "
                             f"got {config.architecture!r}")
        self.model = Starcoder2Model(config)
        self.score = nn.Linear(config.hidden_size, config.head.num_labels, bias=config.head.bias)
        self.eval()  # transformers' token-classification dropout is off at inference


class Starcoder2ForSequenceClassification(_Classifier):
    """One row of ``num_labels`` logits per sequence, read at its last non-padding token.

    Without a ``pad_token_id`` only one sequence at a time can be classified (transformers
    refuses batch > 1 the same way): there is no way to tell where each row ends.
    """

    def __init__(self, config: Starcoder2Config):
        super().__init__(config, "Starcoder2ForSequenceClassification")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past: list[KV] | tuple[KV, ...] | None = None) -> tuple[torch.Tensor, list[KV]]:
        # the exporter traces a batch of 2 and leaves the refusal to the runners
        if self.config.pad_token_id is None and input_ids.shape[0] != 1 and not torch.compiler.is_exporting():
            raise UsageError(f"this sequence classifier has no pad_token_id, so it cannot tell where padded rows end: "
                             f"classify one sequence at a time (got a batch of {input_ids.shape[0]}), or set "
                             "pad_token_id in config.json")
        hidden, present = self.model(input_ids, attention_mask, position_ids, past)
        logits = self.score(hidden)  # (B, T, labels): transformers scores every token, then picks one
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = logits[rows, last_non_pad_index(input_ids, self.config.pad_token_id)]  # (B, labels)
        return pooled.float(), present


class Starcoder2ForTokenClassification(_Classifier):
    """``num_labels`` logits for every token: (B, T, labels)."""

    def __init__(self, config: Starcoder2Config):
        super().__init__(config, "Starcoder2ForTokenClassification")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past: list[KV] | tuple[KV, ...] | None = None) -> tuple[torch.Tensor, list[KV]]:
        hidden, present = self.model(input_ids, attention_mask, position_ids, past)
        return self.score(hidden).float(), present


def model_class(config: Starcoder2Config) -> type[nn.Module]:
    """The module for the checkpoint's ``architectures``: the causal LM or one of the heads."""
    from .modeling import Starcoder2

    return {"Starcoder2ForCausalLM": Starcoder2,
            "Starcoder2ForSequenceClassification": Starcoder2ForSequenceClassification,
            "Starcoder2ForTokenClassification": Starcoder2ForTokenClassification}[config.architecture]
