"""Classifier runners: a classification artifact (or checkpoint) in, float32 logits out.

A classifier runs each batch once, with no cache, so its surface is smaller than a decoder
runner's: ``activate()`` / ``infer(input_ids, attention_mask)`` / ``deactivate()``, a context
manager, and ``info`` (task, labels, pad token) read from the model's own config.json. Inputs
are checked before the backend sees them; backends are imported when a runner activates.

``infer`` returns (B, labels) for a sequence classifier and (B, T, labels) for a token
classifier. Positions follow ``attention_mask`` (the artifact computes them in its graph), so
rows may be padded on either side.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starlift.core.errors import StarliftError, UsageError
from starlift.core.extras import require

from .base import Lifecycle
from .openvino_runner import PRECISIONS, compile_model, port_shape

HEAD_TASKS = ("text-classification", "token-classification")


@dataclass(frozen=True)
class HeadInfo:
    """What a classifier needs to know about its head (from config.json)."""

    task: str
    labels: tuple[str, ...]
    problem_type: str | None
    pad_token_id: int | None
    vocab_size: int
    context: int

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def from_folder(cls, folder: Path) -> HeadInfo:
        from starlift.model.config import Starcoder2Config

        config = Starcoder2Config.from_hf(folder)
        if config.head is None:
            raise UsageError(f"{folder} holds a causal LM ({config.architecture}), not a classifier: load it with "
                             "starlift.load() / starlift generate, or export a checkpoint whose architectures is "
                             "Starcoder2ForSequenceClassification or Starcoder2ForTokenClassification")
        return cls(config.head.task, config.head.labels, config.head.problem_type, config.pad_token_id,
                   config.vocab_size, config.max_position_embeddings)


class ClassifierRunner(Lifecycle):
    name = "classifier"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info: HeadInfo | None = None
        self.is_active = False

    def _load(self) -> None:
        self.info = HeadInfo.from_folder(self.folder)
        self._activate_impl()

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 logits: (B, labels) for sequence classification, (B, T, labels) for tokens."""
        if not self.is_active:
            raise StarliftError(f"the {self.name} classifier is not active; call activate() or use it in a with-block")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise UsageError(f"input_ids must be (batch, tokens) with at least one token, got shape {input_ids.shape}")
        if attention_mask.shape != input_ids.shape:
            raise UsageError(f"attention_mask must have input_ids' shape {input_ids.shape}, got {attention_mask.shape}")
        info = self.info
        if input_ids.min() < 0 or input_ids.max() >= info.vocab_size:
            raise UsageError(f"token ids must be in [0, {info.vocab_size}), got {input_ids.min()}..{input_ids.max()}")
        if not np.isin(attention_mask, (0, 1)).all():
            raise UsageError("attention_mask must hold only 0 (padding) and 1 (real token)")
        if input_ids.shape[1] > info.context:
            raise UsageError(f"{input_ids.shape[1]} tokens exceed the model's context of {info.context}; "
                             "truncate the text")
        if info.task == "text-classification" and info.pad_token_id is None and input_ids.shape[0] > 1:
            raise UsageError(f"this sequence classifier has no pad_token_id, so it cannot tell where padded rows end "
                             f"(transformers refuses it too): classify one text at a time (got a batch of "
                             f"{input_ids.shape[0]}), or set pad_token_id in the checkpoint's config.json and re-export")
        logits = self._infer_impl(input_ids, attention_mask)
        expected = (input_ids.shape[0], info.num_labels) if info.task == "text-classification" else \
            (*input_ids.shape, info.num_labels)
        if logits.shape != expected:
            raise StarliftError(f"{self.folder} returned logits of shape {logits.shape}, expected {expected} for "
                                f"{info.task} with {info.num_labels} labels; the artifact does not match its config.json")
        return logits

    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def _check_io(self, inputs: list[str], outputs: dict[str, tuple]) -> None:
        if sorted(inputs) != ["attention_mask", "input_ids"] or "logits" not in outputs:
            raise StarliftError(
                f"{self.folder / 'model.onnx'} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, not a "
                "classifier's (input_ids, attention_mask -> logits); a causal-LM artifact runs with starlift.load()")
        labels = outputs["logits"][-1]
        if labels != self.info.num_labels:
            raise StarliftError(f"{self.folder / 'model.onnx'}: logits have {labels} labels but config.json names "
                                f"{self.info.num_labels}; the artifact does not match its config.json (re-export it)")


class OnnxRuntimeClassifier(ClassifierRunner):
    name = "onnxruntime"

    def __init__(self, folder, providers: list[str] | None = None, threads: int | None = None,
                 graph_optimization: str = "all"):
        super().__init__(folder)
        self.providers, self.threads, self.graph_optimization = providers, threads, graph_optimization

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        from .onnxruntime_runner import OPT_LEVELS, PROVIDER_ALIASES

        if self.graph_optimization not in OPT_LEVELS:
            raise UsageError(f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, got {self.graph_optimization!r}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.graph_optimization])
        if self.threads:
            opts.intra_op_num_threads = self.threads
        providers = ["CPUExecutionProvider"]
        if self.providers:
            available = ort.get_available_providers()
            providers = [PROVIDER_ALIASES.get(p.lower(), p) for p in self.providers]
            missing = [p for p in providers if p not in available]
            if missing:
                raise UsageError(f"requested provider(s) {', '.join(missing)}, but available providers are: "
                                 f"{', '.join(available)}")
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=providers)
        self._check_io([i.name for i in self.session.get_inputs()],
                       {o.name: tuple(o.shape) for o in self.session.get_outputs()})

    def _infer_impl(self, input_ids, attention_mask):
        out = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        return out.astype(np.float32, copy=False)

    def _deactivate_impl(self) -> None:
        self.session = None


class OpenVinoClassifier(ClassifierRunner):
    """The portable flavour on OpenVINO's CPU plugin; f32 unless asked (its CPU default may be bf16)."""

    name = "openvino"

    def __init__(self, folder, device: str = "CPU", precision: str = "f32", threads: int | None = None):
        super().__init__(folder)

        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device, self.precision, self.threads = device, PRECISIONS[precision], threads

    def _activate_impl(self) -> None:
        require("openvino", purpose="the openvino backend")
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.folder / "model.onnx"))
        self._check_io([p.get_any_name() for p in model.inputs], {p.get_any_name(): port_shape(p) for p in model.outputs})
        self.compiled = compile_model(core, model, self.device, self.precision, self.threads, self.folder / "model.onnx")
        self.request = self.compiled.create_infer_request()

    def _infer_impl(self, input_ids, attention_mask):
        self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.array(self.request.get_tensor("logits").data, dtype=np.float32)

    def _deactivate_impl(self) -> None:
        self.request = self.compiled = None


class TorchClassifier(ClassifierRunner):
    """The reference head in PyTorch, on a checkpoint folder (or a bundled name)."""

    name = "torch"

    def __init__(self, checkpoint, dtype: str | None = "fp32", threads: int | None = None):
        from starlift.model.checkpoint import resolve_checkpoint

        super().__init__(resolve_checkpoint(checkpoint))
        self.dtype, self.threads = dtype, threads

    def _activate_impl(self) -> None:
        import torch

        from starlift.model import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = load_checkpoint(self.folder, dtype=self.dtype)

    def _infer_impl(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            logits, _ = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return logits.numpy()

    def _deactivate_impl(self) -> None:
        self.model = None


# backend -> (runner, needs an exported artifact); TensorRT has no classifier runner yet
CLASSIFIER_BACKENDS: dict[str, tuple[type[ClassifierRunner], bool]] = {
    "onnxruntime": (OnnxRuntimeClassifier, True),
    "openvino": (OpenVinoClassifier, True),
    "torch": (TorchClassifier, False),
}


def create_classifier(backend: str, path: str | Path, **options) -> ClassifierRunner:
    """A classifier runner for an artifact folder (ONNX backends) or a checkpoint (torch)."""
    if backend not in CLASSIFIER_BACKENDS:
        raise UsageError(f"backend {backend!r} has no classifier runner; classifier backends: "
                         f"{', '.join(CLASSIFIER_BACKENDS)}")
    return CLASSIFIER_BACKENDS[backend][0](path, **options)


def batched_logits(runner, sequences: list[list[int]], batch_size: int = 8) -> list[np.ndarray]:
    """Each token sequence's logits ((labels,) or (tokens, labels)), ``batch_size`` sequences per
    call, right-padded with the pad token: a sequence classifier pools the rightmost token that is
    not the pad token, which is then the token it pools for the sequence alone. One at a time when
    a sequence classifier has no pad token (it could not tell padding from text)."""
    info = runner.info
    pad = info.pad_token_id
    size = 1 if info.task == "text-classification" and pad is None else batch_size
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), size):
        batch = sequences[start:start + size]
        width = max(len(s) for s in batch)
        ids = np.full((len(batch), width), pad if pad is not None else 0, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        logits = runner.infer(ids, mask)
        out.extend(logits[row] if logits.ndim == 2 else logits[row, :len(seq)] for row, seq in enumerate(batch))
    return out
