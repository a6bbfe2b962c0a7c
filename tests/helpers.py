"""Test helpers that drive exported artifacts directly through ONNX Runtime and OpenVINO."""

from __future__ import annotations

import numpy as np
import torch

from starlift.export.validate import positions


def hf_full_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' logits for the whole sequence in one pass (the parity reference)."""
    with torch.no_grad():
        out = hf_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions(mask)))
    return out.logits.numpy()


class OrtDecoder:
    """A minimal concat-grow decode loop over an ONNX Runtime session of an artifact."""

    def __init__(self, path, kv_dtype=np.float32):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.kv_dtype = kv_dtype

    def run_chunks(self, ids: np.ndarray, mask: np.ndarray, chunks: list[int]) -> np.ndarray:
        """Feed ``ids`` in chunks of the given sizes through the cache; concatenated logits."""
        batch = ids.shape[0]
        pos = positions(mask)
        past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), self.kv_dtype) for i in self.past_inputs}
        out, start = [], 0
        for size in chunks:
            end = start + size
            feed = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end],
                    "position_ids": pos[:, start:end], **past}
            res = self.session.run(["logits", *self.present], feed)
            out.append(res[0])
            past = {n.replace("present.", "past_key_values."): v for n, v in zip(self.present, res[1:], strict=True)}
            start = end
        assert start == ids.shape[1]
        return np.concatenate(out, axis=1)


class OpenVinoDecoder(OrtDecoder):
    """The same loop on OpenVINO's CPU plugin with an f32 inference precision hint."""

    def __init__(self, path, kv_dtype=np.float32):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.past_inputs = [i for i in model.inputs if i.get_any_name().startswith("past_key_values.")]
        self.present = [o.get_any_name() for o in model.outputs if o.get_any_name().startswith("present.")]
        self.kv_dtype = kv_dtype
        self._shapes = {i.get_any_name(): i.get_partial_shape() for i in self.past_inputs}

    def run_chunks(self, ids, mask, chunks):
        batch = ids.shape[0]
        pos = positions(mask)
        past = {name: np.zeros((batch, shape[1].get_length(), 0, shape[3].get_length()), self.kv_dtype)
                for name, shape in self._shapes.items()}
        request = self.compiled.create_infer_request()
        out, start = [], 0
        for size in chunks:
            end = start + size
            feed = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end],
                    "position_ids": pos[:, start:end], **past}
            res = request.infer(feed)
            by_name = {n: v for k, v in res.items() for n in k.get_names()}
            out.append(by_name["logits"])
            past = {n.replace("present.", "past_key_values."): by_name[n].copy() for n in self.present}
            start = end
        return np.concatenate(out, axis=1)


def padded_ids(lengths: list[int], vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    total = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), total)).astype(np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        ids[row, : total - n] = 0
    return ids, mask


def genai_greedy(artifact, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy sequence (prompt included) on an artifact folder, unchanged."""
    import pytest

    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test extra")
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
