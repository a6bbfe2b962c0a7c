"""Every runner through one shared helper: greedy text equals transformers', batches equal
one-by-one, stream equals generate, stop strings, seeds, fim, cached decode equals recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import starlift
from starlift.core.errors import UsageError
from starlift.runtimes import BACKENDS
from tests.conftest import load_hf

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\nimport sys\n", "x = [1, 2, 3]\n"]

# (name, backend, needs artifact flavour); every registered backend must appear (see the guard below).
RUNNERS = [
    ("torch", "torch", None),
    ("onnxruntime-portable", "onnxruntime", "portable"),
    ("onnxruntime-ort", "onnxruntime", "ort"),
    ("openvino-portable", "openvino", "portable"),
    ("tensorrt-portable", "tensorrt", "portable"),
]


def test_every_backend_is_covered():
    assert {backend for _, backend, _ in RUNNERS} == set(BACKENDS)


@pytest.fixture(scope="module")
def checkpoint(text_exports):
    return text_exports[0]  # conftest: the real tokenizer, exported once per session


@pytest.fixture(scope="module")
def artifacts(text_exports):
    return text_exports[1]


@pytest.fixture(scope="module", params=RUNNERS, ids=[r[0] for r in RUNNERS])
def gen(request, checkpoint, artifacts):
    _, backend, flavour = request.param
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is a test extra")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pytest.skip("TensorRT is not installed (not on this machine's package index; needs an NVIDIA GPU): "
                        "the TensorRT runner is unverified here")
    path = checkpoint if flavour is None else artifacts[flavour]
    g = starlift.load(path, backend=backend)
    yield g
    g.close()


@pytest.fixture(scope="module")
def hf_greedy(checkpoint):
    """transformers' own generate(), greedy, decoded with the same tokenizer."""
    hf = load_hf(checkpoint)
    tok = starlift.model.Tokenizer.from_pretrained(checkpoint)

    def run(prompt: str | list[int], n: int, stop_ids: tuple[int, ...] = ()) -> str:
        ids = torch.tensor([tok.encode(prompt) if isinstance(prompt, str) else prompt])
        stops = [hf.config.eos_token_id, *stop_ids]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=stops, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        ends = [new.index(t) for t in stops if t in new]
        return tok.decode(new[:min(ends)] if ends else new, skip_special_tokens=True)

    return run


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_equals_transformers(gen, hf_greedy, prompt):
    assert gen.generate(prompt, max_new_tokens=24) == hf_greedy(prompt, 24)


def test_batch_equals_one_by_one(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=16)
    assert batch == [gen.generate(p, max_new_tokens=16) for p in PROMPTS]
    assert len({len(gen.tokenizer.encode(p)) for p in PROMPTS}) > 1  # really different lengths


def test_stream_equals_generate(gen):
    for prompt in PROMPTS[:2]:
        pieces = list(gen.stream(prompt, max_new_tokens=30))
        assert "".join(pieces) == gen.generate(prompt, max_new_tokens=30)
        assert all(p and "\ufffd" not in p for p in pieces[:-1])


def test_stop_strings(gen):
    full = gen.generate(PROMPTS[0], max_new_tokens=30)
    assert len(full) > 8
    stop = full[5:8]  # three characters from inside the text: may span tokens
    cut = gen.generate(PROMPTS[0], max_new_tokens=30, stop=stop)
    assert cut == full[: full.find(stop)] and stop not in cut
    assert "".join(gen.stream(PROMPTS[0], max_new_tokens=30, stop=[stop, "never-there"])) == cut


def test_same_seed_same_sample(gen):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    a = gen.generate(PROMPTS[1], seed=7, **kw)
    assert a == gen.generate(PROMPTS[1], seed=7, **kw)
    others = {gen.generate(PROMPTS[1], seed=s, **kw) for s in (8, 9, 10)}
    assert others - {a}  # sampling really samples


def test_fim_returns_middle(gen, hf_greedy):
    """The middle equals transformers' greedy continuation of the FIM prompt as a transformers
    user spells it (special tokens in the text), stopped at <|endoftext|> or <file_sep>."""
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    tok = gen.tokenizer
    ids = tok.encode(f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>")
    assert ids == tok.encode_fim(prefix, suffix)
    middle = gen.fim(prefix, suffix, max_new_tokens=12)
    assert middle == hf_greedy(ids, 12, stop_ids=(tok.token_id("<file_sep>"),))
    assert len(middle) > 3


def test_token_ids_in_ids_out(gen):
    ids = gen.tokenizer.encode(PROMPTS[0])
    out = gen.generate(ids, max_new_tokens=10)
    assert all(isinstance(t, int) for t in out)
    assert gen.tokenizer.decode(out, skip_special_tokens=True) == gen.generate(PROMPTS[0], max_new_tokens=10)


def test_cached_decode_equals_full_recompute(gen):
    """The cache generation uses (the engine's: slot pool or concat batch) against one full pass."""
    runner = gen.runner
    ids = np.asarray(gen.tokenizer.encode(PROMPTS[1] + " pass\n" * 8), dtype=np.int64)
    n = len(ids)
    assert n > 20  # longer than the window of 16
    full = runner.single_batch(1).forward(ids[None], np.ones((1, n), np.int64), np.arange(n)[None])[0]
    cache = runner.create_cache(1)
    cache.add("seq")
    steps = [cache.prefill("seq", ids[:5], all_logits=True)]
    cache.join("seq")
    for t in range(5, n):
        steps.append(np.array(cache.decode(ids[t:t + 1])))
    cache.close()
    assert np.abs(np.concatenate(steps) - full).max() <= 1e-4


def test_context_limit_and_bad_params(gen):
    long_prompt = "x" * 10
    with pytest.raises(UsageError, match="exceeds the model's context"):
        gen.generate(long_prompt, max_new_tokens=600)
    assert isinstance(gen.generate(list(range(100, 600)), max_new_tokens=20, truncate=True), list)
    for kw, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(UsageError, match=msg):
            gen.generate(PROMPTS[0], **kw)
    with pytest.raises(UsageError, match="empty"):
        gen.generate("")


def test_onnxruntime_threads_stop_spinning_when_a_run_returns(nano_ort):
    """ONNX Runtime's intra-op threads spin on after a run returns (about 45 ms of a core on two
    threads): the runner ends the spin with the run (session.force_spinning_stop), so a finished
    call leaves no core busy behind it. The control, a session that keeps the spin, shows it."""
    import time

    from starlift.runtimes.onnxruntime_runner import OnnxRuntimeRunner

    ids = np.arange(100, 356, dtype=np.int64)[None]
    burnt = {}
    for name, config in (("default", None), ("spinning", {"session.force_spinning_stop": "0"})):
        with OnnxRuntimeRunner(nano_ort / "model.onnx", threads=2, session_config=config) as runner:
            cpu = []
            for _ in range(3):
                runner.single_batch(1).forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
                start = time.process_time()
                time.sleep(0.1)
                cpu.append(time.process_time() - start)
            burnt[name] = min(cpu)
    assert burnt["default"] < 0.005 < 0.02 < burnt["spinning"], burnt
