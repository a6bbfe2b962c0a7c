"""``starlift parity --url``: gate a running OpenAI-compatible endpoint against the reference.

A deployed ``starlift serve`` answers ``/v1/completions`` with the model's raw log-probabilities
of the top k tokens (``logprobs.top_token_ids`` / ``top_token_logprobs``, docs/guide/serve.md).
Each teacher-forced position is one request: the reference text's first ``t`` token ids as the
prompt, ``max_tokens`` 1, ``temperature`` 0, ``logprobs`` k. The server's answer is compared with
the reference model's ``log_softmax`` at the same position, judged by the one tolerance policy
(``starlift.core.tolerance``):

- ``top1_agreement``: the server's best id is the reference's argmax (a near-tie within the
  policy's tie bound is forgiven, as in file parity);
- ``max_abs_error``: over the returned ids, |server logprob - reference logprob|, against twice
  the policy's logit bound (logits within b give log-probabilities within 2b);
- greedy: the server's own greedy continuation of the prompt against the reference's.

Full-vocabulary checks (mean KL, perplexity) need every logit and stay with the file-based run.
The HTTP client is the standard library's (no extra needed on a CI box).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core import tolerance
from starlift.core.errors import StarliftError, UsageError

from . import metrics, quality


def _call(url: str, path: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # not OpenAI's error JSON
            message = e.reason
        raise StarliftError(f"{url}{path} answered {e.code}: {message}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"cannot reach {url} ({reason}); is the server running (starlift serve ...)?") from None


def run(url: str, reference: str | Path, text: str | None = None, prompt_tokens: int = 64, steps: int = 32,
        top_logprobs: int = 5, greedy_steps: int = 16, precision: str | None = None, api_key: str | None = None,
        timeout: float = 120.0) -> dict[str, Any]:
    """The report of one endpoint against the reference checkpoint (same layout as file parity's,
    one backend named ``http``)."""
    import torch

    from starlift.model import load_checkpoint, resolve_checkpoint
    from starlift.model.tokenizer import Tokenizer

    if not 1 <= top_logprobs <= 20:
        raise UsageError(f"--top-logprobs must be between 1 and 20 (the server's limit), got {top_logprobs}")
    if prompt_tokens < 1 or steps < 1:
        raise UsageError("--prompt-tokens and --steps must be at least 1")
    served = _call(url, "/v1/models", None, api_key, timeout)["data"][0]
    if served.get("task", "text-generation") != "text-generation":
        raise UsageError(f"{url} serves a {served['task']} model; HTTP parity compares next-token log-probabilities")
    precision = precision or served.get("precision")
    if precision is None:
        raise UsageError(f"{url} does not say its precision (GET /v1/models); pass --precision")
    precision = tolerance.check_precision(precision)
    model = load_checkpoint(reference, dtype="fp32")
    config = model.config
    tok_file = resolve_checkpoint(reference) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    plan = quality.make_plan(tokenizer, config.vocab_size, config.max_position_embeddings, text, windows=1,
                             window_tokens=prompt_tokens + steps, steps=steps, prompt=prompt_tokens)
    ids = plan.windows[0][:plan.prompt + plan.steps]
    with torch.inference_mode():
        ref_logits = model(torch.tensor([ids]))[0][0].numpy()
    ref_logprobs = metrics.log_softmax(ref_logits)
    checks = tolerance.logit_checks(precision, tolerance.Shape.of(config), float(np.abs(ref_logits).max()),
                                    "reference")
    tie = checks.pop("top1_tie").bound
    agree, errors = [], []
    for t in range(plan.prompt, plan.prompt + plan.steps):  # the answer after ids[:t] is the reference's row t-1
        answer = _call(url, "/v1/completions", {"model": served["id"], "prompt": ids[:t], "max_tokens": 1,
                                                "temperature": 0, "logprobs": top_logprobs}, api_key, timeout)
        lp = answer["choices"][0].get("logprobs") or {}
        if "top_token_ids" not in lp:
            raise StarliftError(f"{url} returned no logprobs.top_token_ids: HTTP parity needs a starlift serve endpoint "
                                "(or one that returns the top-k token ids and their raw logprobs)")
        top_ids, top_lps = lp["top_token_ids"][0], lp["top_token_logprobs"][0]
        row = ref_logits[t - 1]
        agree.append(bool(row[top_ids[0]] >= row.max() - tie))
        errors.append(float(np.max(np.abs(np.asarray(top_lps) - ref_logprobs[t - 1][top_ids]))))
    greedy = _call(url, "/v1/completions", {"model": served["id"], "prompt": ids[:plan.prompt], "temperature": 0,
                                            "max_tokens": greedy_steps, "ignore_eos": True}, api_key, timeout)
    got = greedy["choices"][0]["token_ids"]
    expected = _reference_greedy(model, ids[:plan.prompt], greedy_steps)
    match = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    values: dict[str, Any] = {"top1_agreement": float(np.mean(agree)), "max_abs_error": max(errors),
                              "greedy_match_tokens": match, "greedy_steps": greedy_steps,
                              "finite": bool(np.isfinite(errors).all())}
    bounds = {"top1_agreement": checks["top1_agreement"],
              "max_abs_error": tolerance.Check("max", 2 * checks["max_abs_error"].bound)}
    values.update(quality.judge(values, bounds))
    return {"precision": precision, "reference": str(reference), "path": url, "url": url, "model": served["id"],
            "tokens": plan.prompt + plan.steps, "decode_prompt_tokens": plan.prompt, "decode_steps": plan.steps,
            "top_logprobs": top_logprobs, "text": plan.text, "backends": {"http": values},
            "passed": values["passed"]}


def _reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    out, ids = [], list(prompt)
    with torch.inference_mode():
        for _ in range(steps):  # a full pass per token: a few dozen short steps, no cache needed
            token = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def format_table(report: dict[str, Any]) -> str:
    v = report["backends"]["http"]
    failed = [f"{k} {c['value']:.3g} (tol {c['tolerance']:.3g})" for k, c in v["checks"].items() if not c["passed"]]
    return "\n".join([
        f"parity of {report['url']} ({report['model']}) vs {report['reference']} ({report['precision']}; "
        f"{report['decode_steps']} teacher-forced positions after {report['decode_prompt_tokens']} tokens of "
        f"{report['text']}, top {report['top_logprobs']} logprobs)",
        f"{'endpoint':<12} {'max|dlogp|':>10} {'top1':>7} {'greedy':>8}  verdict",
        f"{'http':<12} {v['max_abs_error']:>10.2e} {v['top1_agreement']:>7.3f} "
        f"{v['greedy_match_tokens']:>4}/{v['greedy_steps']:<3}  " + ("PASS" if v["passed"] else "FAIL: " + "; ".join(failed)),
        "PASSED" if report["passed"] else "FAILED"])
