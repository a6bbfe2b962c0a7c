"""Prompt-lookup speculative decoding: greedy output equals plain decoding, sampling keeps the
target distribution.

The tiny checkpoint and character tokenizer of test_engine run on ONNX Runtime (ort flavour:
the slot pool, one call for one row, a one-token step then a row's own call for several rows;
portable: the concat batch, every row's drafts in one right-padded call) and OpenVINO. The
trained starcoder2-nano, whose code text repeats, accepts long drafts, so stop strings, stop
tokens and max tokens fall inside accepted drafts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starlift.core.errors import UsageError
from starlift.engine import Engine, SamplingParams
from starlift.engine.speculative import MAX_PAUSE, PromptLookup, schedule
from starlift.model.tokenizer import Tokenizer
from starlift.runtimes import create_runner

BACKENDS = [("onnxruntime", "ort", "slots"), ("onnxruntime", "portable", "concat"), ("openvino", "portable", "concat")]
SPEC = {"speculative": "prompt-lookup", "draft_tokens": 5}


@pytest.fixture(scope="module")
def checkpoint(engine_artifacts):
    return engine_artifacts / "ckpt"


@pytest.fixture(scope="module")
def artifacts(engine_artifacts):
    return engine_artifacts  # test_engine's exports (conftest), read-only


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_file(checkpoint / "tokenizer.json")


def repetitive_prompt(seed: int) -> list[int]:
    """A random motif repeated with noise between the copies: n-gram matches, and mismatches."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(5, 99, size=int(rng.integers(4, 12))).tolist()
    out = []
    for _ in range(int(rng.integers(2, 6))):
        out += motif + rng.integers(5, 99, size=int(rng.integers(0, 3))).tolist()
    return out


def run(runner, tokenizer, cases, eos, max_batch):
    """(token_ids, text, finish_reason) of each case, all submitted at once, and the engine's stats."""
    with Engine(runner, tokenizer, eos_token_id=eos, max_batch=max_batch) as engine:
        handles = [engine.submit(p, params, **kw) for p, params, kw in cases]
        out = [(h.wait().token_ids, h.text, h.finish_reason) for h in handles]
        return out, engine.stats(), handles


@pytest.mark.parametrize("backend,flavour,kind", BACKENDS, ids=[f"{b}-{f}" for b, f, _ in BACKENDS])
def test_greedy_speculative_equals_plain(backend, flavour, kind, artifacts, tokenizer):
    """Speculating requests alone and in a batch beside plain ones give plain decoding's output,
    with EOS, a stop token, a stop string and max tokens ending them."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is a test extra")
    runner = create_runner(backend, artifacts / flavour).activate()
    try:
        prompts = [repetitive_prompt(s) for s in range(8)]
        free, _, _ = run(runner, tokenizer, [(p, SamplingParams(max_new_tokens=40, ignore_eos=True), {})
                                             for p in prompts], None, 8)
        counts = np.bincount([t for ids, _, _ in free for t in ids], minlength=99)
        eos = int(counts.argmax())
        cases = []
        for i, (ids, text, _) in enumerate(free):
            kw, params = {}, dict(max_new_tokens=40, ignore_eos=True)
            if i % 4 == 0:
                params = dict(max_new_tokens=40)  # EOS ends it
            elif i % 4 == 1:
                kw["stop_token_ids"] = [ids[9]]
            elif i % 4 == 2:
                kw["stop"] = ["never there", text[11:13]]
            else:
                params["max_new_tokens"] = {3: 2, 7: 13}[i]
            cases.append((prompts[i], params, kw))
        plain, _, _ = run(runner, tokenizer, [(p, SamplingParams(**params), kw) for p, params, kw in cases], eos, 1)
        assert {r for _, _, r in plain} == {"stop", "length"}
        spec_cases = [(p, SamplingParams(**params, **SPEC), kw) for p, params, kw in cases]
        alone, stats, _ = run(runner, tokenizer, spec_cases, eos, 1)
        assert alone == plain
        assert stats["cache"] == kind
        assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]  # drafts were kept, and rejected
        # a batch of 4 rows, every other request plain
        mixed = [(p, SamplingParams(**params, **(SPEC if i % 2 else {})), kw)
                 for i, (p, params, kw) in enumerate(cases)]
        batched, stats, handles = run(runner, tokenizer, mixed, eos, 4)
        assert batched == plain
        assert stats["draft_tokens"] > 0
        assert all(h.draft_tokens == 0 for h in handles[::2])
        # and every request speculating in the batch (the concat batch: drafts of different lengths)
        batched, stats, _ = run(runner, tokenizer, spec_cases, eos, 4)
        assert batched == plain
        assert stats["accepted_tokens"] > 0
        rates = [h.acceptance_rate for h in handles[1::2] if h.draft_tokens]
        assert rates and all(0 <= r <= 1 for r in rates)
    finally:
        runner.deactivate()


def test_nano_copies_in_long_drafts(nano_ort):
    """starcoder2-nano on repetitive code accepts drafts (and rejects some); stop strings, stop
    tokens and max tokens end it exactly where plain decoding ends; so does the CLI's flag."""
    import starlift

    code = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "class Calculator:\n    def __init__(self, value=0):\n        self.value = value\n\n"
            "    def add(self, x):\n        self.value = add(self.value, x)\n        return self\n\n")
    prompt = code + "<file_sep>\n" + code[:40]
    with starlift.load(nano_ort, max_batch=2) as gen:
        tok = gen.tokenizer
        free = gen.generate(prompt, max_new_tokens=60, ignore_eos=True)
        stop_id = tok.encode(free)[20]
        for kw in (dict(max_new_tokens=60, ignore_eos=True), dict(max_new_tokens=60, stop=[free[30:34]]),
                   dict(max_new_tokens=17, ignore_eos=True)):
            assert gen.generate(prompt, speculative="prompt-lookup", draft_tokens=8, **kw) == \
                gen.generate(prompt, **kw)
        ids = tok.encode(prompt)
        engine = gen.engine
        plain = engine.submit(ids, SamplingParams(max_new_tokens=60), stop_token_ids=[stop_id]).wait()
        spec = engine.submit(ids, SamplingParams(max_new_tokens=60, **SPEC), stop_token_ids=[stop_id]).wait()
        assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, "stop")
        steps = engine.stats()["steps"]
        fast = engine.submit(ids, SamplingParams(max_new_tokens=60, ignore_eos=True, **SPEC)).wait()
        assert 0 < fast.accepted_tokens < fast.draft_tokens
        # 59 decoded tokens: one model call fewer per accepted draft token (the last step adds no
        # token of the model's own when max tokens ends it inside the draft)
        assert 59 - fast.accepted_tokens <= engine.stats()["steps"] - steps <= 60 - fast.accepted_tokens
        assert engine.stats()["acceptance_rate"] > 0
        expected = gen.generate(prompt, max_new_tokens=24)
    exe = Path(sys.executable).with_name("starlift")
    proc = subprocess.run([str(exe), "generate", str(nano_ort), "--prompt", prompt, "--max-new-tokens", "24",
                           "--speculative", "prompt-lookup", "--draft-tokens", "6"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_schedule_waits_longer_while_drafts_fail_at_their_first_token():
    """After a draft rejected at its first token the row decodes plain for 1, 2, 4 ... MAX_PAUSE
    steps; any accepted token ends the wait; the length follows +2 on a full accept, -1 else."""
    length, backoff, pauses = 8, 1, []
    for _ in range(8):
        length, pause, backoff = schedule(length, backoff, 0, length, 8)
        pauses.append(pause)
    assert pauses == [1, 2, 4, 8, 16, 32, 32, 32] and MAX_PAUSE == 32 and length == 1
    assert schedule(1, backoff, 1, 3, 8) == (1, 0, 1)  # a kept token: no wait, the wait resets
    assert schedule(3, 16, 3, 3, 8) == (5, 0, 1) and schedule(7, 1, 7, 7, 8) == (8, 0, 1)


def test_speculative_sampling_keeps_the_distribution(artifacts, tokenizer):
    """The second token (the first one a draft is verified for) drawn over many seeds follows
    the model's own distribution, computed exactly by teacher forcing: a chi-square test that a
    rule accepting every draft fails. The prompt holds "a b" early, where a is the likeliest
    first token and b the likeliest after it, so the draft after a is often accepted, and the
    rejections draw from the residual."""
    runner = create_runner("onnxruntime", artifacts / "ort").activate()
    try:
        temperature, n, vocab = 0.8, 1500, 99
        prompt = np.random.default_rng(3).integers(5, vocab, size=40).tolist()
        for _ in range(3):  # a prompt whose draft after its likeliest first token is the likeliest token
            logits = _every_next(runner, prompt)
            a = int(logits[0, -2].argmax())
            b = int(logits[a, -1].argmax())
            prompt = [t if t != a else 5 + (t - 4) % (vocab - 5) for t in prompt]
            prompt[5:7] = [a, b]
        logits = _every_next(runner, prompt)  # row x: prompt + [x]
        p1 = _softmax(logits[0, -2] / temperature)
        cond = _softmax(logits[:, -1] / temperature)
        p2 = p1 @ cond  # the exact target of the second token
        with Engine(runner, tokenizer, eos_token_id=None, max_batch=8, max_queue=n) as engine:
            handles = [engine.submit(prompt, SamplingParams(max_new_tokens=2, temperature=temperature, seed=s,
                                                            ignore_eos=True, **SPEC)) for s in range(n)]
            seconds = [h.wait().token_ids[1] for h in handles]
            stats = engine.stats()
        assert 0.05 * n < stats["accepted_tokens"] < stats["draft_tokens"]  # accepted, and resampled
        observed = np.bincount(seconds, minlength=vocab)
        always = np.zeros(vocab)  # a broken rule: every draft accepted
        for x in range(vocab):
            draft = PromptLookup(prompt + [x]).draft(1)
            if draft:
                always[draft[0]] += p1[x]
            else:
                always += p1[x] * cond[x]
        threshold = _chi2_threshold(p2, n)
        assert _chi2(observed, p2, n) < threshold
        assert _chi2(always * n, p2, n) > 3 * threshold  # the test tells the broken rule apart
    finally:
        runner.deactivate()


def _every_next(runner, prompt):
    """Logits of prompt + [x] for every token x, teacher-forced in one batch: (vocab, len + 1, V)."""
    vocab = runner.meta.vocab_size
    ids = np.array([prompt + [x] for x in range(vocab)], np.int64)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return runner.single_batch(vocab).forward(ids, np.ones_like(ids), positions)


def test_params_and_generator_flags(artifacts, tokenizer):
    for bad in (dict(speculative="medusa"), dict(speculative="prompt-lookup", draft_tokens=0),
                dict(draft_tokens=True)):
        with pytest.raises(UsageError):
            SamplingParams(**bad)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _chi2(observed, expected_p, n) -> float:
    """Pearson's statistic over cells with an expected count of at least 5 (the rest pooled)."""
    expected = expected_p * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


def _chi2_threshold(expected_p, n) -> float:
    """The 99.9% quantile of chi-square with the pooled cells' degrees of freedom (Wilson-Hilferty)."""
    dof = int((expected_p * n >= 5).sum())  # cells + the pooled one - 1
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
