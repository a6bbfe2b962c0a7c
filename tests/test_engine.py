"""The engine: continuous batching equals running alone, on every backend's cache.

A tiny checkpoint (window 16, context 2048) with a character-level tokenizer made by the
``tokenizers`` library (so stop strings, UTF-8-safe text and FIM's <file_sep> are real) runs
on ONNX Runtime (ort flavour: the slot pool; portable: the concat batch), OpenVINO and torch.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time

import numpy as np
import pytest

from starlift.core.errors import QueueFullError, UsageError
from starlift.engine import Engine, SamplingParams
from starlift.model.tokenizer import Tokenizer
from starlift.runtimes import create_runner

SPECIAL = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<file_sep>"]
CHARS = [chr(c) for c in range(32, 127) if chr(c) not in "`~"] + ["\n"]  # 94 + 5 specials = vocab 99
CONTEXT = 2048

# (name, backend, artifact flavour or None for the checkpoint, the cache kind it must get)
BACKENDS = [
    ("onnxruntime-ort", "onnxruntime", "ort", "slots"),
    ("onnxruntime-portable", "onnxruntime", "portable", "concat"),
    ("openvino-portable", "openvino", "portable", "concat"),
    ("torch", "torch", None, "concat"),
]


def write_char_tokenizer(path) -> None:
    """A character-level tokenizer.json (one token per character, StarCoder2's special tokens)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.save(str(path))


@pytest.fixture(scope="module")
def checkpoint(engine_artifacts):
    return engine_artifacts / "ckpt"


@pytest.fixture(scope="module")
def artifacts(engine_artifacts):
    return engine_artifacts  # ort/ and portable/ (conftest: shared with test_speculative)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_file(checkpoint / "tokenizer.json")


@pytest.fixture(scope="module", params=BACKENDS, ids=[b[0] for b in BACKENDS])
def runner(request, checkpoint, artifacts):
    _, backend, flavour, kind = request.param
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is a test extra")
    r = create_runner(backend, checkpoint if flavour is None else artifacts / flavour).activate()
    r.expected_kind = kind
    yield r
    r.deactivate()


@pytest.fixture(scope="module")
def ort_runner(artifacts):
    r = create_runner("onnxruntime", artifacts / "ort").activate()
    yield r
    r.deactivate()


def prompt_of(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 99, size=length).tolist()  # no special tokens


def alone(runner, tokenizer, prompt, params, eos=0, **kw):
    """The reference: the request by itself on an engine of one row."""
    with Engine(runner, tokenizer, eos_token_id=eos, max_batch=1) as engine:
        h = engine.submit(prompt, params, **kw).wait()
        return h.token_ids, h.text, h.finish_reason


def held_slots(engine) -> int:
    cache = engine._cache
    return len(getattr(cache, "_slot", {})) + len(getattr(cache, "_pending", {})) + len(cache.rows)


# ---- greedy in a batch equals alone -------------------------------------------------------------
def test_greedy_batch_equals_alone(runner, tokenizer):
    """Prompts of 1 to 1,500 tokens (window 16) arriving at random steps into 4 rows, with early
    finishes by EOS, a stop token, a stop string and max tokens: every output equals the
    request alone."""
    rng = random.Random(1)
    lengths = [1, 1500, 2, 17, 40, 5, 300, 16, 9, 64]
    prompts = [prompt_of(n, seed=i) for i, n in enumerate(lengths)]
    free = [alone(runner, tokenizer, p, SamplingParams(max_new_tokens=30, ignore_eos=True), eos=None)
            for p in prompts]
    counts = np.bincount([t for ids, _, _ in free for t in ids], minlength=99)
    eos = int(counts.argmax())  # the token greedy decoding makes most often ends requests that do not ignore EOS
    cases = []
    for i, (ids, text, _) in enumerate(free):
        assert len(set(ids)) > 3  # greedy text that does not collapse to one token
        kw, params = {}, SamplingParams(max_new_tokens=30, ignore_eos=True)
        if i % 4 == 0:
            params = SamplingParams(max_new_tokens=30)
        elif i % 4 == 1:
            kw["stop_token_ids"] = [ids[6]]
        elif i % 4 == 2:
            kw["stop"] = ["never there", text[7:9]]
        else:
            params = SamplingParams(max_new_tokens=rng.choice([1, 7]), ignore_eos=True)
        cases.append((prompts[i], params, kw))
    expected = [alone(runner, tokenizer, p, params, eos=eos, **kw) for p, params, kw in cases]
    assert {r for _, _, r in expected} == {"stop", "length"}
    assert all(len(ids) < 30 for ids, _, _ in expected[1::4] + expected[2::4])  # the stops did cut
    with Engine(runner, tokenizer, eos_token_id=eos, max_batch=4, prefill_chunk=64) as engine:
        assert engine._cache.kind == runner.expected_kind
        arrivals = sorted(rng.randrange(0, 60) for _ in cases)
        handles = []
        for (p, params, kw), step in zip(cases, arrivals, strict=True):
            while engine.stats()["steps"] < step and engine.stats()["active"]:
                time.sleep(0.0005)
            handles.append(engine.submit(p, params, **kw))
        got = [(h.wait().token_ids, h.text, h.finish_reason) for h in handles]
        assert held_slots(engine) == 0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"request {i} (prompt {lengths[i]} tokens) differs in the batch"


def test_prefill_budget_feeds_a_burst_in_one_iteration(ort_runner, tokenizer):
    """prefill_budget: a burst of short prompts is prefilled in the first iteration (each request
    at most prefill_chunk tokens of it), without decode steps between; the default feeds one
    request's chunk per iteration. Greedy output equals each request alone either way."""
    prompts = [prompt_of(n, seed=20 + i) for i, n in enumerate((10, 12, 9, 30))]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = [alone(ort_runner, tokenizer, p, params)[0] for p in prompts]
    firsts = {}
    for budget in (None, 64):
        with Engine(ort_runner, tokenizer, eos_token_id=0, max_batch=4, prefill_chunk=16, prefill_budget=budget,
                    trace=True) as engine:
            engine.start()
            with engine._cond:  # the loop takes the whole burst in its first hand-over
                handles = [engine.submit(p, params) for p in prompts]
            assert [h.wait().token_ids for h in handles] == expected
            firsts[budget] = engine.trace[0], engine.stats()["prefill_chunks"]
    # trace: (start, end, decoded rows, prefill tokens, prefill calls, runtime seconds)
    assert firsts[None][0][2:5] == (0, 16, 2)  # the default: 16 tokens, the second prompt's first 6
    assert firsts[64][0][2:5] == (0, 10 + 12 + 9 + 16, 4)
    assert firsts[64][1] == 5  # the 30-token prompt still goes in chunks of at most 16: 1 + 1 + 1 + 2
    with pytest.raises(UsageError, match="prefill_budget"):
        Engine(ort_runner, max_batch=2, prefill_budget=0)


def test_events_text_and_logprobs(ort_runner, tokenizer):
    """Events join to the final text; a stop string is never emitted; logprobs are the raw
    logits' log_softmax, the same as a teacher-forced pass."""
    prompt = prompt_of(30, seed=3)
    with Engine(ort_runner, tokenizer, eos_token_id=None) as engine:
        full = engine.submit(prompt, SamplingParams(max_new_tokens=24), logprobs=3).wait()
        events = list(engine.submit(prompt, SamplingParams(max_new_tokens=24), logprobs=3))
        stop = full.text[10:13]
        cut = engine.submit(prompt, SamplingParams(max_new_tokens=24), stop=[stop])
        pieces = [e.text for e in cut]
    assert "".join(e.text for e in events) == full.text and len(events) == 24
    assert [e.index for e in events] == list(range(24)) and events[-1].finish_reason == "length"
    assert all(a.time <= b.time for a, b in zip(events, events[1:], strict=False))
    assert "".join(pieces) == cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    single = ort_runner.single_batch(1)
    seq = np.array([prompt + [e.token_id for e in events]])
    logits = single.forward(seq, np.ones_like(seq), np.arange(seq.shape[1])[None])[0, len(prompt) - 1:-1]
    top = logits.max(-1, keepdims=True)
    lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    for e, row in zip(events, lp, strict=True):
        assert abs(e.logprob - row[e.token_id]) < 1e-4
        assert [t for t, _ in e.top_logprobs] == list(np.argsort(-row)[:3])
        assert e.top_logprobs[0][0] == e.token_id  # greedy picks the most likely


def test_seeded_sample_independent_of_the_batch(runner, tokenizer):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = prompt_of(23, seed=7)
    expected = alone(runner, tokenizer, prompt, params)[0]
    with Engine(runner, tokenizer, eos_token_id=0, max_batch=4) as engine:
        others = [engine.submit(prompt_of(n, seed=n), SamplingParams(max_new_tokens=25, temperature=0.7, seed=n))
                  for n in (3, 50, 11)]
        mine = engine.submit(prompt, params)
        more = engine.submit(prompt_of(8, 9), SamplingParams(max_new_tokens=5, temperature=1.3, seed=2))
        got = mine.wait().token_ids
        for h in [*others, more]:
            h.wait()
    assert got == expected
    other_seed = alone(runner, tokenizer, prompt, SamplingParams(**{**params.__dict__, "seed": 99}))[0]
    assert other_seed != expected  # sampling really samples


def test_artifact_without_per_row_lengths_runs_on_the_concat_batch(artifacts, ort_runner, tokenizer, tmp_path):
    """An ort artifact exported before GQA read per-row lengths (no metadata key) still serves
    every request, through the concat batch, with the same greedy tokens as the slot pool."""
    import shutil

    import onnx

    from starlift.core.artifact import PER_ROW_LENGTHS_KEY
    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    old = tmp_path / "old"
    shutil.copytree(artifacts / "ort", old)
    model = onnx.load(str(old / "model.onnx"), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != PER_ROW_LENGTHS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(old / "model.onnx"))
    with pytest.raises(UsageError, match="re-export"):
        OnnxRuntimeRunner(old / "model.onnx", kv_buffer="shared").activate()
    runner = create_runner("onnxruntime", old).activate()
    prompts = [prompt_of(n, seed=n) for n in (3, 40, 19)]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outputs = []
    for r in (runner, ort_runner):
        with Engine(r, tokenizer, eos_token_id=0, max_batch=3) as engine:
            outputs.append([h.wait().token_ids for h in [engine.submit(p, params) for p in prompts]])
            outputs[-1].append(engine._cache.kind)
    runner.deactivate()
    assert outputs[0][-1] == "concat" and outputs[1][-1] == "slots"
    assert outputs[0][:-1] == outputs[1][:-1]


# ---- cancel, abandon, churn ----------------------------------------------------------------------
def test_cancel_frees_the_row_within_one_step(ort_runner, tokenizer):
    params = SamplingParams(max_new_tokens=400, ignore_eos=True)
    keep_prompt = prompt_of(12, seed=1)
    expected = alone(ort_runner, tokenizer, keep_prompt, SamplingParams(max_new_tokens=60, ignore_eos=True))[0]
    with Engine(ort_runner, tokenizer, eos_token_id=0, max_batch=2) as engine:
        keep = engine.submit(keep_prompt, SamplingParams(max_new_tokens=60, ignore_eos=True))
        victim = engine.submit(prompt_of(20, seed=2), params)
        for _ in range(5):
            next(victim)
        cancelled_at = time.perf_counter()
        victim.cancel()
        rest = list(victim)  # events queued before the cancel, at most one made after it, then the end
        ended = time.perf_counter()
        assert victim.finish_reason == "cancelled" and victim.completion_tokens < 400
        assert sum(e.time > cancelled_at for e in rest) <= 1  # its row made at most one more token
        assert ended - cancelled_at < 1.0
        assert engine.stats()["active"] == 1  # only `keep` holds a row
        waiting = engine.submit(prompt_of(5, seed=3), params)  # gets the freed row
        while waiting.completion_tokens < 3:
            time.sleep(0.001)
        waiting.close()
        # a stream the caller abandons (no reference left) is cancelled by garbage collection
        abandoned = engine.submit(prompt_of(7, seed=4), params)
        next(abandoned)
        del abandoned
        gc.collect()
        assert keep.wait().token_ids == expected
        deadline = time.perf_counter() + 5
        while held_slots(engine) and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert held_slots(engine) == 0
        assert engine.stats()["finished"]["cancelled"] == 3


def test_generator_stream_closed_early_frees_its_row(artifacts):
    import starlift

    gen = starlift.load(artifacts / "ort", max_batch=2)
    try:
        stream = gen.stream("def f(x):", max_new_tokens=300, ignore_eos=True)
        next(stream)
        stream.close()
        deadline = time.perf_counter() + 5
        while gen.engine.stats()["active"] and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert gen.engine.stats()["active"] == 0 and gen.engine.stats()["finished"]["cancelled"] == 1
    finally:
        gen.close()


@pytest.mark.parametrize("flavour,cycles", [("ort", 1000), ("portable", 400)])
def test_submit_cancel_churn_leaves_nothing_held(artifacts, tokenizer, flavour, cycles):
    """1,000 random submit / read / cancel / drop cycles on the slot pool (400 on the concat
    batch, whose row surgery copies more): no row held at the end, RSS flat."""
    import psutil

    proc = psutil.Process()
    rng = random.Random(7)
    runner = create_runner("onnxruntime", artifacts / flavour).activate()
    with Engine(runner, tokenizer, eos_token_id=0, max_batch=4, max_queue=8) as engine:
        live, rss = [], []
        for i in range(cycles):
            n = rng.choice([1, 3, 20, 70])
            params = SamplingParams(max_new_tokens=rng.choice([1, 4, 16]), temperature=rng.choice([0, 1.0]),
                                    seed=i)
            live.append(engine.submit(prompt_of(n, seed=i), params, wait=True))
            action = rng.random()
            if action < 0.3:
                live.pop(rng.randrange(len(live))).cancel()
            elif action < 0.5:
                h = live.pop(rng.randrange(len(live)))
                next(h, None)
                h.cancel()
            elif action < 0.6:
                live.pop(rng.randrange(len(live)))  # dropped: collected and cancelled
            elif action < 0.7 or len(live) > 6:
                live.pop(0).wait()
            if i in (cycles // 5 - 1, cycles - 1):
                for h in live:
                    h.wait()
                live.clear()
                gc.collect()
                rss.append(proc.memory_info().rss)
        deadline = time.perf_counter() + 10
        while (engine.stats()["active"] or engine.stats()["queued"]) and time.perf_counter() < deadline:
            time.sleep(0.005)
        stats = engine.stats()
        assert stats["active"] == stats["queued"] == 0 and held_slots(engine) == 0
        assert sum(stats["finished"].values()) == cycles and stats["finished"]["error"] == 0
        assert stats["finished"]["cancelled"] > cycles // 10
    runner.deactivate()
    assert rss[1] - rss[0] < 16 * 2**20, f"RSS grew {(rss[1] - rss[0]) / 2**20:.1f} MiB after the warm-up"


# ---- errors at once; others continue ---------------------------------------------------------------
def test_bad_requests_fail_at_once_and_others_continue(ort_runner, tokenizer):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompt = prompt_of(10, seed=11)
    expected = alone(ort_runner, tokenizer, prompt, params)[0]
    with Engine(ort_runner, tokenizer, eos_token_id=0, max_batch=1, max_queue=1) as engine:
        running = engine.submit(prompt, params)
        next(running)
        start = time.perf_counter()
        with pytest.raises(UsageError, match="exceeds the model's context of 2048"):
            engine.submit(prompt_of(2000, 1), SamplingParams(max_new_tokens=100))
        for bad, match in [([], "empty"), ([5, 99], r"\[0, 99\)"), ("text", "list of token ids")]:
            with pytest.raises(UsageError, match=match):
                engine.submit(bad, params)
        with pytest.raises(UsageError, match="logprobs"):
            engine.submit(prompt, params, logprobs=50)
        with pytest.raises(UsageError, match="stop_token_ids"):
            engine.submit(prompt, params, stop_token_ids=[500])
        queued = engine.submit(prompt_of(4, 2), SamplingParams(max_new_tokens=3))  # the one queue place
        with pytest.raises(QueueFullError) as full:
            engine.submit(prompt_of(4, 3), SamplingParams(max_new_tokens=3))
        assert full.value.retry_after > 0 and "queue is full" in str(full.value)
        assert time.perf_counter() - start < 1.0  # at once, not after the running request
        assert engine.stats()["queued"] == 1
        assert running.wait().token_ids == expected and running.finish_reason == "length"
        assert queued.wait().finish_reason in ("length", "stop")


def test_engine_close_cancels_everything(ort_runner, tokenizer):
    engine = Engine(ort_runner, tokenizer, eos_token_id=0, max_batch=1)
    handles = [engine.submit(prompt_of(5, i), SamplingParams(max_new_tokens=500, ignore_eos=True)) for i in range(3)]
    next(handles[0])
    engine.close()
    assert [h.wait().finish_reason for h in handles] == ["cancelled"] * 3
    assert not engine._thread.is_alive()
    with pytest.raises(Exception, match="closed"):
        engine.submit([5], SamplingParams())


# ---- many threads and event loops at once ------------------------------------------------------------
def test_many_threads_and_asyncio_tasks(ort_runner, tokenizer):
    params = [SamplingParams(max_new_tokens=12 + i % 5, ignore_eos=True) for i in range(24)]
    prompts = [prompt_of(3 + 7 * i, seed=100 + i) for i in range(24)]
    expected = [alone(ort_runner, tokenizer, p, q)[0] for p, q in zip(prompts, params, strict=True)]
    results: dict[int, list[int]] = {}
    errors = []
    with Engine(ort_runner, tokenizer, eos_token_id=0, max_batch=6) as engine:
        def thread_worker(indices):
            try:
                for i in indices:
                    results[i] = [e.token_id for e in engine.submit(prompts[i], params[i], wait=True)]
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        async def task(i):
            handle = engine.submit(prompts[i], params[i], wait=True)
            results[i] = [e.token_id async for e in handle]

        def loop_worker(indices):  # each thread runs its own event loop with several tasks
            try:
                async def main():
                    await asyncio.gather(*(task(i) for i in indices))
                asyncio.run(main())
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=thread_worker, args=(range(k, 12, 4),)) for k in range(4)]
        threads += [threading.Thread(target=loop_worker, args=(range(k, 24, 2),)) for k in (12, 13)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    assert [results[i] for i in range(24)] == expected
