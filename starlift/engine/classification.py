"""Classification above the classifier runners: texts in, labels and scores out.

``Classifier`` tokenizes, batches (right padding, filled with the pad token so that sequence
pooling picks the same token as for the text alone) and returns each text's logits.
``TextClassificationPipeline`` and ``TokenClassificationPipeline`` shape the results as
transformers' pipelines of the same names do (same keys, same defaults, same score functions),
so code written against transformers keeps working. They are plain callables: a server route can
wrap one as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starlift.core.errors import UsageError
from starlift.runtimes.classifiers import batched_logits

_UNSET = object()  # transformers tells "top_k not given" (legacy output shape) from top_k=None


@dataclass
class Item:
    """One text as the model saw it."""

    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[int]
    logits: np.ndarray | None = None  # (labels,) or (tokens, labels)




class Classifier:
    """Texts -> per-text logits on any classifier runner (see ``starlift.runtimes.classifiers``)."""

    def __init__(self, runner, tokenizer, batch_size: int = 8):
        if tokenizer is None:
            raise UsageError(f"{runner.folder} has no tokenizer.json; a classifier pipeline needs the checkpoint's "
                             "tokenizer (copy it into the checkpoint and re-export)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.runner = runner.activate()
        self.tokenizer = tokenizer
        self.info = runner.info
        self.batch_size = batch_size

    @property
    def task(self) -> str:
        return self.info.task

    def encode(self, text: str, truncation: bool = False) -> Item:
        if not isinstance(text, str):
            raise UsageError(f"a classifier takes str texts, got {type(text).__name__}")
        e = self.tokenizer.encode_with_offsets(text)
        if not e.ids:
            raise UsageError("an empty text has no tokens to classify")
        ids, tokens, offsets, special = e.ids, e.tokens, e.offsets, e.special
        if len(ids) > self.info.context:
            if not truncation:
                raise UsageError(f"the text has {len(ids)} tokens, more than the model's context of "
                                 f"{self.info.context}; shorten it or pass truncation=True (keeps the first "
                                 f"{self.info.context})")
            n = self.info.context
            ids, tokens, offsets, special = ids[:n], tokens[:n], offsets[:n], special[:n]
        return Item(text, ids, tokens, offsets, special)

    def run(self, items: list[Item]) -> list[Item]:
        """Fill each item's logits (see :func:`batched_logits`)."""
        for it, logits in zip(items, batched_logits(self.runner, [it.ids for it in items], self.batch_size),
                              strict=True):
            it.logits = logits
        return items

    def close(self) -> None:
        self.runner.deactivate()


# ---- score functions, as transformers' text-classification pipeline applies them -------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


FUNCTIONS = {"sigmoid": _sigmoid, "softmax": _softmax, "none": lambda x: x}


def default_function(problem_type: str | None, num_labels: int) -> str:
    """transformers' choice: none for regression, sigmoid for multi-label or one label, else softmax."""
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"


def _inputs(inputs) -> tuple[list[str], bool]:
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        return list(inputs), False
    if isinstance(inputs, dict) or (isinstance(inputs, (list, tuple)) and any(isinstance(t, dict) for t in inputs)):
        raise UsageError("text pairs ({'text', 'text_pair'}) are not supported: StarCoder2's tokenizer has no pair "
                         "template; join the two texts into one string")
    raise UsageError(f"the pipeline takes a str or a list of str, got {type(inputs).__name__}")


class TextClassificationPipeline:
    """``pipe(text)`` -> ``[{"label", "score"}]``, shaped as transformers' pipeline returns it:

    - ``pipe("a")`` -> ``[{"label": ..., "score": ...}]`` (the top label);
    - ``pipe(["a", "b"])`` -> one top-label dict per text;
    - ``top_k=k`` (``None``: every label) -> labels sorted by score, a list per text for a list input;
    - ``function_to_apply``: ``"softmax"``, ``"sigmoid"`` or ``"none"`` (default: from problem_type and
      the number of labels, as transformers picks it).
    """

    task = "text-classification"

    def __init__(self, classifier: Classifier, top_k=_UNSET, function_to_apply: str | None = None,
                 truncation: bool = False):
        if classifier.task != self.task:
            raise UsageError(f"{classifier.runner.folder} is a {classifier.task} model; use "
                             f"starlift.pipeline({classifier.task!r}, ...)")
        self.classifier = classifier
        self.defaults = {"top_k": top_k, "function_to_apply": function_to_apply, "truncation": truncation}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.info.labels

    def __call__(self, inputs, top_k=_UNSET, function_to_apply: str | None = None, truncation: bool | None = None):
        top_k = self.defaults["top_k"] if top_k is _UNSET else top_k
        function_to_apply = function_to_apply or self.defaults["function_to_apply"]
        truncation = self.defaults["truncation"] if truncation is None else truncation
        if top_k is not _UNSET and top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise UsageError(f"top_k must be a positive integer or None (every label), got {top_k!r}")
        info = self.classifier.info
        name = (function_to_apply or default_function(info.problem_type, info.num_labels)).lower()
        if name not in FUNCTIONS:
            raise UsageError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function_to_apply!r}")
        texts, single = _inputs(inputs)
        items = self.classifier.run([self.classifier.encode(t, truncation) for t in texts])
        legacy = top_k is _UNSET
        results = [self._postprocess(FUNCTIONS[name](it.logits), top_k, legacy) for it in items]
        if single:
            return [results[0]] if legacy else results[0]
        return results

    def _postprocess(self, scores: np.ndarray, top_k, legacy: bool):
        labels = self.labels
        if legacy:  # transformers' default: the top label alone
            best = int(scores.argmax())
            return {"label": labels[best], "score": float(scores[best])}
        ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(scores)),
                        key=lambda d: d["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]


AGGREGATIONS = ("none", "simple")


class TokenClassificationPipeline:
    """``pipe(text)`` -> one dict per token whose label is not ignored, as transformers returns it:
    ``entity``, ``score`` (softmax), ``index`` (token position), ``word`` (the token's string),
    ``start``/``end`` (characters in the text). ``aggregation_strategy="simple"`` groups adjacent
    tokens of the same entity (B-/I- tags) into ``entity_group``, ``score`` (mean), ``word``,
    ``start``, ``end``. ``ignore_labels`` defaults to ``["O"]``.
    """

    task = "token-classification"

    def __init__(self, classifier: Classifier, aggregation_strategy: str = "none",
                 ignore_labels: list[str] | None = None, truncation: bool = False):
        if classifier.task != self.task:
            raise UsageError(f"{classifier.runner.folder} is a {classifier.task} model; use "
                             f"starlift.pipeline({classifier.task!r}, ...)")
        self.classifier = classifier
        self.defaults = {"aggregation_strategy": aggregation_strategy, "ignore_labels": ignore_labels,
                         "truncation": truncation}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.classifier.info.labels

    def __call__(self, inputs, aggregation_strategy: str | None = None, ignore_labels: list[str] | None = None,
                 truncation: bool | None = None):
        strategy = str(aggregation_strategy or self.defaults["aggregation_strategy"]).lower()
        if strategy not in AGGREGATIONS:
            raise UsageError(f"aggregation_strategy {strategy!r} is not supported; starlift implements "
                             f"{', '.join(AGGREGATIONS)} (first/average/max need word boundaries)")
        ignore = ignore_labels if ignore_labels is not None else self.defaults["ignore_labels"]
        ignore = ["O"] if ignore is None else list(ignore)
        truncation = self.defaults["truncation"] if truncation is None else truncation
        texts, single = _inputs(inputs)
        items = self.classifier.run([self.classifier.encode(t, truncation) for t in texts])
        results = [self._entities(it, strategy, ignore) for it in items]
        return results[0] if single else results

    def _entities(self, item: Item, strategy: str, ignore: list[str]) -> list[dict]:
        labels = self.labels
        scores = _softmax(item.logits)
        unk = self.classifier.tokenizer.unk_token_id
        entities = []
        for index, token_scores in enumerate(scores):
            if item.special[index]:
                continue
            start, end = item.offsets[index]
            word = item.text[start:end] if item.ids[index] == unk else item.tokens[index]
            best = int(token_scores.argmax())
            entities.append({"entity": labels[best], "score": float(token_scores[best]), "index": index,
                             "word": word, "start": start, "end": end})
        if strategy == "simple":
            entities = self._group(entities)
        return [e for e in entities if e.get("entity") not in ignore and e.get("entity_group") not in ignore]

    def _group(self, entities: list[dict]) -> list[dict]:
        """Adjacent tokens with the same tag (a B- tag starts a new group), as transformers groups them."""

        def tag(label: str) -> tuple[str, str]:
            if label.startswith(("B-", "I-")):
                return label[0], label[2:]
            return "I", label

        groups: list[list[dict]] = []
        for entity in entities:
            bi, name = tag(entity["entity"])
            if groups and name == tag(groups[-1][-1]["entity"])[1] and bi != "B":
                groups[-1].append(entity)
            else:
                groups.append([entity])
        to_string = self.classifier.tokenizer.tokens_to_string
        return [{"entity_group": g[0]["entity"].split("-", 1)[-1],
                 "score": float(np.mean([e["score"] for e in g])),
                 "word": to_string([e["word"] for e in g]),
                 "start": g[0]["start"], "end": g[-1]["end"]} for g in groups]
