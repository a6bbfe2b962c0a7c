"""The integer-GEMM graph of a 4-bit artifact: wide steps on int8 x int8 products.

A 4-bit artifact's MatMulNBits reads half a byte per weight: right for one sequence decoding,
where a step multiplies one row and its time is the weights' bytes. A prompt multiplies
hundreds of rows by the same weights, and a server's decode step one row per sequence; there
the time is arithmetic, and on a CPU without AVX-512 VNNI ONNX Runtime's 4-bit kernel computes
no faster than float32 SGEMM, while MLAS's U8U8 integer GEMM (issue 14's
``--int8-method dynamic-row``) does the same product faster. Measured here (AMD EPYC, AVX2,
2 threads; one node of the 113M shape; docs/performance/latency.md section 6): 768 x 3072 and
3072 x 768, median per call, 4-bit time / integer-GEMM time: 1 row 0.71x / 0.65x (the 4-bit
kernel wins), 2 rows 1.19x / 1.48x, 4 rows 1.67x / 1.58x, 16 rows 1.52x / 1.21x, 1,024 rows
1.33x / 1.63x.

``int8_gemm.onnx`` is the artifact's graph with every 4-bit MatMulNBits of the body replaced by
that integer GEMM (``MatMulIntegerToFloat`` with one activation scale per row, the activation
side of ``_row_int8``, so a row's result does not depend on its batch-mates). Its uint8 weights
are the 4-bit weights re-expressed on one grid per column, not a second quantization of the
float weights (which this stage no longer has):

    a weight is (q - z) * s, q its 4-bit value, z and s its block's zero point and scale
    column scale  c = max over the column's blocks of |s| * max(z, 15 - z) / 127
    uint8 weight  round((q - z) * s / c) + 128, in [1, 255]; stored [K, N]

(round-to-nearest quantization puts a block's smallest weight at 0 and its largest at 15, so
``c`` is the column's largest weight / 127.) They are stored in ``int8_gemm.onnx.data``, one
byte per weight; every other tensor (the embedding and the 8-bit LM head, norms, biases) is
read from the artifact's ``model.onnx.data``, at the offsets model.onnx names. Derived one
weight at a time, so the peak memory is one float copy of the largest weight.

An earlier version derived them inside the graph and let ONNX Runtime's constant folding
compute them at load (nothing on disk): its folding kept every intermediate alive at once,
1.86 GB of peak memory for the 113M shape's 85 MB of weights.

Hand-written because no maintained tool re-expresses quantized weights for another kernel:
onnxruntime.quantization quantizes float weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from starlift.core.artifact import GEMM_FILE, GEMM_MIN_ROWS_KEY, GEMM_MIN_TOKENS_KEY, MODEL_FILE

# a row's step of this many tokens (a prompt, a prefill chunk) runs the integer GEMM; shorter
# multi-token steps are speculative verifications (up to 8 draft tokens by default), which stay
# on model.onnx anyway (the runner sends them there whatever their width)
MIN_TOKENS = 16
# a decode step of this many rows runs the integer GEMM (two rows: 1.19-1.48x faster per node)
MIN_ROWS = 2
DATA_FILE = GEMM_FILE + ".data"
ALIGN = 4096  # tensors start on a page boundary in the data file (ONNX Runtime can map them)


def uint8_weights(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                  block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit weights (``packed`` [N, blocks, block / 2], ``scales`` N * blocks,
    packed 4-bit ``zero_points`` [N, ceil(blocks / 2)] or None for 8) as uint8 [K, N] around 128
    with one float32 scale per column [N]."""
    n, blocks = packed.shape[0], packed.shape[1]
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
    if zero_points is None:
        z = np.full((n, blocks), 8.0, np.float32)
    else:
        z = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    s = scales.reshape(n, blocks).astype(np.float32)
    # |s|: onnxruntime's symmetric quantizer stores a negative scale for blocks whose largest
    # magnitude is negative (that weight maps to -8, the grid's long end)
    column = np.maximum((np.abs(s) * np.maximum(z, 15 - z)).max(axis=1), 1e-30) / 127
    ratio = s / column[:, None]
    u8 = np.rint(q * ratio[..., None] + (128 - z * ratio)[..., None])
    u8 = np.clip(u8, 0, 255).astype(np.uint8).reshape(n, blocks * block)[:, :k]
    return np.ascontiguousarray(u8.T), column.astype(np.float32)


def write_gemm_graph(folder: Path, is_head: Callable[[str], bool] = lambda name: False) -> int:
    """``folder/int8_gemm.onnx`` and its ``int8_gemm.onnx.data`` from ``folder/model.onnx``, every
    4-bit MatMulNBits but those ``is_head`` names (a 4-bit LM head stays: a prompt runs it on one
    row); returns the number of integer GEMMs (0: nothing written)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    from .quantizer import RowQuantizer, _ms_opset, _row_constants

    folder = Path(folder)
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    targets = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
               and attrs(n).get("bits") == 4 and not is_head(n.name)
               and all(i in inits for i in n.input[1:4] if i)
               and (len(n.input) < 6 or not n.input[5])]  # no bias input (starlift's graphs add it apart)
    if not targets:
        return 0
    c = "/int8gemm/"
    graph.initializer.extend(_row_constants(c))
    rows = RowQuantizer(c)
    placed: dict[str, list] = {}
    tmp = folder / (DATA_FILE + ".partial")
    with open(tmp, "wb") as data:
        for node in targets:
            a = attrs(node)
            packed, scales, zero_points = (numpy_helper.to_array(inits[i], base_dir=str(folder)) if i else None
                                           for i in [*node.input[1:4], ""][:3])
            wq, scale = uint8_weights(packed, scales, zero_points, a["K"], a["block_size"])
            names = []
            for suffix, array in (("_u8", wq), ("_u8_scale", scale)):
                tensor = numpy_helper.from_array(array, node.input[1] + suffix)
                offset = -(-data.tell() // ALIGN) * ALIGN if array.nbytes >= ALIGN else data.tell()
                data.seek(offset)
                data.write(tensor.raw_data)
                set_external_data(tensor, DATA_FILE, offset, array.nbytes)  # sets data_location too
                tensor.ClearField("raw_data")
                graph.initializer.append(tensor)
                names.append(tensor.name)
            q, row_scale, quantize_nodes = rows.quantized(node.input[0])
            placed[node.output[0]] = quantize_nodes + [helper.make_node(
                "MatMulIntegerToFloat", [q, names[0], row_scale, names[1], c + "zp128", c + "zp128"],
                list(node.output), name=node.name + c + "MatMulIntegerToFloat", domain="com.microsoft")]
    new = []
    for node in graph.node:
        new.extend(placed.get(node.output[0], [node]) if node.output else [node])
    del graph.node[:]
    graph.node.extend(new)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the 4-bit weights: model.onnx's only
        graph.initializer.remove(init)
    _ms_opset(model)
    # model.onnx's own metadata (per-row lengths) holds here too; these say which steps to send
    model.metadata_props.add(key=GEMM_MIN_TOKENS_KEY, value=str(MIN_TOKENS))
    model.metadata_props.add(key=GEMM_MIN_ROWS_KEY, value=str(MIN_ROWS))
    os.replace(tmp, folder / DATA_FILE)
    # the shared tensors keep their model.onnx.data references (never loaded here)
    onnx.save_model(model, str(folder / GEMM_FILE))
    return len(targets)
