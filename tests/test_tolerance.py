"""The tolerance policy: one rule for every precision, and the bounds rule 5 derives hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starlift.core import tolerance
from starlift.core.errors import UsageError
from starlift.evaluation import metrics

NANO = tolerance.Shape(num_layers=6, width=1024)


def test_unknown_precision_is_an_error_not_fp32():
    for call in (lambda: tolerance.bound("int3", NANO, 10.0), lambda: tolerance.logit_checks("q4", NANO, 10.0),
                 lambda: tolerance.hidden_bound("fp8", NANO, 0, "mlp", 1.0)):
        with pytest.raises(UsageError, match="unknown precision"):
            call()
    with pytest.raises(UsageError, match="unknown comparison"):
        tolerance.logit_checks("fp32", NANO, 1.0, against="somewhere")


def test_bounds_follow_the_rounding_error_depth_and_scale():
    order = [tolerance.bound(p, NANO, 10.0) for p in ("fp32", "fp16", "bf16", "int4")]
    assert order == sorted(order)
    assert tolerance.bound("fp16", NANO, 20.0) == pytest.approx(2 * tolerance.bound("fp16", NANO, 10.0))
    deeper = tolerance.Shape(num_layers=24, width=1024)
    assert tolerance.bound("fp16", deeper, 10.0) > tolerance.bound("fp16", NANO, 10.0)
    wider = tolerance.Shape(num_layers=6, width=12288)  # fp32's accumulation term grows with the dot product
    assert tolerance.bound("fp32", wider, 10.0) > 2 * tolerance.bound("fp32", NANO, 10.0)
    depths = [tolerance.stream_depth(layer, block) for layer, block in
              [(-1, "embedding"), (0, "attention"), (0, "mlp"), (1, "attention"), (6, "head")]]
    assert depths == sorted(depths) and depths[0] == 1 and depths[-1] == NANO.logits_depth


@pytest.mark.parametrize("precision", tolerance.PRECISIONS)
def test_parity_bounds_contain_the_gate_bounds(precision):
    gate = tolerance.logit_checks(precision, NANO, 12.0, against="fp32-artifact")
    parity = tolerance.logit_checks(precision, NANO, 12.0, against="reference")
    for name, check in gate.items():
        looser = parity[name].bound >= check.bound if check.direction == "max" else parity[name].bound <= check.bound
        assert looser, name
    if precision == "fp32":
        assert tolerance.reference_allowance("fp32", NANO, 12.0) == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), delta=st.floats(1e-6, 0.05), spread=st.floats(0.1, 8.0))
def test_kl_allowance_and_tie_rule_hold(seed, delta, spread):
    """Rule 5 on random logits: R2 within delta of R1, any candidate C. KL(R2||C) stays under
    kl_allowance(KL(R1||C), 2 delta); every position where C's argmax is R1's counts as agreeing
    with R2 once ties within 2 delta are forgiven."""
    rng = np.random.default_rng(seed)
    r1 = rng.normal(0, spread, size=(16, 40))
    r2 = r1 + rng.uniform(-delta, delta, size=r1.shape)
    c = r1 + rng.normal(0, spread / 3, size=r1.shape)
    c[:4] = r1[:4]  # some rows agree exactly with R1
    gate = metrics.compare_logits(r1, c)
    parity = metrics.compare_logits(r2, c, tie=2 * delta)
    assert parity["mean_kl"] <= tolerance.kl_allowance(gate["mean_kl"], 2 * delta) + 1e-12
    agree1 = c.argmax(-1) == r1.argmax(-1)
    chosen = r2[np.arange(len(r2)), c.argmax(-1)]
    assert np.all(chosen[agree1] >= r2.max(-1)[agree1] - 2 * delta)
    assert parity["top1_agreement"] >= gate["top1_agreement"]


def test_max_abs_bound_implies_kl_and_top1():
    """Rule 3: within max-abs t, KL <= t^2/2 and top-1 agrees up to ties within 2t."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, size=(64, 50))
    t = 0.05
    cand = ref + rng.uniform(-t, t, size=ref.shape)
    values = metrics.compare_logits(ref, cand, tie=2 * t)
    assert values["max_abs_error"] <= t and values["mean_kl"] <= t * t / 2 and values["top1_agreement"] == 1.0
