"""starlift's half: argmax of the fp32 and int8 artifacts over the quality gate's own windows.

Usage (the starlift venv): python starlift_side.py FP32_ART INT8_ART NANO_DIR
Writes windows.json (token ids) and the argmax arrays for llama_side.py.
"""

import json
import sys

import numpy as np
from tokenizers import Tokenizer

from starlift.evaluation import quality
from starlift.runtimes import create_runner

fp32, int8, nano = sys.argv[1:4]


class _Tokenizer:
    def __init__(self, path):
        self.tokenizer = Tokenizer.from_file(path)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids


plan = quality.make_plan(_Tokenizer(f"{nano}/tokenizer.json"), 8192, 4096)
with open("windows.json", "w") as f:
    json.dump(plan.windows, f)
for name, path in (("fp32", fp32), ("int8", int8)):
    with create_runner("onnxruntime", path) as runner:
        source = quality.RunnerSource(runner)
        np.save(f"starlift_{name}_argmax.npy", np.concatenate([source.prefill(w).argmax(-1) for w in plan.windows]))
print(json.dumps({"text": plan.text, "tokens": sum(len(w) for w in plan.windows)}))
