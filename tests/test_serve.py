"""`starlift serve`: a real server in a subprocess on a free loopback port, driven by the official
``openai`` client and raw httpx, against the bundled starcoder2-nano (ort flavour).

Every answer is compared with ``starlift.load(...)`` in this process on the same artifact; every
loop is bounded in count and time; each fixture stops only the process it started, also when a
test fails.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the official openai client is in the test extra")
httpx = pytest.importorskip("httpx", reason="httpx is in the serve and test extras")
pytest.importorskip("fastapi", reason="starlift serve needs the serve extra")
pytest.importorskip("uvicorn", reason="starlift serve needs the serve extra")

EXE = Path(sys.executable).with_name("starlift")
MODEL = "nano"
KEY = "test-key-5f1c"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
READY = re.compile(r"ready on (http://\S+)")


class ServerProcess:
    """``starlift serve ... --port 0`` in a subprocess; ``url`` once its ready line is printed."""

    def __init__(self, artifact: Path, *args: str, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen([str(EXE), "serve", str(artifact), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait_ready(log, 120)

    def _wait_ready(self, log: Path, timeout: float) -> None:
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = None
        deadline = time.monotonic() + timeout
        while self.url is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"starlift serve did not get ready: {log.read_text()[-2000:]}")
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if m := READY.search(line):
                self.url = m.group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s (only this process)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            return self.proc.returncode
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def server(nano_ort, tmp_path_factory):
    """2 rows and a queue of 1: the third waiting request is answered 429."""
    s = ServerProcess(nano_ort, "--served-model-name", MODEL, "--max-concurrency", "2", "--max-queue", "1",
                      log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(signing, tmp_path_factory):
    """A signed artifact served with --public-key, an API key and a chat template; the SIGTERM test
    ends it."""
    root = tmp_path_factory.mktemp("serve-keyed")
    (root / "chat.jinja").write_text(TEMPLATE)
    s = ServerProcess(signing["artifact"], "--public-key", str(signing["pub"]), "--served-model-name", MODEL,
                      "--api-key", KEY, "--chat-template", str(root / "chat.jinja"), "--grace-period", "60",
                      log=root / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gen(nano_ort):
    import starlift

    g = starlift.load(nano_ort)
    yield g
    g.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def wait_idle(url: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while metric(url, "starlift_active_sequences") or metric(url, "starlift_queue_depth"):
        assert time.monotonic() < deadline, "rows still held: a slot leaked"
        time.sleep(0.05)


PROMPT = "def fibonacci(n):\n"


# ---- completions equal starlift.load ---------------------------------------------------------------
def test_greedy_completion_equals_load(client, gen):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    expected = gen.generate(PROMPT, max_new_tokens=24)
    assert r.choices[0].text == expected and expected.strip()
    assert r.object == "text_completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(gen.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_seeded_sample_equals_load_and_repeats(client, gen):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.9, top_p=0.95)
    a = client.completions.create(seed=11, **kw).choices[0].text
    b = client.completions.create(seed=11, **kw).choices[0].text
    expected = gen.generate(PROMPT, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=11)
    assert a == b == expected
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert others != {a}, "the seed changes nothing"


def test_stop_and_length(client, gen):
    expected = gen.generate(PROMPT, max_new_tokens=40, stop=["\n"])
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=["\n"])
    assert r.choices[0].text == expected and "\n" not in expected
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_suffix_is_fill_in_the_middle(client, gen):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    assert r.choices[0].text == gen.fim(prefix, suffix, max_new_tokens=16)


def test_streaming_equals_the_completion(client, gen):
    expected = gen.generate(PROMPT, max_new_tokens=32)
    pieces, reasons, usage = [], [], None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stream=True):
        for c in chunk.choices:
            pieces.append(c.text)
            reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == expected
    assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
    assert usage is not None and usage.completion_tokens >= len([p for p in pieces if p])


def test_raw_sse(server, gen):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == gen.generate(PROMPT, max_new_tokens=16)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_prompt_lists_token_ids_and_logprobs(client, gen):
    """Several prompts answer in order; token-id prompts with logprobs give the model's own
    top-k log-softmax and ids (what parity over HTTP reads)."""
    from starlift.engine import SamplingParams

    prompts = ["import os\n", "class Stack:\n"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == gen.generate(prompts, max_new_tokens=8)

    ids = gen.tokenizer.encode("def main():\n    ")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    events = list(gen.engine.submit(ids, SamplingParams(max_new_tokens=1), logprobs=5))
    ref = events[0]
    extra = lp.model_extra
    assert extra["token_ids"] == [ref.token_id]
    assert extra["top_token_ids"][0] == [t for t, _ in ref.top_logprobs]
    assert extra["top_token_logprobs"][0] == pytest.approx([x for _, x in ref.top_logprobs], abs=1e-5)
    assert lp.token_logprobs[0] == pytest.approx(ref.logprob, abs=1e-5)
    assert extra["top_token_ids"][0][0] == ref.token_id  # greedy picks the best


def test_speculative_fields_pass_through(server, client, gen):
    """starlift's speculative / draft_tokens fields reach the engine: the same greedy text, and
    a bad value answers 400."""
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                  extra_body={"speculative": "prompt-lookup", "draft_tokens": 4})
    assert r.choices[0].text == gen.generate(PROMPT, max_new_tokens=24)
    prefix, suffix = "def square(x):\n    return ", "\n"
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 12, "temperature": 0,
            "speculative": "prompt-lookup"}
    assert httpx.post(f"{server.url}/infill", json=body, timeout=60).json()["content"] == \
        gen.fim(prefix, suffix, max_new_tokens=12)
    bad = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "speculative": "medusa"}, timeout=30)
    assert bad.status_code == 400 and "speculative" in bad.json()["error"]["message"]


def test_infill_in_llama_cpp_shape(server, gen):
    prefix, suffix = "def square(x):\n    return ", "\n"
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 12, "temperature": 0}
    r = httpx.post(f"{server.url}/infill", json=body, timeout=60).json()
    assert r["content"] == gen.fim(prefix, suffix, max_new_tokens=12)
    assert r["stop"] is True and r["stop_type"] in ("eos", "limit") and r["tokens_predicted"] >= 1


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("starlift_http_requests_total", "starlift_generation_tokens_total",
                 "starlift_time_to_first_token_seconds_bucket", "starlift_inter_token_latency_seconds_bucket",
                 "starlift_queue_depth", "starlift_active_sequences"):
        assert name in text, name
    assert metric(server.url, "starlift_generation_tokens_total") > 0
    assert metric(server.url, "starlift_http_requests_total", '{route="/v1/completions",status="200"}') >= 1


@pytest.mark.slow
def test_parity_over_http(server, tmp_path):
    """`starlift parity --url` gates the running endpoint as a file is gated: the nano server passes
    against its own checkpoint (fp32, read from GET /v1/models), and fails (exit 1) against a copy
    of the checkpoint with one MLP weight doubled."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from starlift.model import resolve_checkpoint

    def parity(reference, out):
        return subprocess.run([str(EXE), "parity", "--url", server.url, "--reference", str(reference), "--steps", "8",
                               "--prompt-tokens", "24", "--greedy-steps", "6", "--json", str(out)],
                              capture_output=True, text=True, timeout=300)

    good = parity("starcoder2-nano", tmp_path / "good.json")
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads((tmp_path / "good.json").read_text())
    v = report["backends"]["http"]
    assert report["precision"] == "fp32" and report["decode_steps"] == 8
    assert v["top1_agreement"] == 1.0 and v["max_abs_error"] < 1e-3 and v["greedy_match_tokens"] == 6
    bad = tmp_path / "bad"
    shutil.copytree(resolve_checkpoint("starcoder2-nano"), bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.c_fc.weight"))
    weights[name] = weights[name] * 2
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    failed = parity(bad, tmp_path / "bad.json")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    checks = json.loads((tmp_path / "bad.json").read_text())["backends"]["http"]["checks"]
    assert not checks["max_abs_error"]["passed"] and "FAIL" in failed.stdout


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "max_tokens": 5000}, "prompt"),  # does not fit the context of 1,024
    ({"prompt": [1, 2, 10**6]}, "prompt"),  # id outside the vocabulary
    ({"prompt": [1, True]}, "prompt"),  # true is not token 1
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
])
def test_bad_values_answer_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_and_chat_without_template(server, client):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x",', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.message and e.value.code == "no_chat_template"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def _open_stream(url: str, max_tokens: int = 900) -> tuple[httpx.Client, httpx.Response, object]:
    c = httpx.Client(timeout=60)
    body = {"model": MODEL, "prompt": "#", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    resp = c.send(c.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
    assert resp.status_code == 200
    return c, resp, resp.iter_lines()


def test_full_queue_429_then_disconnects_free_the_rows(server, client):
    """Two rows decode and one request waits; the next is refused with Retry-After. Closing the
    streams (the clients leave) frees every row, as /metrics shows."""
    wait_idle(server.url)
    cancelled0 = metric(server.url, "starlift_engine_requests_finished_total", '{reason="cancelled"}')
    streams = []  # (client, response, line iterator): dropping an iterator would close its connection
    try:
        for _ in range(2):
            streams.append(_open_stream(server.url))
            assert next(line for line in streams[-1][2] if line.startswith("data: "))  # it decodes
        streams.append(_open_stream(server.url))  # waits for a row
        deadline = time.monotonic() + 10
        while metric(server.url, "starlift_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert metric(server.url, "starlift_active_sequences") == 2
    finally:
        for c, resp, _ in streams:
            resp.close()
            c.close()
    wait_idle(server.url, within=10)
    assert metric(server.url, "starlift_engine_requests_finished_total", '{reason="cancelled"}') >= cancelled0 + 3
    assert metric(server.url, "starlift_client_disconnects_total") >= 3
    # the freed rows serve again
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


def test_non_streaming_disconnect_frees_the_row(server):
    wait_idle(server.url)
    cancelled0 = metric(server.url, "starlift_engine_requests_finished_total", '{reason="cancelled"}')
    body = {"model": MODEL, "prompt": "#", "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    wait_idle(server.url, within=10)
    assert metric(server.url, "starlift_engine_requests_finished_total", '{reason="cancelled"}') == cancelled0 + 1


def test_loadtest_command_with_disconnects(server, tmp_path):
    """`starlift loadtest` against the server: clients that leave mid-stream or while queued
    leave no row held and no 5xx; its JSON says so."""
    wait_idle(server.url)
    out = tmp_path / "load.json"
    proc = subprocess.run([str(EXE), "loadtest", server.url, "--concurrency", "3", "--requests", "24",
                           "--disconnect-rate", "0.5", "--prompt-tokens", "8", "--max-tokens", "12",
                           "--server-pid", str(server.proc.pid), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["requests"] == 24 and r["server_errors_5xx"] == 0 and r["leaked_slots"] == 0
    # a client that leaves and sends its next request at once may find its old row not yet freed: 429
    assert set(r["statuses"]) <= {"200", "429"} and r["statuses"]["200"] >= 12
    assert r["passed"] and r["disconnected"] >= 5 and r["short"] == 0 and r["failed"] == 0
    assert r["throughput_tokens_per_s"] > 0 and r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert "tok/s" in proc.stdout and "PASS" in proc.stdout


# ---- the key, chat, and SIGTERM (on the second server) ---------------------------------------------
def test_api_key(keyed_server, gen):
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as c:
        text = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert text == gen.generate(PROMPT, max_new_tokens=8)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key


def test_chat_with_a_template(keyed_server, gen):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def hello():"}]
    import jinja2

    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE).render(
        messages=messages, add_generation_prompt=True)
    expected = gen.generate(rendered, max_new_tokens=12)
    with openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0) as c:
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True) if ch.choices)
        assert streamed == expected


def test_sigterm_drains_in_flight_requests_and_exits_0(keyed_server):
    """SIGTERM while a stream runs: the stream still ends with all its tokens and [DONE], new
    connections are refused, and the process exits 0."""
    url, n = keyed_server.url, 150
    body = {"model": MODEL, "prompt": "#", "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", f"{url}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            keyed_server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=5)
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
    assert chunks[-1]["usage"]["completion_tokens"] == n
    assert keyed_server.proc.wait(30) == 0


# ---- start-up refusals -------------------------------------------------------------------------------
def test_bad_options_and_a_tampered_artifact_are_refused_before_serving(nano_ort, tmp_path):
    proc = subprocess.run([str(EXE), "serve", str(nano_ort), "--max-concurrency", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--max-concurrency must be >= 1" in proc.stderr
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(nano_ort, tampered)
    config = tampered / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 6', '"num_hidden_layers": 5'))
    proc = subprocess.run([str(EXE), "serve", str(tampered), "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "config.json" in proc.stderr and "ready on" not in proc.stdout


def test_session_config_reaches_onnx_runtime(nano_ort):
    """A server's ORT threads sleep between kernels by default (they share the cores with the HTTP
    side); --session-config entries go over that default into the real session."""
    import starlift
    from starlift.cli.serve import session_config_of
    from starlift.core.errors import UsageError
    from starlift.serve.build import ServeOptions, runner_options_of

    spinning = "session.intra_op.allow_spinning"
    for entries, expected in (([], "0"), ([f"{spinning}=1"], "1")):
        options = runner_options_of(ServeOptions(str(nano_ort), session_config=session_config_of(entries)))
        gen = starlift.load(nano_ort, **options)
        try:
            assert gen.runner.session.get_session_options().get_session_config_entry(spinning) == expected
        finally:
            gen.close()
    with pytest.raises(UsageError, match="KEY=VALUE"):
        session_config_of(["allow_spinning"])
    proc = subprocess.run([str(EXE), "serve", str(nano_ort), "--backend", "openvino", "--session-config",
                           f"{spinning}=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--session-config" in proc.stderr and "ready on" not in proc.stdout


def test_unsigned_or_wrongly_signed_artifacts_are_refused(nano_ort, signing):
    """--public-key: the signature is checked before the model loads; no server ever listens."""
    for artifact, key in ((nano_ort, signing["pub"]), (signing["artifact"], signing["other"])):
        proc = subprocess.run([str(EXE), "serve", str(artifact), "--port", "0", "--public-key", str(key)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "ready on" not in proc.stdout
        assert "signature" in proc.stderr.lower() or "signed" in proc.stderr.lower(), proc.stderr


@pytest.mark.slow
def test_classify_route_for_a_classification_artifact(tmp_path):
    """A sequence-classification artifact is served on /v1/classify, with the pipeline's labels
    and scores; the generation routes say to use it."""
    import starlift
    from starlift.export import export_checkpoint
    from tests.test_heads import NANO_TOKENIZER, write_head_checkpoint

    ckpt = write_head_checkpoint(tmp_path / "ckpt", "Starcoder2ForSequenceClassification", ["bug", "ok", "style"],
                                 tokenizer=NANO_TOKENIZER, vocab_size=8192, pad_token_id=0)
    export_checkpoint(ckpt, tmp_path / "cls", progress=False)
    texts = ["def add(a, b):\n    return a + b\n", "import os"]
    clf = starlift.pipeline("text-classification", tmp_path / "cls")
    expected = clf(texts, top_k=None)
    clf.classifier.close()
    s = ServerProcess(tmp_path / "cls", "--served-model-name", "cls", log=tmp_path / "server.log")
    try:
        r = httpx.post(f"{s.url}/v1/classify", json={"input": texts, "top_k": 2}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1]
        for d, e in zip(data, expected, strict=True):
            assert d["label"] == e[0]["label"] and d["score"] == pytest.approx(e[0]["score"], abs=1e-6)
            assert [x["label"] for x in d["labels"]] == [x["label"] for x in e[:2]]
        assert r.json()["usage"]["prompt_tokens"] > 0
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]
        r = httpx.post(f"{s.url}/v1/classify", json={"input": []}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    finally:
        s.stop()
