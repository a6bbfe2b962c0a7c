"""Quantize: fp16 / int8 / int4 artifacts from fp32 ones, quality measured against the fp32 artifact."""

from .quantizer import ALGOS, MODES, quantize_artifact

__all__ = ["ALGOS", "MODES", "quantize_artifact"]
