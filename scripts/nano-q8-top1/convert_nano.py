"""Convert starcoder2-nano to GGUF with llama.cpp's own converter.

Usage: LLAMA_CPP_TREE/venv python convert_nano.py NANO_DIR --outtype f32|q8_0 --outfile OUT.gguf
(LLAMA_CPP_TREE: the llama.cpp source tree, default /work/peers/llama.cpp/llama.cpp).

nano's tokenizer has StarCoder2's pre-tokenizer (individual digits, then the byte-level regex) with
its own 8,192-token vocabulary, so the converter's hash check does not recognise it. This script
declares it as llama.cpp's "starcoder" pre-tokenizer, which is the same split.
"""

import os
import sys

sys.path.insert(0, os.environ.get("LLAMA_CPP_TREE", "/work/peers/llama.cpp/llama.cpp"))

from conversion import base  # noqa: E402  (llama.cpp's converter package, from the tree above)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "starcoder"

import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
