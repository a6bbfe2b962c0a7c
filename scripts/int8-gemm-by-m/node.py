"""One 4-bit MatMulNBits node against the same node through `--int8-gemm`'s weights (the U8U8
integer GEMM, MatMulIntegerToFloat with per-row activation scales): median time per call by rows
(M), on ONNX Runtime's CPU provider (docs/performance/latency.md, section 6).

    T=2 KN=768,3072:3072,768 MS=1,2,4,8,16,32,64,128,1024 python scripts/int8-gemm-by-m/node.py

Random weights, quantized by onnxruntime's MatMulNBitsQuantizer (block 32, asymmetric, accuracy
level 4, as `starlift quantize --mode int4` does); run it under the machine-wide lock.
"""

import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from starlift.quantize.int8_gemm import uint8_weights


def graphs(k: int, n: int):
    """(the 4-bit model, the integer-GEMM model) of one [k, n] weight."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])
    plain = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                                [x], [y], [numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 18)])
    quantizer = MatMulNBitsQuantizer(plain, block_size=32, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    four = quantizer.model.model
    node = next(nd for nd in four.graph.node if nd.op_type == "MatMulNBits")
    arrays = {i.name: numpy_helper.to_array(i) for i in four.graph.initializer}
    wq, scale = uint8_weights(arrays[node.input[1]], arrays[node.input[2]], arrays.get(node.input[3]), k, 32)
    consts = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "ws"),
              numpy_helper.from_array(np.array([-1], np.int64), "axes"),
              numpy_helper.from_array(np.array(1 / 127, np.float32), "inv127"),
              numpy_helper.from_array(np.array(1e-30, np.float32), "tiny"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a", "axes"], ["m"], keepdims=1),
             helper.make_node("Mul", ["m", "inv127"], ["s0"]), helper.make_node("Add", ["s0", "tiny"], ["s"]),
             helper.make_node("Div", ["x", "s"], ["xs"]), helper.make_node("QuantizeLinear", ["xs", "one", "zp"], ["q"]),
             helper.make_node("MatMulIntegerToFloat", ["q", "wq", "s", "ws", "zp", "zp"], ["y"],
                              domain="com.microsoft")]
    gemm = helper.make_model(helper.make_graph(nodes, "g", [x], [y], consts),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return four, gemm


def main() -> None:
    threads = int(os.environ.get("T", "2"))
    shapes = [tuple(int(v) for v in s.split(",")) for s in os.environ.get("KN", "768,3072:3072,768").split(":")]
    rows = [int(v) for v in os.environ.get("MS", "1,2,4,8,16,32,64,128,1024").split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for k, n in shapes:
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in graphs(k, n)]
        print(f"K {k} N {n}, {threads} threads: median ms per call, 4-bit / integer GEMM")
        for m in rows:
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            medians = []
            for s in sessions:
                for _ in range(3):
                    s.run(None, {"x": x})
                times = []
                for _ in range(100 if m < 128 else 20):
                    start = time.perf_counter()
                    s.run(None, {"x": x})
                    times.append(time.perf_counter() - start)
                medians.append(float(np.median(times)) * 1e3)
            print(f"  M {m:5d}: {medians[0]:8.3f} {medians[1]:8.3f}  ratio {medians[0] / medians[1]:.2f}")


if __name__ == "__main__":
    main()
