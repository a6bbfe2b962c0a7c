"""Localize a parity failure: the first layer and sub-block where a backend leaves the reference.

The artifact's manifest maps every point of the reference model's residual stream to the ONNX
value that holds it (``starlift.core.tensor_map``, recorded at export). Localization marks those
values as extra outputs of a copy of the graph, runs it on the backend with exactly the inputs
the reference model gets, and compares point by point, in the order the residual stream passes
them: the embedding, then each layer after attention and after the MLP, then the final norm
and the logits. Two runs:

- prefill: the probe tokens on an empty cache;
- decode: one more token on the *reference's* cache after the prefill (the same past for
  both), so an error of the cached path shows where it starts, not where it accumulated.

Each point is judged against the precision's hidden-state tolerance (``starlift.core.tolerance``),
relative to the reference tensor's own scale. The first point over tolerance is the answer;
the whole curve (error by point) comes with it.

Marking: on ONNX Runtime, the graph is read with onnx-ir (external weights stay on disk), the
mapped values are appended to its outputs, and the serialized copy is loaded from memory
with its weights read from the artifact folder (nothing is written). On OpenVINO, its own
``Model.add_outputs`` marks the same tensor names on the model it read. Polygraphy's
``ModifyOutputs`` would do the marking through onnx-graphsurgeon (another dependency) and its
comparators judge outputs one by one; what localization needs, the first point over tolerance
along the residual stream, is the ordering the map gives, so it is written here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import tolerance
from starlift.core.errors import StarliftError, UsageError
from starlift.core.extras import require

LOCALIZE_BACKENDS = ("onnxruntime", "openvino")


@dataclass
class Probe:
    """The inputs both sides get: ``ids`` (1, T) as a prefill, then ``next_id`` as one decode step."""

    ids: np.ndarray
    next_id: int


def make_probe(tokens: list[int], length: int) -> Probe:
    if len(tokens) < 3:
        raise UsageError("localization needs at least 3 tokens of text")
    length = max(2, min(length, len(tokens) - 1))
    return Probe(np.asarray([tokens[:length]], np.int64), int(tokens[length]))


def default_probe_length(config, available: int) -> int:
    """Longer than the sliding window (a window bug shows only past it), within the context."""
    window = config.sliding_window or 0
    return max(2, min(available - 1, config.max_position_embeddings - 1, max(64, window + 16)))


# ---- the reference side ---------------------------------------------------------------------
def reference_stream(model, probe: Probe) -> dict[str, Any]:
    """The reference model's taps (``tensor_map.points`` order) and logits at prefill and at the
    decode step, and the cache after the prefill, all as float32 numpy arrays."""
    import torch

    from starlift.model.taps import residual_stream

    t = probe.ids.shape[1]
    ids = torch.from_numpy(probe.ids)
    with torch.inference_mode(), residual_stream(model) as taps:
        logits, past = model(ids, torch.ones_like(ids), torch.arange(t)[None], model.empty_past(1))
        prefill = [x.float().numpy().copy() for x in taps] + [logits.numpy().copy()]
        nxt = torch.tensor([[probe.next_id]])
        logits, _ = model(nxt, torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), past)
        decode = [x.float().numpy().copy() for x in taps] + [logits.numpy().copy()]
    cache = [(k.float().numpy(), v.float().numpy()) for k, v in past]
    return {"prefill": prefill, "decode": decode, "past": cache}


# ---- the candidate side ---------------------------------------------------------------------
class _Marked:
    """A backend session of the artifact's graph with the mapped tensors as extra outputs."""

    def __init__(self, backend: str, model_path: Path, names: list[str]):
        self.names = names
        self.kind = backend
        if backend == "onnxruntime":
            self._ort(model_path)
        elif backend == "openvino":
            self._openvino(model_path)
        else:
            raise UsageError(f"localization runs on {', '.join(LOCALIZE_BACKENDS)}, not {backend!r}")

    def _ort(self, model_path: Path) -> None:
        require("onnx_ir", purpose="localization on onnxruntime (marking tensors on a copy of the graph)")
        import onnx_ir as ir
        import onnxruntime as ort

        model = ir.load(model_path)  # external tensors stay references to the artifact's data file
        values = {v.name: v for node in model.graph for v in node.outputs}
        have = {v.name for v in model.graph.outputs}
        for name in self.names:
            if name not in values:
                raise StarliftError(f"{model_path}'s manifest maps {name!r}, which no node of its graph produces: the "
                                    "manifest does not belong to this graph (re-export the artifact)")
            if name not in have:
                model.graph.outputs.append(values[name])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # the copy lives in memory; its external weights are read from the artifact folder
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(model_path.parent))
        self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])
        kv = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kv.type)
        if self.kv_dtype is None:
            raise UsageError(f"{model_path}: localization on onnxruntime supports fp32/fp16 KV caches, not {kv.type}")

    def _openvino(self, model_path: Path) -> None:
        require("openvino", purpose="localization on openvino")
        import openvino as ov

        core = ov.Core()
        with _without_fast_path(model_path) as path:
            model = core.read_model(str(path))
            model.add_outputs([n for n in self.names if n != "logits"])
            try:
                self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            except RuntimeError as e:
                raise StarliftError(f"OpenVINO cannot compile {model_path} ({str(e).strip().splitlines()[0]}); "
                                    "localize it on onnxruntime") from e
        self.request = self.compiled.create_infer_request()
        kv = next(p for p in model.inputs if p.get_any_name().startswith("past_key_values."))
        self.kv_dtype = {"f32": np.float32, "f16": np.float16}.get(kv.get_element_type().get_type_name())
        if self.kv_dtype is None:
            raise UsageError(f"{model_path}: localization on openvino supports fp32/fp16 KV caches")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.kind == "onnxruntime":
            out = self.session.run(self.names, feed)
        else:
            self.request.infer(feed)
            out = [np.array(self.request.get_tensor(n).data) for n in self.names]
        return [np.asarray(o, dtype=np.float32) for o in out]


@contextlib.contextmanager
def _without_fast_path(model_path: Path):
    """The ort flavour's graph with each attention's If (export/gqa.py) replaced by its full
    branch, for OpenVINO: OpenVINO 2026.4 computes wrong values (NaN) for a SkipLayerNormalization
    residual output marked as an extra output when an If sits upstream, even with two identical
    branches (measured on the tiny test shape); the graph as it is runs right. The copy goes to a
    temporary folder beside a hard link to the weights (a copy where the filesystem refuses one:
    OpenVINO reads external data from the model's own folder only)."""
    require("onnx", purpose="localization of an ort-flavour graph on openvino")
    import onnx

    from starlift.core.artifact import FAST_PATH_CONDITION

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if not any(n.op_type == "If" and n.input[0] == FAST_PATH_CONDITION for n in graph.node):
        yield model_path
        return
    nodes = []
    for node in graph.node:
        if node.op_type != "If" or node.input[0] != FAST_PATH_CONDITION:
            nodes.append(node)
            continue
        full = next(a.g for a in node.attribute if a.name == "else_branch")
        rename = dict(zip((o.name for o in full.output), node.output, strict=True))
        for inner in full.node:
            inner.output[:] = [rename.get(o, o) for o in inner.output]
            nodes.append(inner)
    graph.ClearField("node")
    graph.node.extend(nodes)
    files = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    with tempfile.TemporaryDirectory(prefix="starlift-localize-") as tmp:
        for name in files:
            try:
                os.link(model_path.parent / name, Path(tmp) / name)
            except OSError:
                shutil.copyfile(model_path.parent / name, Path(tmp) / name)
        onnx.save(model, str(Path(tmp) / model_path.name))
        yield Path(tmp) / model_path.name


def _feeds(probe: Probe, past: list[tuple[np.ndarray, np.ndarray]], kv_dtype, layers: int, kv_heads: int,
           head_dim: int) -> tuple[dict, dict]:
    t = probe.ids.shape[1]
    prefill = {"input_ids": probe.ids, "attention_mask": np.ones((1, t), np.int64),
               "position_ids": np.arange(t, dtype=np.int64)[None]}
    decode = {"input_ids": np.array([[probe.next_id]], np.int64), "attention_mask": np.ones((1, t + 1), np.int64),
              "position_ids": np.array([[t]], np.int64)}
    for i in range(layers):
        for j, kv in enumerate(("key", "value")):
            prefill[f"past_key_values.{i}.{kv}"] = np.zeros((1, kv_heads, 0, head_dim), kv_dtype)
            decode[f"past_key_values.{i}.{kv}"] = np.ascontiguousarray(past[i][j].astype(kv_dtype))
    return prefill, decode


# ---- comparison -----------------------------------------------------------------------------
def compare_stream(entries: list[dict], reference: list[np.ndarray], candidate: list[np.ndarray],
                   precision: str, shape: tolerance.Shape) -> list[dict]:
    """One row per mapped point: error statistics and the precision's bound at its scale and depth."""
    rows = []
    for entry, ref, cand in zip(entries, reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise StarliftError(f"{entry['tensor']} has shape {cand.shape} on the backend but the reference's "
                                f"{entry['reference']} has {ref.shape}: the artifact's tensor map does not match "
                                "its graph (re-export it)")
        diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        finite = bool(np.isfinite(cand).all())
        scale = float(np.abs(ref).max())
        bound = tolerance.hidden_bound(precision, shape, entry["layer"], entry["block"], scale)
        max_abs = float(diff.max()) if finite else float("inf")
        rows.append({"layer": entry["layer"], "block": entry["block"], "tensor": entry["tensor"],
                     "max_abs_error": max_abs, "mean_abs_error": float(diff.mean()) if finite else float("inf"),
                     "scale": scale, "relative_error": max_abs / scale if scale else max_abs,
                     "tolerance": bound, "finite": finite, "over": bool(not finite or max_abs > bound)})
    return rows


def localize(path: str | Path, backend: str, precision: str, shape: tolerance.Shape, probe: Probe,
             reference: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """First divergence and the error curve of ``backend`` on the artifact at ``path``, against
    ``reference = reference_stream(model, probe)``."""
    from starlift.core import tensor_map
    from starlift.core.artifact import MODEL_FILE

    tolerance.check_precision(precision)
    tmap = tensor_map.read(manifest)
    if tmap is None:
        raise UsageError(f"{path} has no tensor map in its manifest (exported before localization existed): "
                         "re-export it with this version of starlift to localize a divergence")
    if tmap.get("num_layers") != shape.num_layers:
        raise UsageError(f"{path} maps {tmap.get('num_layers')} layers but the reference has {shape.num_layers}: "
                         "they are different models")
    # tmap["tensors"] lists tensor_map.points() then the logits: the order reference_stream returns
    mapped = [(i, e) for i, e in enumerate(tmap["tensors"]) if e.get("tensor")]
    entries = [e for _, e in mapped]
    marked = _Marked(backend, Path(path) / MODEL_FILE, [e["tensor"] for e in entries])
    layers = shape.num_layers
    kv_heads, head_dim = reference["past"][0][0].shape[1], reference["past"][0][0].shape[3]
    prefill_feed, decode_feed = _feeds(probe, reference["past"], marked.kv_dtype, layers, kv_heads, head_dim)
    phases = {}
    for phase, feed in (("prefill", prefill_feed), ("decode", decode_feed)):
        outputs = marked.run(feed)
        phases[phase] = compare_stream(entries, [reference[phase][i] for i, _ in mapped], outputs, precision, shape)
    return {"backend": backend, "precision": precision, "probe_tokens": int(probe.ids.shape[1]),
            "first_divergence": _first_divergence(phases), "curve": phases,
            "unmapped": [{"layer": e["layer"], "block": e["block"], "reason": e.get("missing")}
                         for e in tmap["tensors"] if not e.get("tensor")]}


def _first_divergence(phases: dict[str, list[dict]]) -> dict[str, Any] | None:
    """The earliest point of the residual stream over tolerance in any phase (prefill first on ties)."""
    best = None
    for phase, rows in phases.items():
        for position, row in enumerate(rows):
            if row["over"]:
                if best is None or position < best[0]:
                    best = (position, phase, row)
                break
    if best is None:
        return None
    _, phase, row = best
    return {"layer": row["layer"], "block": row["block"], "phase": phase, "tensor": row["tensor"],
            "max_abs_error": row["max_abs_error"], "mean_abs_error": row["mean_abs_error"],
            "relative_error": row["relative_error"], "scale": row["scale"], "tolerance": row["tolerance"]}


def format_curve(result: dict[str, Any]) -> str:
    """The error curve as a table, prefill and decode side by side."""
    pre, dec = result["curve"]["prefill"], result["curve"]["decode"]
    lines = [f"localization on {result['backend']} ({result['precision']}, {result['probe_tokens']} prefill tokens + "
             "1 decode step on the reference's cache)",
             f"{'layer':>5} {'block':<11} {'prefill max|err|':>16} {'rel':>9} {'tol':>9}   "
             f"{'decode max|err|':>15} {'rel':>9} {'tol':>9}"]
    for a, b in zip(pre, dec, strict=True):
        block = a["block"] if a["block"] != "head" else f"head/{_short_label(a)}"
        lines.append(f"{a['layer']:>5} {block:<11} {a['max_abs_error']:>16.3e} {a['relative_error']:>9.2e} "
                     f"{a['tolerance']:>9.2e}{' *' if a['over'] else '  '} {b['max_abs_error']:>15.3e} "
                     f"{b['relative_error']:>9.2e} {b['tolerance']:>9.2e}{' *' if b['over'] else ''}")
    first = result["first_divergence"]
    if first is None:
        lines.append("no point over tolerance: the backend follows the reference through every layer")
    else:
        where = "the embedding" if first["block"] == "embedding" else (
            "the final norm / LM head" if first["block"] == "head" else f"layer {first['layer']}'s {first['block']}")
        lines.append(f"first divergence: {where} at {first['phase']} (max |err| {first['max_abs_error']:.3g}, "
                     f"tolerance {first['tolerance']:.3g}; tensor {first['tensor']})")
    return "\n".join(lines)


def _short_label(row: dict) -> str:
    if row["block"] == "embedding":
        return "emb"
    if row["block"] == "head":
        return "logits" if row["tensor"] == "logits" else "norm"
    return f"{row['layer']}.{'attn' if row['block'] == 'attention' else 'mlp'}"


def plot_report(report: dict[str, Any], out: str | Path) -> None:
    """Relative error by point (prefill and decode) against each point's bound, one panel per
    localized backend (needs matplotlib)."""
    require("matplotlib", purpose="--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [v["localization"] for v in report["backends"].values() if "curve" in v.get("localization", {})]
    if not results:
        raise UsageError("no backend was localized, nothing to plot (localization runs on onnxruntime and openvino)")
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.5 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        for phase, style in (("prefill", "o-"), ("decode", "s--")):
            rows = result["curve"][phase]
            ax.semilogy(range(len(rows)), [max(r["relative_error"], 1e-12) for r in rows], style, label=phase)
        rows = result["curve"]["prefill"]
        ax.semilogy(range(len(rows)), [r["tolerance"] / r["scale"] if r["scale"] else r["tolerance"] for r in rows],
                    "k:", label="tolerance")
        labels = [_short_label(r) for r in rows]
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("max |error| / max |reference|")
        first = result["first_divergence"]
        where = "none" if first is None else f"layer {first['layer']} {first['block']} ({first['phase']})"
        ax.set_title(f"{result['backend']} vs reference ({result['precision']}): first divergence {where}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
