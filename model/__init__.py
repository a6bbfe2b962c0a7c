"""The reference StarCoder2: config, PyTorch module, checkpoint I/O, tokenizer."""

from .checkpoint import (
    bundled_checkpoints,
    init_random,
    load_checkpoint,
    random_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import PRESETS, Starcoder2Config, preset
from .modeling import Starcoder2, attention_allowed, default_position_ids
from .tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "PRESETS", "Starcoder2", "Starcoder2Config", "StreamDecoder", "Tokenizer", "attention_allowed",
    "bundled_checkpoints", "default_position_ids", "init_random", "load_checkpoint", "preset",
    "random_checkpoint", "resolve_checkpoint", "save_checkpoint",
]
