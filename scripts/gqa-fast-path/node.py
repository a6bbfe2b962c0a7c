"""One GroupQueryAttention node of the 113M shape (12 heads, 4 KV heads, head 64) on a prompt of S
tokens, in the four variants the ort flavour's attention If chooses between: with and without
the padding bias, with the sliding window (4,096) or without (docs/performance/latency.md,
section 7). Median time per call, ONNX Runtime's CPU provider, 2 threads.

    python scripts/gqa-fast-path/node.py 4096

Every variant must give the same output (the bias is zeros, the window cuts nothing below 4,096
tokens); the script checks it. Run it under the machine-wide lock.
"""

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 12, 4, 64, 4096


def session(bias: bool, window: int) -> ort.InferenceSession:
    f = TensorProto.FLOAT
    inputs = [h.make_tensor_value_info("q", f, [1, None, HEADS * HEAD_DIM]),
              h.make_tensor_value_info("k", f, [1, None, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("v", f, [1, None, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("pk", f, [1, KV_HEADS, None, HEAD_DIM]),
              h.make_tensor_value_info("pv", f, [1, KV_HEADS, None, HEAD_DIM]),
              h.make_tensor_value_info("sl", TensorProto.INT32, [1, 1]),
              h.make_tensor_value_info("tl", TensorProto.INT32, [])]
    names = ["q", "k", "v", "pk", "pv", "sl", "tl"]
    if bias:
        inputs.append(h.make_tensor_value_info("b", f, [1, 1, None, None]))
        names += ["", "", "", "b"]
    outputs = [h.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    node = h.make_node("GroupQueryAttention", names, ["o", "ok", "ov"], domain="com.microsoft", num_heads=HEADS,
                       kv_num_heads=KV_HEADS, local_window_size=window, scale=HEAD_DIM ** -0.5)
    model = h.make_model(h.make_graph([node], "gqa", inputs, outputs),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    s = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, s, HEADS * HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((1, s, KV_HEADS * HEAD_DIM), dtype=np.float32)
    variants = {"bias + window": (True, WINDOW), "window only": (False, WINDOW), "bias only": (True, -1),
                "neither": (False, -1)}
    sessions = {name: session(*v) for name, v in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    first = None
    for rep in range(4):  # the first round warms up
        for name, sess in sessions.items():
            feed = {"q": q, "k": k, "v": k, "pk": np.zeros((1, KV_HEADS, s, HEAD_DIM), np.float32),
                    "pv": np.zeros((1, KV_HEADS, s, HEAD_DIM), np.float32),
                    "sl": np.array([[s - 1]], np.int32), "tl": np.array(s, np.int32)}
            if variants[name][0]:
                feed["b"] = np.zeros((1, 1, s, s), np.float32)
            t0 = time.perf_counter()
            out = sess.run(["o"], feed)[0]
            elapsed = time.perf_counter() - t0
            first = out if first is None else first
            assert np.abs(out - first).max() < 1e-4, name
            if rep:
                times[name].append(elapsed * 1000)
    for name, t in times.items():
        print(f"{s} tokens, {name:14s} {np.median(t):8.1f} ms")


if __name__ == "__main__":
    main()
