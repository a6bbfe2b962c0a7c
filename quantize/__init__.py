"""Quantize: fp16 / bf16 / int8 / int4 artifacts from fp32 ones, quality measured against the reference."""
