"""The integer-GEMM graph of a 4-bit artifact: wide steps on int8 x int8 products, the same weights.

A 4-bit artifact's MatMulNBits reads half a byte per weight: right for one sequence decoding,
where a step multiplies one row and its time is the weights' bytes. A prompt multiplies
hundreds of rows by the same weights, and a server's decode step one row per sequence; there
the time is arithmetic, and on a CPU without AVX-512 VNNI ONNX Runtime's 4-bit kernel computes
no faster than float32 SGEMM, while MLAS's U8U8 integer GEMM (issue 14's
``--int8-method dynamic-row``) does the same product faster. Measured here (AMD EPYC, AVX2,
2 threads; one node of the 113M shape, scratch script in the issue 18 note): 768 x 3072 and
3072 x 768, median per call, 4-bit / integer GEMM: 1 row 0.71x / 0.65x (the 4-bit kernel wins),
2 rows 1.19x / 1.48x, 4 rows 1.67x / 1.58x, 16 rows 1.52x / 1.21x, 128 rows 1.55x / 1.54x,
1,024 rows 1.33x / 1.63x.

``int8_gemm.onnx`` is the artifact's graph with every 4-bit MatMulNBits replaced by that
integer GEMM (``MatMulIntegerToFloat`` with one activation scale per row, as ``_row_int8``
builds it, so a row's result does not depend on its batch-mates), fed by weights derived *in
the graph* from the 4-bit initializers themselves:

    a weight is (q - z) * s, q its 4-bit value, z and s its block's zero point and scale
    column scale  c = max over the column's blocks of s * max(z, 15 - z) / 127
    uint8 weight  round((q - z) * s / c) + 128, in [1, 255]; transposed to [K, N]

Every input of that chain is an initializer, so ONNX Runtime's constant folding computes it
once when the session loads (2.4 s for the 113M shape here): the file holds only nodes and a
few scalars and reads its weights from the artifact's own ``model.onnx.data``. Nothing is
stored twice on disk; in memory the second session holds one more byte per weight. The runner
sends a step to it when a row feeds at least ``MIN_TOKENS`` tokens or a decode step has at
least ``MIN_ROWS`` rows; the KV cache it writes is the one model.onnx reads (the same buffers,
bound to both sessions).

Hand-written because no maintained tool derives a second kernel's weights from a quantized
graph: onnxruntime.quantization quantizes float weights, and ONNX Runtime's constant folding
leaves DequantizeLinear (the standard way to unpack blocked 4-bit weights) unfolded on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from starlift.core.artifact import GEMM_FILE, GEMM_MIN_ROWS_KEY, GEMM_MIN_TOKENS_KEY

# a row's step of this many tokens (a prompt, a prefill chunk) runs the integer GEMM; shorter
# multi-token steps are speculative verifications (up to 8 draft tokens by default), which stay
# on model.onnx anyway (the runner sends them there whatever their width)
MIN_TOKENS = 16
# a decode step of this many rows runs the integer GEMM (two rows: 1.19-1.48x faster per node)
MIN_ROWS = 2


def build_gemm_graph(model, head_nodes: set[str] | None = None) -> int:
    """Rewrite ``model`` (loaded without its external data) in place; returns how many 4-bit
    MatMulNBits now run as integer GEMMs (0: nothing to do, the model is unchanged)."""
    from onnx import helper, numpy_helper

    from .quantizer import RowQuantizer, _ms_opset, _row_constants

    head_nodes = head_nodes or set()
    graph = model.graph
    inits = {i.name for i in graph.initializer}

    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    targets = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"
               and attrs(n).get("bits") == 4 and n.name not in head_nodes
               and all(i in inits for i in n.input[1:4] if i)
               and (len(n.input) < 6 or not n.input[5])]  # no bias input (starlift's graphs add it apart)
    if not targets:
        return 0
    c = "/int8gemm/"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(15, np.uint8), c + "mask"),
        numpy_helper.from_array(np.array(4, np.uint8), c + "shift"),
        numpy_helper.from_array(np.array([-1], np.int64), c + "last"),
        numpy_helper.from_array(np.array([0], np.int64), c + "first"),
        numpy_helper.from_array(np.array(8.0, np.float32), c + "zp8"),
        numpy_helper.from_array(np.array(15.0, np.float32), c + "f15"),
        numpy_helper.from_array(np.array([1, 2], np.int64), c + "blocks_axes"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), c + "n11"),
        numpy_helper.from_array(np.array(128.0, np.float32), c + "f128"),
        *_row_constants(c),  # inv127, tiny, zp128 and the activation side's
    ])
    rows = RowQuantizer(c)
    placed: dict[str, list] = {}
    for node in targets:
        a = attrs(node)
        k, n, block = a["K"], a["N"], a["block_size"]
        blocks = (k + block - 1) // block
        b, scales = node.input[1], node.input[2]
        zps = node.input[3] if len(node.input) > 3 and node.input[3] else None
        p = node.name + c
        shape = p + "shape_"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([n, blocks, block], np.int64), shape + "nbk"),
            numpy_helper.from_array(np.array([n, blocks, 1], np.int64), shape + "nb1"),
            numpy_helper.from_array(np.array([n, blocks * block], np.int64), shape + "nk"),
            numpy_helper.from_array(np.array([k], np.int64), shape + "k"),
            numpy_helper.from_array(np.array([blocks], np.int64), shape + "blocks"),
            numpy_helper.from_array(np.array([n, -1], np.int64), shape + "n_"),
        ])
        # per block [N, blocks, 1]: its scale s and zero point z; a weight is (q - z) * s
        chain = [helper.make_node("Reshape", [scales, shape + "nb1"], [p + "s"], name=p + "s/Reshape")]
        if zps:  # packed 4-bit zero points [N, ceil(blocks / 2)]: nibbles, cut to `blocks`
            chain += [*_nibbles(zps, p + "z", c),
                      helper.make_node("Reshape", [p + "z/pairs", shape + "n_"], [p + "z/all"], name=p + "z/Reshape"),
                      helper.make_node("Slice", [p + "z/all", c + "first", shape + "blocks", c + "last"],
                                       [p + "z/cut"], name=p + "z/Slice"),
                      helper.make_node("Reshape", [p + "z/cut", shape + "nb1"], [p + "z/nb1"], name=p + "z/Reshape2"),
                      helper.make_node("Cast", [p + "z/nb1"], [p + "z"], name=p + "z/Cast", to=1)]
            zp = p + "z"
        else:
            zp = c + "zp8"
        chain += [
            # the column's scale from the blocks' (no pass over the weights): its largest weight is
            # at most max over blocks of s * max(z, 15 - z), reached when a block's grid is used end
            # to end (round-to-nearest puts a block's min at 0 and its max at 15)
            helper.make_node("Sub", [c + "f15", zp], [p + "z/up"], name=p + "z/Sub"),
            helper.make_node("Max", [zp, p + "z/up"], [p + "z/reach"], name=p + "z/Max"),
            helper.make_node("Mul", [p + "s", p + "z/reach"], [p + "s/reach"], name=p + "s/Mul"),
            helper.make_node("ReduceMax", [p + "s/reach", c + "blocks_axes"], [p + "col/amax"],
                             name=p + "col/ReduceMax", keepdims=0),
            helper.make_node("Max", [p + "col/amax", c + "tiny"], [p + "col/amax1"], name=p + "col/Max"),
            helper.make_node("Mul", [p + "col/amax1", c + "inv127"], [p + "col/scale"], name=p + "col/Mul"),
            # u8 = round((q - z) * s / col_scale) + 128 = round(q * ratio + offset), in [1, 255]
            helper.make_node("Reshape", [p + "col/scale", c + "n11"], [p + "col/n11"], name=p + "col/Reshape"),
            helper.make_node("Div", [p + "s", p + "col/n11"], [p + "ratio"], name=p + "ratio/Div"),
            helper.make_node("Mul", [zp, p + "ratio"], [p + "zr"], name=p + "zr/Mul"),
            helper.make_node("Sub", [c + "f128", p + "zr"], [p + "offset"], name=p + "offset/Sub"),
            *_nibbles(b, p + "w", c),
            helper.make_node("Reshape", [p + "w/pairs", shape + "nbk"], [p + "w/q"], name=p + "w/Reshape"),
            helper.make_node("Cast", [p + "w/q"], [p + "w/qf"], name=p + "w/Cast", to=1),
            helper.make_node("Mul", [p + "w/qf", p + "ratio"], [p + "w/scaled"], name=p + "w/Mul"),
            helper.make_node("Add", [p + "w/scaled", p + "offset"], [p + "w/shifted"], name=p + "w/Add"),
            helper.make_node("Round", [p + "w/shifted"], [p + "w/round"], name=p + "w/Round"),
            helper.make_node("Cast", [p + "w/round"], [p + "w/u8blocks"], name=p + "w/CastU8", to=2),
            helper.make_node("Reshape", [p + "w/u8blocks", shape + "nk"], [p + "w/nk"], name=p + "w/Reshape2"),
        ]
        nk = p + "w/nk"
        if blocks * block != k:  # the last block's padding
            chain.append(helper.make_node("Slice", [nk, c + "first", shape + "k", c + "last"], [p + "w/nkcut"],
                                          name=p + "w/Slice"))
            nk = p + "w/nkcut"
        chain.append(helper.make_node("Transpose", [nk], [p + "w/u8"], name=p + "w/Transpose", perm=[1, 0]))
        q, row_scale, quantize_nodes = rows.quantized(node.input[0])
        chain = quantize_nodes + chain
        chain.append(helper.make_node(
            "MatMulIntegerToFloat", [q, p + "w/u8", row_scale, p + "col/scale", c + "zp128", c + "zp128"],
            list(node.output), name=p + "MatMulIntegerToFloat", domain="com.microsoft"))
        placed[node.output[0]] = chain
    new = []
    for node in graph.node:
        new.extend(placed.get(node.output[0], [node]) if node.output else [node])
    del graph.node[:]
    graph.node.extend(new)
    _ms_opset(model)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import):
        raise ValueError("the integer-GEMM graph's BitwiseAnd needs opset 18")
    return len(targets)


def _nibbles(packed: str, p: str, c: str) -> list:
    """``packed`` uint8 [..., m] -> [..., m, 2]: (low nibble, high nibble) per byte, MatMulNBits'
    order (element 2i in the low half)."""
    from onnx import helper

    return [helper.make_node("BitwiseAnd", [packed, c + "mask"], [p + "/low"], name=p + "/BitwiseAnd"),
            helper.make_node("BitShift", [packed, c + "shift"], [p + "/high"], name=p + "/BitShift",
                             direction="RIGHT"),
            helper.make_node("Unsqueeze", [p + "/low", c + "last"], [p + "/low1"], name=p + "/UnsqueezeLow"),
            helper.make_node("Unsqueeze", [p + "/high", c + "last"], [p + "/high1"], name=p + "/UnsqueezeHigh"),
            helper.make_node("Concat", [p + "/low1", p + "/high1"], [p + "/pairs"], name=p + "/Concat", axis=-1)]


def write_gemm_graph(folder: Path, head_nodes: set[str] | None = None) -> int:
    """``folder/int8_gemm.onnx`` from ``folder/model.onnx``, reading the same ``model.onnx.data``;
    returns the number of integer GEMMs (0: no file written)."""
    import onnx

    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    count = build_gemm_graph(model, head_nodes)
    if count:
        # model.onnx's own metadata (per-row lengths) holds here too
        model.metadata_props.add(key=GEMM_MIN_TOKENS_KEY, value=str(MIN_TOKENS))
        model.metadata_props.add(key=GEMM_MIN_ROWS_KEY, value=str(MIN_ROWS))
        # the weights stay where model.onnx keeps them: each initializer still names its
        # offset in model.onnx.data, and the new ones are scalars and shapes, stored inline
        onnx.save_model(model, str(Path(folder) / GEMM_FILE))
    return count
