"""Rewrite the traced attention into ONNX Runtime's GroupQueryAttention (com.microsoft).

onnxscript's own GQA fusion matches the causal-mask subgraph transformers used to emit and
refuses sliding windows, so it never fires on this model's graph; this rule matches the
attention that ``starlift.model.Attention`` traces to and keeps its exact semantics: the
sliding window goes to ``local_window_size`` (a query sees keys q - window < k <= q, the
window including itself, as ORT's kernel counts it), left padding goes to ``attention_bias``
(0 / float-min from ``attention_mask``), and RoPE stays where it was (``do_rotary=0``)::

    q_rot ──────────────────────────────► MatMul ─ Mul(scale) ─ Where(masked) ─ Softmax ─ MatMul ─ Transpose ─ Reshape ─► out
    k_rot ─ Concat(past_k) ─► present.k ─ Unsqueeze─Expand─Reshape (repeat kv heads) ─ Transpose ┘              │
    v     ─ Concat(past_v) ─► present.v ─ Unsqueeze─Expand─Reshape ────────────────────────────────────────────┘
                                         becomes
    q_rot, k_rot, v ─ Transpose─Reshape (B,S,H*D) ─► GroupQueryAttention(past_k, past_v, seqlens_k, total, bias)
                                                      ─► out, present.k, present.v

The KV cache keeps the concat contract ([batch, kv_heads, past, head_dim] in, past + seq out),
so every runner and onnxruntime-genai drive it unchanged. ``seqlens_k[b]`` is the index of the
last 1 in ``attention_mask[b]``: ``total - 1`` for full and left-padded masks (every concat
caller), and each row's own length for a right-padded mask over a preallocated buffer bound as
both past and present, which lets ONNX Runtime's slot pool decode rows of different lengths in
one step (the graph says so in its metadata, ``PER_ROW_LENGTHS_KEY``). ORT's kernel does not
take a chunked prefill (more than one new token on a non-empty cache) for batch > 1; the
runner refuses that case with a clear error.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from starlift.core.artifact import FAST_PATH_CONDITION, PER_ROW_LENGTHS_KEY
from starlift.model import Starcoder2Config


class _AttentionToGQA(pattern.RewriteRuleClassBase):
    def __init__(self, config: Starcoder2Config, mask: ir.Value, position_ids: ir.Value):
        super().__init__("StarliftGQA", remove_nodes=True)
        self.config, self.mask, self.position_ids = config, mask, position_ids

    def pattern(self, op, q_rot, k_rot, v, past_k, past_v, scale, masked_out, min_val):
        k_all = op.Concat(past_k, k_rot, axis=2, _outputs=["k_all"])
        v_all = op.Concat(past_v, v, axis=2, _outputs=["v_all"])
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(k_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(v_all, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        k_rep = pattern.OrValue([k_rep, k_all])  # no repeat when kv heads == heads
        v_rep = pattern.OrValue([v_rep, v_all])
        scores = op.MatMul(q_rot, op.Transpose(k_rep, perm=[0, 1, 3, 2]))
        scores = pattern.OrValue([op.Cast(scores, to=ir.DataType.FLOAT), scores])  # fp16: scores in fp32
        masked = op.Where(masked_out, min_val, op.Mul(scores, scale))
        probs = op.Softmax(masked, axis=-1)
        probs = pattern.OrValue([op.Cast(probs), probs])  # fp16: back to the model dtype
        out = op.Reshape(op.Transpose(op.MatMul(probs, v_rep), perm=[0, 2, 1, 3]), pattern.ANY_VALUE)
        return out, k_all, v_all

    def check(self, context, scale, past_k, **_):
        result = pattern.MatchResult()
        if scale.const_value is None or past_k not in context.graph_or_function.inputs:
            return result.fail("not the traced decoder attention")
        return True

    def rewrite(self, op, q_rot, k_rot, v, past_k, past_v, scale, **_):
        c = self.config
        flat = op.Constant(value=ir.tensor(np.array([0, 0, -1], np.int64)))

        def bsd(x):  # (B, N, S, D) -> (B, S, N*D)
            source = _projection(x)
            if source is not None:  # x is a projection's heads view: GQA takes the projection itself
                return source
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

        mask = self.mask
        total64 = op.Shape(mask, start=1, end=2)
        total = op.Cast(op.Squeeze(total64), to=ir.DataType.INT32)
        batch = op.Shape(mask, start=0, end=1)
        # seqlens_k[b] = index of the last 1 in attention_mask[b]: total - 1 for full and
        # left-padded masks (what onnxruntime-genai and every concat caller feed), and each row's
        # own length for a right-padded batch over a shared buffer (the engine's slot pool)
        zero64 = op.Constant(value=ir.tensor(np.array(0, np.int64)))
        one64 = op.Constant(value=ir.tensor(np.array(1, np.int64)))
        slots = op.Range(zero64, op.Squeeze(total64), one64)
        last = op.ReduceMax(op.Mul(mask, slots), op.Constant(value=ir.tensor(np.array([1], np.int64))),
                            keepdims=0)
        seqlens = op.Cast(last, to=ir.DataType.INT32)
        # new tokens, read off position_ids (B, T) so q_rot keeps a single consumer and the RoPE
        # rule (rotary.py) can replace it
        seq = op.Shape(self.position_ids, start=1, end=2)
        dtype = ir.DataType.FLOAT16 if past_k.dtype == ir.DataType.FLOAT16 else ir.DataType.FLOAT
        lowest = float(np.finfo(np.float16 if dtype == ir.DataType.FLOAT16 else np.float32).min)
        keep = op.Cast(mask, to=ir.DataType.BOOL)
        zero = op.Constant(value=ir.tensor(np.array(0.0, dtype.numpy())))
        low = op.Constant(value=ir.tensor(np.array(lowest, dtype.numpy())))
        bias = op.Unsqueeze(op.Where(keep, zero, low), op.Constant(value=ir.tensor(np.array([1, 2], np.int64))))
        ones = op.Constant(value=ir.tensor(np.array([1], np.int64)))
        bias = op.Expand(bias, op.Concat(batch, ones, seq, total64, axis=0))
        return op.GroupQueryAttention(
            bsd(q_rot), bsd(k_rot), bsd(v), past_k, past_v, seqlens, total, None, None, None, bias,
            num_heads=c.num_attention_heads, kv_num_heads=c.num_key_value_heads,
            local_window_size=c.sliding_window or -1, scale=float(scale.const_value.numpy()),
            _domain="com.microsoft", _outputs=3,
        )


def _projection(x: ir.Value) -> ir.Value | None:
    """``lin`` when ``x = Transpose(Reshape(lin, (B, S, N, D)), perm=[0, 2, 1, 3])`` with ``lin``
    of rank 3: then ``(B, S, N*D)`` is ``lin`` as it is, and GQA's value input needs no
    Transpose and no Reshape (the values are not rotated, so nothing else sits in between)."""
    node = x.producer()
    if node is None or node.op_type != "Transpose":
        return None
    perm = node.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [0, 2, 1, 3]:
        return None
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    lin = reshape.inputs[0]
    if lin.shape is None or len(lin.shape) != 3:
        return None
    return lin


def fuse_group_query_attention(model: ir.Model, config: Starcoder2Config) -> int:
    """Replace every layer's attention; returns how many were fused."""
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    position_ids = next(v for v in model.graph.inputs if v.name == "position_ids")
    rule = _AttentionToGQA.rule(config, mask, position_ids)
    count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
        model.metadata_props[PER_ROW_LENGTHS_KEY] = "true"  # read by runners from the model itself
    return count


# ---- the prompt fast path ------------------------------------------------------------------
# The bias that carries left padding is a [batch, 1, new, total] tensor: for a 4,096-token prompt
# the graph materializes 64 MiB of zeros and ORT's flash kernel adds it to every score block, and
# the sliding window adds a second masking pass over every block. Neither changes a score when no
# row has a hole before its last token and no row is longer than the window, which is every
# prompt and step the engine and the concat runners feed (they pad on the right, or not at all).
# On this machine, one GroupQueryAttention of a 4,096-token prompt (113M shape, 2 threads): 477 ms
# with the bias and the window, 365 ms without; the whole fp32 prefill 11.5 -> 10.1 s (latency.md, section 7).
# ONNX has no optional input chosen at run time, so each layer's attention becomes an If: the
# then-branch is the same kernel without the bias and the window, the else-branch the full one
# (with the bias's Expand moved inside it, so the fast path never builds the bias).

FAST_PATH_SUFFIX = "_no_padding"


def add_prompt_fast_path(model: ir.Model, config: Starcoder2Config) -> int:
    """Wrap every GroupQueryAttention in ``If(no hole and within the window)``; returns how many.

    The condition is computed once from ``attention_mask`` and the kernels' ``seqlens_k`` (index of
    each row's last 1): a row has no hole when its 1s count ``seqlens_k + 1``, and fits the window
    when ``seqlens_k < window``. Both branches write the same present outputs (in place when the
    caller binds one buffer as past and present: ORT hands the If's output buffer to the branch)."""
    graph = model.graph
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        return 0
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    seqlens = nodes[0].inputs[5]
    if any(n.inputs[5] is not seqlens for n in nodes):
        raise ValueError("the GroupQueryAttention nodes read different seqlens_k: not the graph gqa.py writes")

    made: list[ir.Node] = []

    def add(op_type, inputs, **attributes):
        node = ir.node(op_type, inputs, attributes=attributes)
        node.outputs[0].name = f"{FAST_PATH_CONDITION}_{len(made)}"
        made.append(node)
        return node.outputs[0]

    def const(value):
        return add("Constant", [], value=ir.tensor(np.array(value, np.int64)))

    last = add("Cast", [seqlens], to=ir.DataType.INT64)
    ones_per_row = add("ReduceSum", [mask, const([1])], keepdims=0)
    holes = add("ReduceSum", [add("Sub", [add("Add", [last, const(1)]), ones_per_row])], keepdims=0)
    cond = add("Equal", [holes, const(0)])
    window = config.sliding_window
    if window:
        cond = add("And", [cond, add("Less", [add("ReduceMax", [last], keepdims=0), const(window)])])
    cond.name = FAST_PATH_CONDITION
    graph.insert_before(nodes[0], made)

    moved: set[ir.Node] = set()  # the bias Expands copied into the else-branches
    for node in nodes:
        inputs = list(node.inputs)
        attributes = {k: v for k, v in node.attributes.items()}
        fast = ir.Node("com.microsoft", "GroupQueryAttention", inputs[:7],
                       [*(a for k, a in attributes.items() if k != "local_window_size"),
                        ir.AttrInt64("local_window_size", -1)],
                       num_outputs=3, name=f"{node.name}{FAST_PATH_SUFFIX}")
        full_nodes = []
        bias = inputs[10] if len(inputs) > 10 else None
        if bias is not None and bias.producer() is not None and bias.producer().op_type == "Expand":
            # build the [batch, 1, new, total] bias only on the path that reads it
            moved.add(bias.producer())
            expand = ir.Node("", "Expand", list(bias.producer().inputs), num_outputs=1)
            full_nodes.append(expand)
            inputs[10] = expand.outputs[0]
        full = ir.Node("com.microsoft", "GroupQueryAttention", inputs, list(attributes.values()),
                       num_outputs=3, name=node.name)
        full_nodes.append(full)
        for branch, tag in ((fast, "fast"), (full, "full")):
            for new, old in zip(branch.outputs, node.outputs, strict=True):
                new.dtype, new.shape, new.name = old.dtype, old.shape, f"{old.name}_{tag}"
        for i, extra in enumerate(full_nodes[:-1]):
            extra.outputs[0].name = f"{node.name}_bias_{i}"
        branch_if = ir.Node("", "If", [cond], [
            ir.AttrGraph("then_branch", ir.Graph([], list(fast.outputs), nodes=[fast], name=f"{node.name}_fast")),
            ir.AttrGraph("else_branch", ir.Graph([], list(full.outputs), nodes=full_nodes, name=f"{node.name}_full")),
        ], num_outputs=3, name=f"{node.name}_if")
        graph.insert_before(node, branch_if)
        for new, old in zip(branch_if.outputs, node.outputs, strict=True):
            new.dtype, new.shape = old.dtype, old.shape
            name, old.name = old.name, None
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.name = name
        graph.remove(node, safe=True)
    # the branches build the bias now: the copied Expands go where nothing else reads them
    graph.remove([n for n in moved if not any(v.uses() or v.is_graph_output() for v in n.outputs)], safe=True)
    return len(nodes)
