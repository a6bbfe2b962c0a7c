"""Rewrite the traced rotate-half RoPE into ONNX Runtime's RotaryEmbedding (com.microsoft).

Runs after the GroupQueryAttention rule (gqa.py), which feeds GQA (B, S, H*D) tensors made by
``Reshape(Transpose(.))`` of the rotated (B, H, S, D) heads. The traced RoPE around it is::

    lin ─ Reshape ─ Transpose ─┬──────────────────────────── Mul(cos) ─┐
                               └ Slice/Neg, Slice ─ Concat ─ Mul(sin) ─ Add ─ Transpose ─ Reshape ─► GQA
    cos = Unsqueeze(Cos(Concat(f, f)))   sin = Unsqueeze(Sin(Concat(f, f)))
    f   = Mul(Cast(Unsqueeze(position_ids)), inv_freq)

and becomes ``RotaryEmbedding(lin, position_ids, cos_cache, sin_cache)`` on the (B, S, H*D)
projection itself: two transposes, three reshapes and seven element-wise ops per q and per k
become one kernel. The caches are ``cos/sin(p * inv_freq)`` for every position below
``max_position_embeddings``, computed by graph nodes from the model's own ``inv_freq`` (ORT
folds them once at session load; the file does not grow), so each position gets the same
float32 angle the traced graph computed per step. onnxscript's RotaryEmbedding fusion does
not fire on this graph (it expects the pattern before GQA's transposes are in place), hence
this rule.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from starlift.model import Starcoder2Config


class _RopeToRotaryEmbedding(pattern.RewriteRuleClassBase):
    def __init__(self, config: Starcoder2Config, position_ids: ir.Value):
        super().__init__("StarliftRotaryEmbedding", remove_nodes=True)
        self.config, self.position_ids = config, position_ids
        self.caches: dict[ir.DataType, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, lin, cos, sin):
        x = op.Transpose(op.Reshape(lin, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        first = op.Slice(x, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE,
                         _outputs=["first"])
        second = op.Slice(x, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE,
                          _outputs=["second"])
        rotated = op.Concat(op.Neg(second), first, axis=-1)
        out = op.Add(op.Mul(x, cos), op.Mul(rotated, sin))
        return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), pattern.ANY_VALUE)

    def _inv_freq(self, cos: ir.Value, sin: ir.Value) -> ir.Value | None:
        """The angles' ``inv_freq`` when cos/sin are ``Unsqueeze([Cast](Cos/Sin(Concat(f, f))))``
        with ``f = Mul(Cast(Unsqueeze(position_ids)), inv_freq)``. Walked by hand rather than
        matched: these nodes are shared by every layer, and a rule may only remove nodes that
        nothing else uses."""
        found = []
        for value, op_type in ((cos, "Cos"), (sin, "Sin")):
            node = value.producer()
            if node is None or node.op_type != "Unsqueeze":
                return None
            node = node.inputs[0].producer()
            if node is not None and node.op_type == "Cast":
                node = node.inputs[0].producer()
            if node is None or node.op_type != op_type:
                return None
            concat = node.inputs[0].producer()
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
                return None
            mul = concat.inputs[0].producer()
            if mul is None or mul.op_type != "Mul":
                return None
            angle, inv_freq = mul.inputs
            cast = angle.producer()
            unsq = cast.inputs[0].producer() if cast is not None and cast.op_type == "Cast" else None
            if unsq is None or unsq.op_type != "Unsqueeze" or unsq.inputs[0] is not self.position_ids:
                return None
            found.append(inv_freq)
        if found[0] is not found[1] or found[0].const_value is None:
            return None
        if found[0].const_value.numpy().shape != (self.config.head_dim // 2,):
            return None
        return found[0]

    def check(self, context, cos, sin, first, second, **_):
        result = pattern.MatchResult()
        if self._inv_freq(cos, sin) is None:
            return result.fail("cos/sin are not RoPE angles of position_ids")
        half = self.config.head_dim // 2
        for node, want in ((first.producer(), (0, half)), (second.producer(), (half, None))):
            starts, ends, axes = (node.inputs[i].const_value for i in (1, 2, 3))
            if starts is None or ends is None or axes is None or int(axes.numpy().ravel()[0]) not in (-1, 3):
                return result.fail("rotate-half slices are not constant on the last axis")
            start, end = int(starts.numpy().ravel()[0]), int(ends.numpy().ravel()[0])
            if start != want[0] or (want[1] is not None and end != want[1]) or (want[1] is None and end < 2 * half):
                return result.fail("slices are not the two halves of head_dim")
        return True

    def _cache(self, op, inv_freq: ir.Value, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
        # One pair of caches per graph, shared by every layer's q and k.
        if dtype not in self.caches:
            limit = op.Constant(value=ir.tensor(np.array(self.config.max_position_embeddings, np.float32)))
            start = op.Constant(value=ir.tensor(np.array(0.0, np.float32)))
            step = op.Constant(value=ir.tensor(np.array(1.0, np.float32)))
            axis = op.Constant(value=ir.tensor(np.array([1], np.int64)))
            angles = op.Mul(op.Unsqueeze(op.Range(start, limit, step), axis), inv_freq)  # (P, D/2)
            cos, sin = op.Cos(angles), op.Sin(angles)
            if dtype != ir.DataType.FLOAT:
                cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
            self.caches[dtype] = (cos, sin)
        return self.caches[dtype]

    def rewrite(self, op, lin, cos, sin, **_):
        dtype = lin.dtype or ir.DataType.FLOAT
        cos_cache, sin_cache = self._cache(op, self._inv_freq(cos, sin), dtype)
        return op.RotaryEmbedding(lin, self.position_ids, cos_cache, sin_cache, interleaved=0,
                                  _domain="com.microsoft")


def fuse_rotary_embedding(model: ir.Model, config: Starcoder2Config) -> int:
    """Replace every q and k RoPE; returns how many were fused (2 per layer when it fires)."""
    position_ids = next(v for v in model.graph.inputs if v.name == "position_ids")
    rule = _RopeToRotaryEmbedding.rule(config, position_ids)
    count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
