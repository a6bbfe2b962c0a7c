"""One MatMulNBits node on ONNX Runtime's CPU provider: time per call by M (rows), weight bits,
block size, accuracy level and zero points (docs/performance/serve.md, "Why the batched int4
step looked slow"). Random weights; the fastest and the median of 30 calls, microseconds.

    T=1 KN=768,3072 MS=1,8,128 BITS=4 BS=32,128 ACC=0,4 ZP=1,0 python node.py
"""

import itertools
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def env_ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",")]


def session(k: int, n: int, bits: int, block: int, accuracy: int, zero_points: bool, threads: int):
    blocks, rng = k // block, np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01, "S")]
    inputs = ["A", "B", "S"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (n * ((blocks * bits + 7) // 8),), dtype=np.uint8),
                                             "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(sess, m: int, k: int, reps: int = 30) -> tuple[float, float]:
    a = np.random.randn(m, k).astype(np.float32)
    for _ in range(3):
        sess.run(None, {"A": a})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return min(times) * 1e6, float(np.median(times)) * 1e6


def main() -> None:
    k, n = env_ints("KN", "768,3072")
    ms, threads = env_ints("MS", "1,8,128"), int(os.environ.get("T", "1"))
    for bits, block, accuracy, zp in itertools.product(env_ints("BITS", "4,8"), env_ints("BS", "32,128"),
                                                         env_ints("ACC", "0,4"), env_ints("ZP", "1,0")):
        sess = session(k, n, bits, block, accuracy, bool(zp), threads)
        cells = "  ".join(f"M{m} {best:.0f}/{median:.0f}us" for m in ms for best, median in [timed(sess, m, k)])
        print(f"K{k} N{n} bits{bits} block{block} accuracy{accuracy} zero_points{zp}: {cells}", flush=True)


if __name__ == "__main__":
    main()
