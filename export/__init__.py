"""Export: trace the reference model to ONNX (portable and ORT flavours) and package artifacts."""

from .exporter import DTYPE_CHOICES, export_checkpoint
from .flavours import FLAVOURS

__all__ = ["DTYPE_CHOICES", "FLAVOURS", "export_checkpoint"]
