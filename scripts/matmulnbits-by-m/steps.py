"""Whole-model steps of a starlift ort-flavour artifact on ONNX Runtime: batch-B decode steps
(one new token per row) or S-token chunks, after a past of P tokens, fastest and median of REPS
runs (docs/performance/serve.md). Random ids and past; the last position's logits only.

    T=1 P=128 REPS=10 python steps.py ARTIFACT 1,8          # decode, batch 1 and 8
    T=1 S=128 REPS=4 python steps.py ARTIFACT 1             # a 128-token prefill chunk
"""

import os
import sys
import time

import numpy as np
import onnxruntime as ort


def main(artifact: str, batches: list[int]) -> None:
    past, new = int(os.environ.get("P", "128")), int(os.environ.get("S", "1"))
    reps, threads = int(os.environ.get("REPS", "20")), int(os.environ.get("T", "2"))
    options = ort.SessionOptions()
    options.log_severity_level, options.intra_op_num_threads = 3, threads
    sess = ort.InferenceSession(os.path.join(artifact, "model.onnx"), options, providers=["CPUExecutionProvider"])
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    _, kv_heads, _, head_dim = next(i.shape for i in sess.get_inputs() if i.name.endswith(".key"))
    for batch in batches:
        feeds = {"input_ids": np.random.randint(100, 40000, (batch, new)).astype(np.int64),
                 "attention_mask": np.ones((batch, past + new), np.int64),
                 "position_ids": np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64),
                 "logits_to_keep": np.array(1, np.int64)}
        for layer in range(layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{kind}"] = np.random.randn(batch, kv_heads, past, head_dim).astype(
                    np.float32)
        for _ in range(3):
            sess.run(["logits"], feeds)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            sess.run(["logits"], feeds)
            times.append(time.perf_counter() - start)
        print(f"{os.path.basename(artifact.rstrip('/'))} batch {batch} tokens {new}: "
              f"fastest {1000 * min(times):.1f} ms, median {1000 * np.median(times):.1f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in sys.argv[2].split(",")])
