"""llama.cpp's half: top-1 of q8_0 against f32, and of starlift int8 against starlift fp32.

Usage (a venv with llama-cpp-python): python llama_side.py NANO_F32.gguf NANO_Q8_0.gguf
Run after starlift_side.py in the same folder. Prints JSON: over all positions, and over the
positions inside nano's 256-token sliding window, which llama.cpp's starcoder2 graph does not
apply (beyond it the two f32 models compute different things).
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

with open("windows.json") as f:
    windows = json.load(f)
argmax = {}
for name, path in zip(("f32", "q8_0"), sys.argv[1:3], strict=True):
    llm = Llama(path, n_ctx=max(len(w) for w in windows), logits_all=True, n_threads=2, verbose=False)
    rows = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        rows.append(np.asarray(llm.scores[:len(w)]).argmax(-1))
    argmax[name] = np.concatenate(rows)
fp32, int8 = np.load("starlift_fp32_argmax.npy"), np.load("starlift_int8_argmax.npy")
inside = np.concatenate([np.arange(len(w)) for w in windows]) < 256
for label, mask in (("all positions", np.ones_like(inside)), ("inside the sliding window", inside)):
    print(json.dumps({"positions": label, "tokens": int(mask.sum()),
                      "llama_q8_0_vs_f32": round(float((argmax["f32"] == argmax["q8_0"])[mask].mean()), 4),
                      "starlift_int8_vs_fp32": round(float((fp32 == int8)[mask].mean()), 4),
                      "llama_f32_vs_starlift_fp32": round(float((argmax["f32"] == fp32)[mask].mean()), 4)}))
