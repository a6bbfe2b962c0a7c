"""The reference StarCoder2: config, PyTorch module, checkpoint I/O, tokenizer.

Names load on first use (PEP 562): ``from starlift.model import Tokenizer`` or
``resolve_checkpoint`` never imports torch, so the runtime-only install can use them; the
PyTorch pieces (``Starcoder2``, ``load_checkpoint``, ...) import it when asked for.
"""

from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_WHERE = {
    "PRESETS": "config", "HeadConfig": "config", "Starcoder2Config": "config", "preset": "config",
    "bundled_checkpoints": "folders", "resolve_checkpoint": "folders", "weight_files": "folders",
    "StreamDecoder": "tokenizer", "Tokenizer": "tokenizer",
    "Starcoder2": "modeling", "Starcoder2Model": "modeling", "attention_allowed": "modeling",
    "default_position_ids": "modeling",
    "Starcoder2ForSequenceClassification": "heads", "Starcoder2ForTokenClassification": "heads",
    "last_non_pad_index": "heads", "model_class": "heads",
    "init_random": "checkpoint", "load_checkpoint": "checkpoint", "random_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # cached: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
