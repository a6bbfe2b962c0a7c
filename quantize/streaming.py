"""int4 / int8 weight-only quantization that streams: one weight in memory at a time.

The in-memory quantizer (quantizer.py) loads the whole fp32 graph (``onnx.load``) and lets
onnxruntime's ``MatMulNBitsQuantizer`` add the quantized tensors beside it: for the 7b shape that
is 28.8 GB before anything is written. Here the graph is read with onnx_ir, whose tensors stay in
the source's data file, and for each MatMul weight, in graph order:

    read W (fp16 or fp32) from model.onnx.data with a plain file read (page cache, not this
    process's memory) -> onnxruntime's block quantizer (``qbits_block_quant``, the C++ kernel
    MatMulNBitsQuantizer itself calls) -> append packed / scales / zero points to the output's
    data file -> the node becomes MatMulNBits reading them -> W is dropped

then the other initializers (norms, biases, the embedding) are copied the same way, one at a time,
and the graph is written referring to the data already on disk. The activations keep the
source's dtype: from an fp16 artifact, MatMulNBits takes fp16 inputs and fp16 scales (the KV cache
stays fp16, half the fp32 one).

What stays as in the source: the embedding Gather (fp16/fp32; the in-memory path's 8-bit
GatherBlockQuantized needs the table as a whole), RTN rounding only (HQQ and GPTQ need the whole
graph or calibration runs of it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from starlift.core.artifact import MODEL_FILE

DATA_FILE = MODEL_FILE + ".data"
ALIGN = 4096  # page-aligned tensors: ONNX Runtime maps them instead of copying


class _DataWriter:
    """Appends tensors to one external data file and hands back external tensors pointing at them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file = open(folder / DATA_FILE, "wb")  # noqa: SIM115 (closed by close())

    def put(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        offset = self.file.tell()
        if offset % ALIGN:
            self.file.write(b"\0" * (ALIGN - offset % ALIGN))
            offset = self.file.tell()
        array = np.ascontiguousarray(array)
        array.tofile(self.file)
        return ir.ExternalTensor(DATA_FILE, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                 shape=ir.Shape(array.shape), name=name, base_dir=str(self.folder))

    def close(self) -> None:
        self.file.close()


def _read(tensor: ir.TensorProtocol) -> np.ndarray:
    """An initializer's values: external data with a plain read (no memory map left behind)."""
    if isinstance(tensor, ir.ExternalTensor):
        path = os.path.join(tensor.base_dir, tensor.location)
        dtype = tensor.dtype.numpy()
        count = int(np.prod(tensor.shape.numpy())) if tensor.shape.numpy() else 1
        with open(path, "rb") as f:
            f.seek(tensor.offset or 0)
            data = np.fromfile(f, dtype=dtype, count=count)
        return data.reshape(tensor.shape.numpy())
    return tensor.numpy()


def _weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(B, transposed) of a MatMul x @ B or of the tied head Gemm x @ E^T; None for anything else."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    b = node.inputs[1]
    if b is None or not b.is_initializer() or b.const_value is None or len(b.shape or ()) != 2:
        return None
    if b.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    if node.op_type == "MatMul":
        return b, False
    if (node.op_type == "Gemm" and len(node.inputs) == 2 and node.attributes.get_int("transB", 0) == 1
            and node.attributes.get_int("transA", 0) == 0 and node.attributes.get_float("alpha", 1.0) == 1.0):
        return b, True
    return None


def quantize_graph(src_model: Path, out_folder: Path, *, bits: int, block_size: int, symmetric: bool,
                   accuracy_level: int | None, head_bits: int, head_block_size: int, head_names: set[str],
                   exclude: set[str], progress: bool = True) -> dict:
    """Write ``out_folder/model.onnx`` (+ data) from the graph ``src_model``; returns what was done."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from starlift.core.progress import progress_bar

    model = ir.load(src_model)
    graph = model.graph
    targets = [(n, *w) for n in graph if n.name not in exclude and (w := _weight(n)) is not None]
    writer = _DataWriter(out_folder)
    quantizers = {}
    counts = {"matmuls": 0, "head": 0}
    try:
        for node, weight, transposed in progress_bar(targets, desc=f"quantize int{bits}: weights", unit="weight",
                                                     enabled=progress):
            is_head = node.name in head_names or node.op_type == "Gemm"
            nbits, block = (head_bits, head_block_size) if is_head else (bits, block_size)
            if (nbits, block) not in quantizers:
                quantizers[nbits, block] = mnq.DefaultWeightOnlyQuantizer(mnq.DefaultWeightOnlyQuantConfig(
                    block_size=block, is_symmetric=symmetric, bits=nbits, accuracy_level=accuracy_level))
            w = _read(weight.const_value)
            if transposed:
                w = w.T  # Gemm(x, E, transB=1) = x @ E^T: the quantizer reads [K, N]
            k, n = w.shape  # a K that is not a whole number of blocks is padded by the quantizer
            packed, scales, zero_points = quantizers[nbits, block].qbits_block_quant(np.ascontiguousarray(w))
            del w
            base = weight.name
            inputs = [node.inputs[0]]
            for array, suffix in ((packed, f"_Q{nbits}"), (scales, "_scales"),
                                  (None if symmetric else zero_points, "_zero_points")):
                if array is None:
                    continue
                tensor = writer.put(array, base + suffix)
                value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                 const_value=tensor)
                graph.register_initializer(value)
                inputs.append(value)
            attributes = {"K": k, "N": n, "bits": nbits, "block_size": block}
            if accuracy_level:
                attributes["accuracy_level"] = accuracy_level
            new = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft",
                          name=f"{node.name}_Q{nbits}" if node.name else None)
            graph.insert_before(node, new)
            out = node.outputs[0]
            name, dtype, shape = out.name, out.dtype, out.shape
            out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new.outputs[0].name, new.outputs[0].dtype, new.outputs[0].shape = name, dtype, shape
            if not weight.uses():  # a tied table also feeds the embedding Gather: it stays
                del graph.initializers[weight.name]
                weight.const_value = None
            counts["head" if is_head else "matmuls"] += 1
        # everything else, one tensor at a time, into the same file
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or (isinstance(tensor, ir.ExternalTensor) and tensor.base_dir == str(out_folder)):
                continue
            array = _read(tensor)
            if array.nbytes >= 1024:
                value.const_value = writer.put(array, value.name)
            else:
                value.const_value = ir.tensor(array, name=value.name)
    finally:
        writer.close()
    model.opset_imports.setdefault("com.microsoft", 1)
    ir.save(model, out_folder / MODEL_FILE)  # the external tensors keep their places in the data file
    return counts
