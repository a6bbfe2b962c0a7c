"""``starlift bench --workload latency``: the code-completion workload, with llama.cpp in the same run.

A completion request is a long prompt and a short answer; its latency is the time to the first
token (the prefill), then the decode speed. Three kinds of request, built from source files
starcoder2-nano never trained on (the held-out files of its ``training_record.json``, read from
this Python's standard library and checked by sha256):

- ``ttft L``: the first L tokens of the held-out files (joined with ``<file_sep>``), one token
  generated: time to first token on an L-token prompt.
- ``fim P``: fill in the middle: up to P tokens before a cursor placed at a line start (earlier
  held-out files before it when the file is shorter), up to S tokens after it, then N new tokens.
- ``edit``: re-emitting a file with a small change: the original (E tokens) after
  ``<file_sep>``, then the file again with one identifier renamed, cut after its first changed
  line; the model continues it for N new tokens (the workload where prompt-lookup drafts will
  shine; the request keeps the edited file's next tokens as ``reference_continuation``).

Every row generates greedily exactly N tokens (EOS does not stop it, so every row does the same
work) from the same token ids: starlift's rows through the ``Engine`` (the generation loop every
starlift API uses, its prefill computing logits for the last position only; one request at a
time, so the prompt is fed in one chunk: nothing decodes beside it), llama.cpp's
through llama-cpp-python's ``Llama.eval`` in its own process (it computes the last position's
logits only as well). Requests are interleaved round-robin over the rows, repetition by
repetition, so machine noise hits every row alike; figures are medians.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import platform
import re
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starlift.core.errors import UsageError

FILE_SEP = "<file_sep>"


@dataclass
class Request:
    kind: str  # "ttft", "fim" or "edit"
    size: int  # the prompt budget it was built for (tokens)
    ids: list[int]
    new_tokens: int
    source: str  # which held-out file(s)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind} {self.size}" if self.kind != "edit" else "edit"


def heldout_files() -> list[tuple[str, str]]:
    """(path, text) of starcoder2-nano's held-out files, from this Python's standard library."""
    from starlift.model import resolve_checkpoint

    record = json.loads((resolve_checkpoint("starcoder2-nano") / "training_record.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for entry in record["data"]["held_out"]:
        path = stdlib / entry["path"]
        if path.is_file():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == entry["sha256"]:
                files.append((entry["path"], data.decode("utf-8")))
    if len(files) < 2:
        raise UsageError(f"found {len(files)} of starcoder2-nano's held-out files under {stdlib} with the recorded "
                         f"sha256 (Python {record['data'].get('python_version')} wrote them); the workload needs them")
    return files


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]


def build_requests(tokenizer, files: list[tuple[str, str]], context: int, ttft_lens: list[int],
                   fim_prefixes: list[int], fim_suffix: int, fim_new: int, edit_tokens: int, edit_new: int,
                   count: int) -> list[Request]:
    """Deterministic requests (no randomness: the same files and cursors every run)."""
    sep = tokenizer.token_id(FILE_SEP)
    encoded = [(name, tokenizer.encode(text)) for name, text in files]
    corpus = [t for _, ids in encoded for t in [sep, *ids]]
    requests = []
    for length in ttft_lens:
        if length + 1 > context or length > len(corpus):
            raise UsageError(f"a {length}-token prompt does not fit: context {context}, held-out text "
                             f"{len(corpus)} tokens")
        requests.append(Request("ttft", length, corpus[:length], 1, "held-out files in record order"))
    by_size = sorted(range(len(files)), key=lambda i: -len(encoded[i][1]))
    fim = [tokenizer.token_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    for budget in fim_prefixes:
        prefix_len = min(budget, context - fim_suffix - fim_new - 3)
        if prefix_len < 16:
            raise UsageError(f"--fim-prefix {budget} leaves no room in the context of {context} tokens")
        for r in range(count):
            i = by_size[r % len(by_size)]
            name, text = files[i]
            starts = _line_starts(text)
            cursor = starts[len(starts) * (r + 1) // (count + 1)]
            before = [t for j in range(i) for t in [sep, *encoded[j][1]]] + [sep] + tokenizer.encode(text[:cursor])
            after = tokenizer.encode(text[cursor:])[:fim_suffix]
            ids = [fim[0], *before[-prefix_len:], fim[1], *after, fim[2]]
            requests.append(Request("fim", budget, ids, fim_new, name,
                                    {"prefix_tokens": min(prefix_len, len(before)), "suffix_tokens": len(after),
                                     "cursor_line": starts.index(cursor)}))
    for r in range(count):
        name, text = files[by_size[r % len(by_size)]]
        original = tokenizer.decode(tokenizer.encode(text)[:edit_tokens])
        original = original[:original.rfind("\n") + 1] or original
        edited = _rename_one_identifier(original)
        # the edited file up to its first changed line: the model goes on re-emitting from there
        old_lines, new_lines = original.splitlines(keepends=True), edited.splitlines(keepends=True)
        first = next((k for k, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b), 0)
        head = "".join(new_lines[:first + 1])
        ids = [sep, *tokenizer.encode(original), sep, *tokenizer.encode(head)]
        if len(ids) + edit_new > context:
            raise UsageError(f"the edit workload ({len(ids)} + {edit_new} tokens) does not fit the context of "
                             f"{context}: lower --edit-tokens")
        requests.append(Request("edit", edit_tokens, ids, edit_new, name,
                                {"original_tokens": len(tokenizer.encode(original)),
                                 "reference_continuation": tokenizer.encode(edited[len(head):])[:edit_new]}))
    return requests


def edit_requests(tokenizer, edit_tokens: int = 200, count: int = 5, edit_new: int = 64,
                  context: int = 1024) -> list[Request]:
    """Only the edit workload's requests (as ``run`` builds them), for the scripts that
    measure a model on it outside the bench (training/finetune_edit.py,
    scripts/spec-verify-cost/calls.py)."""
    return build_requests(tokenizer, heldout_files(), context, [], [], 0, 0, edit_tokens, edit_new, count)


def _rename_one_identifier(text: str) -> str:
    """The most frequent identifier of 4+ letters (not a keyword, not ``self``) renamed: a small
    edit that touches many lines."""
    words = Counter(w for w in re.findall(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b", text)
                    if not keyword.iskeyword(w) and w not in ("self", "None", "True", "False"))
    if not words:
        return text
    word = words.most_common(1)[0][0]
    return re.sub(rf"\b{re.escape(word)}\b", word + "_v2", text)


# ---- rows ------------------------------------------------------------------------------------
class _StarliftRow:
    def __init__(self, path: Path, backend: str, threads: int | None, speculative: str | None = None,
                 draft_tokens: int = 8):
        from starlift.core.artifact import read_manifest

        manifest = read_manifest(path)
        self.path, self.backend, self.threads = path, backend, threads
        self.speculative, self.draft_tokens = speculative, draft_tokens
        self.precision = manifest.get("precision", manifest.get("dtype", "fp32"))
        self.name = f"starlift {path.name} ({manifest.get('flavour')} {self.precision})"
        if speculative:
            self.name += f" {speculative} {draft_tokens}"
        self.is_peer = False

    def activate(self):
        from starlift.runtimes import create_runner

        options = {"threads": self.threads} if self.threads else {}
        from starlift.engine import Engine

        self.runner = create_runner(self.backend, self.path, **options).activate()
        # one request at a time: the whole prompt in one prefill call (no decode to interleave with)
        self.engine = Engine(self.runner, max_batch=1, prefill_chunk=1 << 20).start()
        return self

    def complete(self, ids: list[int], new_tokens: int) -> dict:
        from starlift.engine import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, speculative=self.speculative,
                                draft_tokens=self.draft_tokens)
        t0 = time.perf_counter()
        handle = self.engine.submit(ids, params)
        events = list(handle)
        if handle.error is not None:
            raise handle.error
        return {"tokens": [e.token_id for e in events], "ttft_s": events[0].time - t0,
                "total_s": events[-1].time - t0, "acceptance": handle.acceptance_rate}

    def deactivate(self):
        self.engine.close()
        self.runner.deactivate()


class _LlamaRow:
    def __init__(self, peer, quant: str, precision: str):
        self.peer, self.precision = peer, precision
        self.speculative = "prompt-lookup" if peer.lookup else None
        self.name = f"llama.cpp {quant}" + (f" prompt-lookup {peer.lookup}" if peer.lookup else "")
        self.backend, self.is_peer = "llama.cpp", True

    def activate(self):
        self.peer.activate()
        return self

    def complete(self, ids, new_tokens):
        return self.peer.complete(ids, new_tokens)

    def deactivate(self):
        self.peer.deactivate()


def run(paths: list[str], backends: list[str], checkpoint: str | None, llama_cpp: str | None = None,
        llama_cpp_quants=("f32", "q8_0", "q4_0"), llama_cpp_cache: str | None = None, flash_attn: bool = False,
        ttft_lens=(1024, 4096), fim_prefixes=(1024, 4096), fim_suffix: int = 128, fim_new: int = 32,
        edit_tokens: int = 512, edit_new: int = 64, requests_per_size: int = 3, reps: int = 3,
        threads: int | None = None, progress: bool = True, speculative: str | None = None, draft_tokens: int = 8,
        llama_cpp_lookup: int | None = None) -> dict[str, Any]:
    """``speculative``: each artifact also runs as a row with that speculative decoding
    (``draft_tokens`` per step); ``llama_cpp_lookup=K``: each llama.cpp quant also runs with
    llama-cpp-python's prompt-lookup decoding (K draft tokens)."""
    from tqdm.auto import tqdm

    from starlift.api import is_artifact
    from starlift.model import Starcoder2Config
    from starlift.model.tokenizer import Tokenizer

    if reps < 1 or requests_per_size < 1 or fim_new < 2 or edit_new < 2:
        raise UsageError("--reps and --requests must be >= 1, and new-token counts >= 2")
    for p in paths:
        if not is_artifact(p):
            raise UsageError(f"{p} is not an artifact folder (no manifest.json); export it first")
    if llama_cpp and not checkpoint:
        raise UsageError("--llama-cpp needs --peers CHECKPOINT: llama.cpp converts that Hugging Face checkpoint")
    source = Path(paths[0]) if paths else Path(checkpoint)
    if not (source / "tokenizer.json").is_file():
        raise UsageError(f"{source} has no tokenizer.json: the workload is built from text")
    tokenizer = Tokenizer.from_file(source / "tokenizer.json")
    config = Starcoder2Config.from_hf(source)
    context = config.max_position_embeddings
    ttft_lens = [n for n in ttft_lens if n < context] or [context // 2]
    requests = build_requests(tokenizer, heldout_files(), context, list(ttft_lens), list(fim_prefixes), fim_suffix,
                              fim_new, edit_tokens, edit_new, requests_per_size)
    rows: list = [_StarliftRow(Path(p), b, threads, spec, draft_tokens) for p in paths for b in backends
                  for spec in ([None, speculative] if speculative else [None])]
    if llama_cpp:
        from . import llama_cpp as llama

        longest = max(len(r.ids) + r.new_tokens for r in requests)
        for q in llama_cpp_quants:
            if q not in llama.QUANTS:
                raise UsageError(f"--llama-cpp-quant takes {', '.join(llama.QUANTS)}, got {q!r}")
            for lookup in [None, llama_cpp_lookup] if llama_cpp_lookup else [None]:
                peer = llama.LlamaCppPeer(llama_cpp, Path(checkpoint), q, llama_cpp_cache, threads,
                                          n_ctx=longest + 16, flash_attn=flash_attn, lookup=lookup)
                rows.append(_LlamaRow(peer, q, llama.PRECISION[q]))
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    checks: dict[str, Any] = {}
    try:
        # warm-up at the longest prompt, so no row's first measured request pays for sizing its
        # buffers (ONNX Runtime's arena grows on the first call of a new shape: ~10% of a cold
        # 4,096-token prefill here); the ids are reversed, so nothing can reuse them as a prefix
        warm = max(requests, key=lambda r: len(r.ids)).ids[::-1]
        for row in rows:
            row.activate()
            row.complete(warm, 2)
        if llama_cpp:  # does llama.cpp's tokenizer read the text as starlift's does? (the GGUF's own vocab)
            text = heldout_files()[0][1][:4000]
            peer = next(r for r in rows if isinstance(r, _LlamaRow)).peer
            checks["llama_cpp_tokenizer_agrees"] = peer.tokenize(text) == tokenizer.encode(text)
        first_tokens: dict[tuple[str, int], dict[str, list[int]]] = {}
        work = [(rep, i, row) for rep in range(reps) for i in range(len(requests)) for row in rows]
        for rep, i, row in tqdm(work, desc="latency", disable=not progress, leave=False):
            req = requests[i]
            out = row.complete(req.ids, req.new_tokens)
            s = samples.setdefault((row.name, req.key), {"ttft_s": [], "total_s": [], "decode_tokens_per_s": []})
            s["ttft_s"].append(out["ttft_s"])
            s["total_s"].append(out["total_s"])
            if req.new_tokens > 1:
                s["decode_tokens_per_s"].append((req.new_tokens - 1) / (out["total_s"] - out["ttft_s"]))
            if out.get("acceptance") is not None:
                s.setdefault("acceptance", []).append(out["acceptance"])
            if rep == 0:
                first_tokens.setdefault((req.key, i), {})[row.name] = out["tokens"]
    finally:
        for row in rows:
            try:
                row.deactivate()
            except Exception:  # noqa: BLE001 - a row that never activated has nothing to release
                pass
    return _report(rows, requests, samples, first_tokens, checks, reps, threads, flash_attn)


def _agreement(first_tokens, rows) -> dict[str, float]:
    """Per row: the share of requests whose greedy tokens equal the first row of the same precision's."""
    out = {}
    for row in rows:
        same = [r for r in rows if r.precision == row.precision and r is not row]
        if not same:
            continue
        other = same[0].name
        equal = [toks[row.name] == toks[other] for toks in first_tokens.values() if row.name in toks and other in toks]
        out[f"{row.name} vs {other}"] = float(np.mean(equal)) if equal else None
    return out


def _report(rows, requests, samples, first_tokens, checks, reps, threads, flash_attn) -> dict[str, Any]:
    keys = list(dict.fromkeys(r.key for r in requests))
    results = []
    for key in keys:
        for row in rows:
            s = samples[(row.name, key)]
            med = {k: float(np.median(v)) if v else None for k, v in s.items()}
            results.append({"workload": key, "row": row.name, "backend": row.backend, "precision": row.precision,
                            "is_peer": row.is_peer, "ttft_s": med["ttft_s"], "total_s": med["total_s"],
                            "decode_tokens_per_s": med["decode_tokens_per_s"], "samples": s})
    for r in results:  # each starlift row against the fastest llama.cpp row at its precision
        peers = [q for q in results if q["is_peer"] and q["workload"] == r["workload"] and q["precision"] == r["precision"]]
        if not r["is_peer"] and peers:
            best = min(peers, key=lambda q: q["total_s"])
            fastest_ttft = min(peers, key=lambda q: q["ttft_s"])
            r["vs_llama_cpp"] = {"ttft_row": fastest_ttft["row"], "ttft": fastest_ttft["ttft_s"] / r["ttft_s"],
                                 "e2e_row": best["row"], "e2e": best["total_s"] / r["total_s"]}
    for r in results:  # a speculating row against plain decoding and the llama.cpp rows, by decode speed
        row = next(x for x in rows if x.name == r["row"])
        if row.is_peer or not getattr(row, "speculative", None) or r["decode_tokens_per_s"] is None:
            continue
        same = [q for q in results if q["workload"] == r["workload"]]
        plain = next((q for q in same if q["row"] == r["row"].rsplit(f" {row.speculative}", 1)[0]), None)
        peers = [q for q in same if q["is_peer"] and q["precision"] == r["precision"] and q["decode_tokens_per_s"]]
        r["speculative"] = {"acceptance": float(np.median(r["samples"].get("acceptance") or [np.nan])),
                            "decode_vs_plain": r["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
                            if plain else None}
        for q in peers:
            r["speculative"][f"decode_vs {q['row']}"] = r["decode_tokens_per_s"] / q["decode_tokens_per_s"]
    by_key = {}
    for req in requests:
        by_key.setdefault(req.key, []).append({"prompt_tokens": len(req.ids), "new_tokens": req.new_tokens,
                                               "source": req.source, **req.detail})
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_flags": _cpu_flags()},
            "settings": {"reps": reps, "threads": threads, "interleaved": True, "llama_cpp_flash_attn": flash_attn},
            "requests": by_key, "checks": {**checks, "greedy_agreement": _agreement(first_tokens, rows)},
            "results": results}


def _cpu_flags() -> list[str]:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))


def format_table(report: dict[str, Any]) -> str:
    lines = [f"latency workload: median of {report['settings']['reps']} repetitions x requests, interleaved; "
             "vs llama.cpp = llama.cpp's time / starlift's (> 1: starlift faster), fastest llama.cpp row at the "
             "same precision",
             f"{'workload':<10} {'row':<40} {'prompt':>7} {'new':>4} {'TTFT ms':>9} {'decode tok/s':>12} "
             f"{'e2e ms':>9} {'TTFT vs llama.cpp':>18} {'e2e vs llama.cpp':>17}"]
    for r in report["results"]:
        reqs = report["requests"][r["workload"]]
        prompt = int(np.median([q["prompt_tokens"] for q in reqs]))
        new = reqs[0]["new_tokens"]
        vs = r.get("vs_llama_cpp")
        dec = f"{r['decode_tokens_per_s']:>12.1f}" if r["decode_tokens_per_s"] is not None else f"{'-':>12}"
        lines.append(f"{r['workload']:<10} {r['row']:<40} {prompt:>7} {new:>4} {r['ttft_s'] * 1e3:>9.1f} {dec} "
                     f"{r['total_s'] * 1e3:>9.1f} "
                     + (f"{vs['ttft']:>17.2f}x {vs['e2e']:>16.2f}x" if vs else f"{'-':>18} {'-':>17}"))
    for r in report["results"]:
        spec = r.get("speculative")
        if spec:
            ratios = ", ".join(f"{v:.2f}x {k.removeprefix('decode_vs ')}" for k, v in spec.items()
                               if k.startswith("decode_vs ") and v is not None)
            plain = f"{spec['decode_vs_plain']:.2f}x plain" if spec["decode_vs_plain"] else "no plain row"
            lines.append(f"{r['workload']}: {r['row']} decodes {plain}" + (f", {ratios}" if ratios else "")
                         + f" (acceptance {spec['acceptance']:.2f})")
    checks = report["checks"]
    if "llama_cpp_tokenizer_agrees" in checks:
        lines.append(f"llama.cpp tokenizes the held-out text as starlift does: {checks['llama_cpp_tokenizer_agrees']}")
    for pair, share in checks.get("greedy_agreement", {}).items():
        if share is not None:
            lines.append(f"same greedy tokens, {pair}: {share:.2f} of requests")
    return "\n".join(lines)
