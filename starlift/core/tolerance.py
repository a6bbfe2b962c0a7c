"""The one tolerance policy: how far an artifact's numbers may be from the reference's.

Export validation (``export/validate.py``), the quantize gates (``quantize/quantizer.py``),
``starlift parity`` and localization (``starlift.evaluation``) all ask this module; none keeps a
table of its own. The rule (docs/reference/tolerances.md explains it with the measurements):

1. Every precision has a relative rounding error ``eps``: ``2**-p`` for a float format with a
   ``p``-bit significand (fp32 24, fp16 11, bf16 8), and ``1 / (2**b - 1)`` for a ``b``-bit
   block-quantized weight (int8, int4): half a step of the grid, relative to the block's
   largest weight. ``starlift quantize``'s default compute (MatMulNBits accuracy level 4) also
   rounds each block of activations to an 8-bit grid, and the relative errors of a product's
   factors add: a quantized precision's ``eps`` is its weight grid's plus ``1 / 255``. Every CPU kernel accumulates in float32, whose rounding over a dot product
   of length ``n`` grows like ``sqrt(n) * 2**-24`` (Higham & Mary's probabilistic bound), with
   ``n`` the model's longest dot product (hidden or intermediate size)::

       eps_eff = eps + sqrt(n) * 2**-24

2. Errors of independent sub-blocks add in quadrature, so after ``d`` sub-blocks of the
   residual stream (the embedding counts 1, each attention and each MLP 1, the final norm and
   head 1) a tensor whose largest reference value is ``scale`` may be off by::

       tolerance = C * eps_eff * sqrt(d) * scale          C = 8 (SAFETY)

   The logits pass ``2 * layers + 2`` sub-blocks. This bound is the max-abs check for every
   precision, and the hidden-state check of localization.

3. What follows from a max-abs bound ``t`` is not checked separately but derived: the mean
   KL divergence is at most ``t**2 / 2`` (Hoeffding's lemma on a logit shift of range ``2t``)
   and the candidate's top-1 token is the reference's up to ties within ``2t``.

4. Quantized weights (int8, int4) are a deliberate change of the model, not a rounding error
   of its implementation: their max-abs bound (rule 2) only catches broken graphs. What their
   gate asks for is a quality requirement against float32, the same everywhere: top-1
   agreement at least ``TOP1_MIN`` and mean KL at most ``KL_MAX`` (issue 5's numbers).

5. Against what: the quantize gate compares with the fp32 artifact, ``starlift parity`` with
   the PyTorch reference. The fp32 artifact differs from the reference by at most the fp32
   bound ``delta`` (export validation checks it), so parity's bounds are the gate's widened by
   that difference, ``a = 2 * delta`` (``reference_allowance``): max-abs ``t + a``; top-1 ties
   within ``2 * a`` are not counted as disagreements; KL by ``kl_allowance``. So an artifact
   that passed its gate passes ``starlift parity`` on the same text with the defaults.

An unknown precision is an error, never fp32's bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError

UNIT_ROUNDOFF_FP32 = 2.0 ** -24
# MatMulNBits at accuracy level 4 (int8 compute, the quantize default) rounds activation blocks to 8 bits
ACTIVATION_EPS_INT8 = 1.0 / (2 ** 8 - 1)
# relative rounding error of each precision (rule 1)
EPS = {
    "fp32": 2.0 ** -24,
    "fp16": 2.0 ** -11,
    "bf16": 2.0 ** -8,
    "int8": 1.0 / (2 ** 8 - 1) + ACTIVATION_EPS_INT8,
    "int4": 1.0 / (2 ** 4 - 1) + ACTIVATION_EPS_INT8,
}
PRECISIONS = tuple(EPS)
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
SAFETY = 8.0
# rule 4: quality requirements of quantized weights against float32 (issue 5)
TOP1_MIN = {"int8": 0.98, "int4": 0.93}
KL_MAX = {"int8": 0.05, "int4": 0.2}
AGAINST = ("reference", "fp32-artifact", "same-dtype")


def check_precision(precision: str) -> str:
    if precision not in EPS:
        raise UsageError(f"unknown precision {precision!r}: the tolerance policy knows {', '.join(PRECISIONS)} "
                         "(pass --precision with one of them, or fix the artifact's manifest)")
    return precision


@dataclass(frozen=True)
class Shape:
    """What the bound depends on besides the precision: depth and the longest dot product."""

    num_layers: int
    width: int  # max(hidden_size, intermediate_size)

    @classmethod
    def of(cls, config) -> Shape:
        """From a ``Starcoder2Config`` or a config.json dict."""
        get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
        return cls(int(get("num_hidden_layers")), int(max(get("hidden_size"), get("intermediate_size"))))

    @property
    def logits_depth(self) -> int:
        return 2 * self.num_layers + 2


def eps_eff(precision: str, shape: Shape) -> float:
    return EPS[check_precision(precision)] + math.sqrt(shape.width) * UNIT_ROUNDOFF_FP32


def bound(precision: str, shape: Shape, scale: float, depth: int | None = None) -> float:
    """Rule 2: max |error| allowed for a tensor ``depth`` sub-blocks deep (the logits when None)
    whose largest reference value is ``scale``."""
    depth = shape.logits_depth if depth is None else depth
    return SAFETY * eps_eff(precision, shape) * math.sqrt(max(depth, 1)) * max(float(scale), 0.0)


def stream_depth(layer: int, block: str) -> int:
    """Sub-blocks passed at a point of the residual stream (``starlift.core.tensor_map``)."""
    if block == "embedding":
        return 1
    if block == "attention":
        return 2 * layer + 2
    if block == "mlp":
        return 2 * layer + 3
    if block == "head":
        return 2 * layer + 2  # layer == num_layers for the head
    raise UsageError(f"unknown residual-stream block {block!r}")


def hidden_bound(precision: str, shape: Shape, layer: int, block: str, scale: float) -> float:
    """Localization: max |error| of a residual-stream tensor against the reference."""
    return bound(precision, shape, scale, stream_depth(layer, block))


def kl_allowance(kl: float, logprob_shift: float) -> float:
    """Largest KL(p2 || q) given KL(p1 || q) = ``kl`` and |log p1 - log p2| <= ``logprob_shift``
    elementwise: ``e**s * kl + (e**s - e**-s) + s`` (split KL's terms by sign; log x <= x - 1)."""
    s = logprob_shift
    return math.exp(s) * kl + (math.exp(s) - math.exp(-s)) + s


@dataclass(frozen=True)
class Check:
    direction: str  # "max": value <= bound; "min": value >= bound
    bound: float

    def passes(self, value: float) -> bool:
        return value <= self.bound if self.direction == "max" else value >= self.bound


def logit_checks(precision: str, shape: Shape, scale: float, against: str = "reference",
                 reference_precision: str = "fp32") -> dict[str, Check]:
    """The checks on teacher-forced logits of an artifact of ``precision``.

    ``scale``: the largest |logit| of the reference over the compared positions. ``against``:
    ``same-dtype`` (export validation: the PyTorch model in the artifact's dtype),
    ``fp32-artifact`` (the quantize gate) or ``reference`` (parity: PyTorch in float32).
    Returns check name -> Check; ``top1_tie`` is the margin within which the reference's own
    top two are a tie (used when counting top-1 agreement, not a check). ``reference_precision``:
    the dtype the PyTorch reference ran in, when ``against`` is ``reference`` (fp32 unless a
    big checkpoint's reference must fit: ``starlift parity --reference-dtype``)."""
    check_precision(precision)
    if against not in AGAINST:
        raise UsageError(f"unknown comparison {against!r}; one of {', '.join(AGAINST)}")
    t = bound(precision, shape, scale)
    allowance = reference_allowance(precision, shape, scale, reference_precision) if against == "reference" else 0.0
    max_abs = t + allowance
    checks = {"max_abs_error": Check("max", max_abs), "cache_consistency": Check("max", t)}
    if precision in FLOAT_PRECISIONS:
        checks["mean_kl"] = Check("max", max_abs ** 2 / 2)
        checks["top1_agreement"] = Check("min", 1.0)
        checks["top1_tie"] = Check("max", 2 * max_abs)
    else:
        checks["mean_kl"] = Check("max", kl_allowance(KL_MAX[precision], 2 * allowance))
        checks["top1_agreement"] = Check("min", TOP1_MIN[precision])
        checks["top1_tie"] = Check("max", 2 * allowance)
    return checks


def reference_allowance(precision: str, shape: Shape, scale: float, reference: str = "fp32") -> float:
    """Rule 5: how far the fp32 artifact (what the gate compared with) may be from the PyTorch
    reference (what parity compares with): the fp32 bound, twice (the second covers the two
    comparisons' slightly different logit scales). Nothing for an fp32 artifact, which is
    compared with the reference directly in both places.

    A reference run in a lower precision (``reference``: fp16 or bf16, for checkpoints whose fp32
    reference does not fit) is itself off the fp32 reference by up to its own bound: that adds."""
    base = 0.0 if precision == "fp32" else 2 * bound("fp32", shape, scale)
    if check_precision(reference) != "fp32":
        base += bound(reference, shape, scale)
    return base
