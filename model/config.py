"""StarCoder2 configuration: one frozen dataclass, named presets, and a strict reader of
Hugging Face ``config.json`` files.

``from_hf`` fails on any setting it does not implement instead of dropping it silently
(mlx-lm drops ``sliding_window`` and hard-codes exact GELU: two parity bugs from one habit).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlift.core.errors import ConfigError

# hidden_act values we implement, and the torch GELU approximation each one means.
GELU_APPROXIMATION = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}

# Keys of a Hugging Face config.json that carry no setting for inference: bookkeeping,
# training-only knobs (dropouts are off at inference: the model has no training mode),
# and generation defaults that belong to generation_config.json.
_IGNORED_KEYS = frozenset(
    {
        "dtype", "torch_dtype", "transformers_version", "use_cache",
        "initializer_range", "attention_dropout", "residual_dropout", "embedding_dropout",
        "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
        "_attn_implementation_autoset", "_from_model_config", "tokenizer_class",
        "classifier_dropout", "hidden_dropout",  # the token-classification head's dropout
    }
)

# transformers' architecture name -> the pipeline task its head serves.
CAUSAL_LM = "Starcoder2ForCausalLM"
ARCHITECTURES = {
    CAUSAL_LM: "text-generation",
    "Starcoder2ForSequenceClassification": "text-classification",
    "Starcoder2ForTokenClassification": "token-classification",
}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass(frozen=True)
class HeadConfig:
    """A classification head on the body (``score``: hidden -> num_labels), as transformers'
    ``Starcoder2ForSequenceClassification`` / ``Starcoder2ForTokenClassification`` hold it.

    ``labels`` is ``id2label`` in id order; ``bias`` is whether ``score`` has one (transformers:
    never for sequence classification, ``token_classification_bias`` (default true) for tokens).
    """

    architecture: str
    labels: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    bias: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES or self.architecture == CAUSAL_LM:
            raise ConfigError(f"{self.architecture!r} is not a classification head; starlift implements "
                              f"{sorted(a for a in ARCHITECTURES if a != CAUSAL_LM)}")
        if not self.labels or not all(isinstance(x, str) for x in self.labels):
            raise ConfigError(f"a classification head needs at least one label name, got {self.labels!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type={self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")

    @property
    def task(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


@dataclass(frozen=True)
class Starcoder2Config:
    vocab_size: int = 49152
    hidden_size: int = 3072
    intermediate_size: int = 12288
    num_hidden_layers: int = 30
    num_attention_heads: int = 24
    num_key_value_heads: int = 2
    max_position_embeddings: int = 16384
    sliding_window: int | None = 4096
    rope_theta: float = 999999.4420358813
    norm_epsilon: float = 1e-5
    use_bias: bool = True
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    head_dim_override: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    head: HeadConfig | None = None  # None: the causal LM (lm_head); else a classification head

    def __post_init__(self) -> None:
        if self.hidden_act not in GELU_APPROXIMATION:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; starlift implements "
                f"{sorted(GELU_APPROXIMATION)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")

    # ---- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def gelu_approximation(self) -> str:
        return GELU_APPROXIMATION[self.hidden_act]

    @property
    def architecture(self) -> str:
        return self.head.architecture if self.head else CAUSAL_LM

    @property
    def task(self) -> str:
        """The transformers pipeline task of this checkpoint's head (``text-generation`` for the LM)."""
        return ARCHITECTURES[self.architecture]

    @property
    def attention_window(self) -> int:
        """Keys a query may see, itself included (the whole context when there is no window)."""
        return self.sliding_window or self.max_position_embeddings

    def num_parameters(self) -> int:
        h, i, v, kv = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_key_value_heads
        q_dim, kv_dim = self.num_attention_heads * self.head_dim, kv * self.head_dim
        b = 1 if self.use_bias else 0
        attn = h * q_dim + 2 * h * kv_dim + q_dim * h + b * (q_dim + 2 * kv_dim + h)
        mlp = h * i + i * h + b * (i + h)
        norms = 2 * 2 * h
        per_layer = attn + mlp + norms
        embed = v * h
        if self.head is not None:  # score: hidden -> labels; a classifier has no LM head
            head = self.head.num_labels * (h + (1 if self.head.bias else 0))
        else:
            head = 0 if self.tie_word_embeddings else v * h
        return embed + self.num_hidden_layers * per_layer + 2 * h + head

    def kv_cache_bytes(self, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        """Bytes of the KV cache for ``tokens`` positions (the window caps what must be kept)."""
        return (2 * self.num_hidden_layers * batch * self.num_key_value_heads * self.head_dim
                * tokens * bytes_per_value)

    # ---- Hugging Face I/O -----------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | Path) -> Starcoder2Config:
        """Read a Hugging Face ``config.json`` (a dict, the file, or its folder) strictly."""
        if isinstance(source, dict):
            raw, where = dict(source), "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(
                    f"{path} does not exist: a checkpoint folder needs the config.json that "
                    "transformers' save_pretrained writes"
                )
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path} is not valid JSON ({e}); restore the checkpoint's config.json") from e
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
            where = str(path)
        return cls._from_dict(raw, where)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], where: str) -> Starcoder2Config:
        model_type = raw.pop("model_type", None)
        if model_type != "starcoder2":
            raise ConfigError(
                f"{where}: model_type is {model_type!r}, but starlift only handles 'starcoder2' "
                "checkpoints"
            )

        def refuse(key: str, value: Any, supported: str) -> None:
            raise ConfigError(f"{where}: unsupported setting {key}={value!r}; starlift supports {supported}")

        rope_theta = raw.pop("rope_theta", None)
        rope_parameters = raw.pop("rope_parameters", None)
        rope_scaling = raw.pop("rope_scaling", None)
        if rope_scaling is not None:
            refuse("rope_scaling", rope_scaling, "only null (no RoPE scaling)")
        if rope_parameters is not None:
            params = dict(rope_parameters)
            rope_type = params.pop("rope_type", params.pop("type", "default"))
            if rope_type != "default":
                refuse("rope_parameters.rope_type", rope_type, "only 'default'")
            theta = params.pop("rope_theta", rope_theta)
            if params:
                refuse("rope_parameters", rope_parameters, "only rope_type and rope_theta")
            rope_theta = theta
        norm_type = raw.pop("norm_type", "layer_norm")
        if norm_type != "layer_norm":
            refuse("norm_type", norm_type, "only 'layer_norm'")
        mlp_type = raw.pop("mlp_type", "default")
        if mlp_type != "default":
            refuse("mlp_type", mlp_type, "only 'default'")
        hidden_act = raw.pop("hidden_act", "gelu_pytorch_tanh")
        if hidden_act not in GELU_APPROXIMATION:
            refuse("hidden_act", hidden_act, f"one of {sorted(GELU_APPROXIMATION)}")
        head = _head_from_dict(raw, where)

        def single_id(key: str) -> int | None:
            value = raw.pop(key, None)
            if isinstance(value, list):
                if len(value) != 1:
                    refuse(key, value, "a single token id")
                value = value[0]
            return value

        kwargs: dict[str, Any] = {
            "hidden_act": hidden_act,
            "rope_theta": float(rope_theta if rope_theta is not None else 10000.0),
            "bos_token_id": single_id("bos_token_id"),
            "eos_token_id": single_id("eos_token_id"),
            "pad_token_id": single_id("pad_token_id"),
            "torch_dtype": str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            "head": head,
        }
        head_dim = raw.pop("head_dim", None)
        if head_dim is not None:
            kwargs["head_dim_override"] = int(head_dim)
        simple = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "sliding_window", "norm_epsilon", "use_bias", "tie_word_embeddings")
        for key in simple:
            if key in raw:
                kwargs[key] = raw.pop(key)
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        for key in list(raw):
            if key in _IGNORED_KEYS:
                raw.pop(key)
        if raw:
            unknown = ", ".join(sorted(raw))
            raise ConfigError(
                f"{where}: unsupported setting(s) {unknown}; starlift does not implement them and "
                "will not drop them silently. Remove them only if they do not change the model"
            )
        config = cls(**kwargs)
        if config.head_dim_override == config.hidden_size // config.num_attention_heads:
            config = dataclasses.replace(config, head_dim_override=None)
        return config

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers writes for this model (loadable by Starcoder2Config)."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "starcoder2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "norm_epsilon": self.norm_epsilon,
            "use_bias": self.use_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
            "embedding_dropout": 0.0,
        }
        if self.head_dim_override is not None:
            out["head_dim"] = self.head_dim_override
        if self.head is not None:
            out["id2label"] = {str(i): label for i, label in enumerate(self.head.labels)}
            out["label2id"] = {label: i for i, label in enumerate(self.head.labels)}
            if self.head.problem_type is not None:
                out["problem_type"] = self.head.problem_type
            if self.head.task == "token-classification" and not self.head.bias:
                out["token_classification_bias"] = False
        return out


def _head_from_dict(raw: dict[str, Any], where: str) -> HeadConfig | None:
    """The head named by ``architectures`` with its labels; pops the keys it reads.

    transformers writes ``id2label`` only when it differs from the default two labels
    (LABEL_0, LABEL_1), and older versions write ``id2label``/``label2id`` even for causal LMs
    (ignored there). ``label2id`` is not read at inference (transformers' pipelines use
    ``id2label``), so it is not checked.
    """
    architectures = raw.pop("architectures", None)
    id2label = raw.pop("id2label", None)
    raw.pop("label2id", None)
    num_labels = raw.pop("num_labels", None)
    problem_type = raw.pop("problem_type", None)
    token_bias = raw.pop("token_classification_bias", None)
    if architectures is None:
        architecture = CAUSAL_LM
    elif (not isinstance(architectures, list) or len(architectures) != 1
          or architectures[0] not in ARCHITECTURES):
        raise ConfigError(
            f"{where}: unsupported architectures={architectures!r}; starlift implements exactly one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    else:
        architecture = architectures[0]
    if architecture == CAUSAL_LM:
        if problem_type is not None or token_bias is not None:
            key = "problem_type" if problem_type is not None else "token_classification_bias"
            raise ConfigError(f"{where}: {key} is set but architectures is {CAUSAL_LM}, which has no "
                              "classification head; fix architectures or remove the setting")
        return None
    if id2label is not None:
        if not isinstance(id2label, dict):
            raise ConfigError(f"{where}: id2label must map label ids to names, got {id2label!r}")
        try:
            by_id = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: id2label keys must be integer label ids, got {sorted(id2label)}") from None
        if sorted(by_id) != list(range(len(by_id))) or not all(isinstance(v, str) for v in by_id.values()):
            raise ConfigError(f"{where}: id2label must name every label id 0..n-1 once with a string, got {id2label!r}")
        labels = tuple(by_id[i] for i in range(len(by_id)))
        if num_labels is not None and num_labels != len(labels):
            raise ConfigError(f"{where}: num_labels={num_labels} but id2label names {len(labels)} labels; "
                              "make them agree")
    else:  # transformers' default labels
        count = 2 if num_labels is None else num_labels
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"{where}: num_labels must be a positive integer, got {num_labels!r}")
        labels = tuple(f"LABEL_{i}" for i in range(count))
    if token_bias is not None and architecture != "Starcoder2ForTokenClassification":
        raise ConfigError(f"{where}: token_classification_bias applies to Starcoder2ForTokenClassification only; "
                          f"this checkpoint is {architecture}")
    if token_bias is not None and not isinstance(token_bias, bool):
        raise ConfigError(f"{where}: token_classification_bias must be true or false, got {token_bias!r}")
    bias = architecture == "Starcoder2ForTokenClassification" and token_bias is not False
    return HeadConfig(architecture, labels, problem_type, bias)


def _preset(**kw: Any) -> Starcoder2Config:
    return Starcoder2Config(**kw)


PRESETS: dict[str, Starcoder2Config] = {
    # transformers' Starcoder2 tester shape, with a window short enough to cross in tests.
    "tiny": _preset(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    sliding_window=16, rope_theta=10000.0),
    # The 113M-parameter shape the benchmarks use (see issue 7).
    "bench-113m": _preset(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=4, rope_theta=1e5),
    "starcoder2-3b": _preset(hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                             num_attention_heads=24, num_key_value_heads=2,
                             rope_theta=999999.4420358813),
    "starcoder2-7b": _preset(hidden_size=4608, intermediate_size=18432, num_hidden_layers=32,
                             num_attention_heads=36, num_key_value_heads=4, rope_theta=1e6),
    "starcoder2-15b": _preset(hidden_size=6144, intermediate_size=24576, num_hidden_layers=40,
                              num_attention_heads=48, num_key_value_heads=4, rope_theta=1e5),
}


def preset(name: str) -> Starcoder2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** k:.2f} {units[k]}" if k else f"{int(n)} B"
