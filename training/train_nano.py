#!/usr/bin/env python
"""Train "starcoder2-nano": a ~6M-parameter StarCoder2 trained on the CPython standard library.

One seeded script: data collection and split, byte-level BPE tokenizer, FIM data packing,
training (wall-clock bounded), held-out evaluation, sample completions, and the checkpoint
folder (config.json, model.safetensors, tokenizer.json, generation_config.json, README.md,
loss_curve.png, training_record.json) written atomically through ``save_checkpoint``.

    .venv/bin/python training/train_nano.py --minutes 32 --threads 1 \
        --out starlift/checkpoints/starcoder2-nano

Fully deterministic for a fixed --precision and --steps (the defaults pick both from a short
speed benchmark, so they depend on the machine; the record says what was chosen).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# Keep every library on the thread budget before they start their pools.
_threads = "1"
for _i, _a in enumerate(sys.argv):
    if _a == "--threads" and _i + 1 < len(sys.argv):
        _threads = sys.argv[_i + 1]
    elif _a.startswith("--threads="):
        _threads = _a.split("=", 1)[1]
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
    os.environ[_v] = _threads
os.environ["TOKENIZERS_PARALLELISM"] = "false" if _threads == "1" else "true"

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

import starlift.model.modeling as modeling  # noqa: E402
from starlift.model import Starcoder2, Starcoder2Config, load_checkpoint, save_checkpoint  # noqa: E402

# StarCoder2's 38 special tokens, ids 0..37 in its tokenizer.json order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
    "<file_sep>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
    "<code_to_intermediate>", "<intermediate_to_code>", "<pr>", "<pr_status>", "<pr_is_merged>",
    "<pr_base>", "<pr_file>", "<pr_base_code>", "<pr_diff>", "<pr_diff_hunk>", "<pr_comment>",
    "<pr_event_id>", "<pr_review>", "<pr_review_state>", "<pr_review_comment>",
    "<pr_in_reply_to_review_id>", "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>",
    "<NAME>", "<EMAIL>", "<KEY>", "<PASSWORD>",
]
EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = 0, 1, 2, 3
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
# Generated / data-table modules, dropped from BOTH the training and the held-out set (the model
# otherwise learns codec boilerplate such as "0x0088: 0x0088,  #  LATIN CAPITAL LETTER"):
#  1. every file under these top-level stdlib packages (character-map codecs, pydoc's topic dump);
#  2. any other file in which more than DATA_LINE_MAX_FRACTION of the non-empty lines are "data
#     lines": after replacing each one-line string literal by S, dropping a trailing # comment and
#     replacing each decimal/hex number by N, the line holds nothing but S, N, whitespace and
#     , : ( ) [ ] { } + - and has at least one literal and at least one , or : (e.g. a dict entry
#     `0x0088: 0x0088,` / `'AElig': 0xc6,` or a row of a tuple/list of literals).
DATA_TABLE_DIRS = ("encodings", "pydoc_data")
DATA_LINE_MAX_FRACTION = 0.5
_STRING_LITERAL = re.compile(r"""[bBuUrRfF]{0,2}(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")""")
_NUMBER_LITERAL = re.compile(r"\b(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?)\b")
_DATA_LINE_REST = re.compile(r"^[\sSN,:()\[\]{}+-]*$")
HOLDOUT_MODULUS = 31  # a file is held out when sha256(relative path) % 31 == 0 (~3% of files, ~2% of bytes)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---- data ---------------------------------------------------------------------------------------
def is_data_line(line: str) -> bool:
    """True for a line that is only literals and separators (see the comment at DATA_TABLE_DIRS)."""
    s = _STRING_LITERAL.sub("S", line).split("#", 1)[0]
    s = _NUMBER_LITERAL.sub("N", s)
    return ("S" in s or "N" in s) and ("," in s or ":" in s) and bool(_DATA_LINE_REST.match(s))


def data_table_reason(rel: str, text: str) -> str | None:
    """Why a file counts as a generated / data-table module, or None for ordinary code."""
    if rel.split("/", 1)[0] in DATA_TABLE_DIRS:
        return f"under {rel.split('/', 1)[0]}/"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    frac = sum(map(is_data_line, lines)) / len(lines)
    if frac > DATA_LINE_MAX_FRACTION:
        return f"{frac:.0%} of non-empty lines are data lines"
    return None


def collect_files(stdlib: Path):
    """Sorted stdlib .py files (tests and data tables excluded), split into train / held-out by path hash."""
    rels = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for f in files:
            if f.endswith(".py"):
                rels.append(Path(root, f).relative_to(stdlib).as_posix())
    rels.sort()
    train, held, skipped, excluded = [], [], [], []
    for rel in rels:
        raw = (stdlib / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append({"path": rel, "sha256": sha256_bytes(raw), "reason": "not UTF-8"})
            continue
        if not text.strip():
            skipped.append({"path": rel, "sha256": sha256_bytes(raw), "reason": "empty"})
            continue
        reason = data_table_reason(rel, text)
        if reason is not None:
            excluded.append({"path": rel, "sha256": sha256_bytes(raw), "bytes": len(raw), "reason": reason})
            continue
        entry = {"path": rel, "sha256": sha256_bytes(raw), "bytes": len(raw), "text": text}
        is_held = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HOLDOUT_MODULUS == 0
        (held if is_held else train).append(entry)
    return train, held, skipped, excluded


def train_tokenizer(texts, vocab_size: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def encode(tok: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def epoch_stream(tok, train_texts, train_ids, rng: random.Random, fim_rate: float) -> tuple[np.ndarray, int]:
    """One pass over the training documents in a seeded order; a fim_rate share as PSM FIM."""
    order = list(range(len(train_texts)))
    rng.shuffle(order)
    fim_jobs, pieces = [], []
    for d in order:
        text = train_texts[d]
        if rng.random() < fim_rate:
            i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
            fim_jobs.append((len(pieces), text[:i], text[i:j], text[j:]))
            pieces.append(None)
        else:
            pieces.append(train_ids[d] + [EOT])
    flat = [s for _, p, m, s in fim_jobs for s in (p, s, m)]
    enc = encode(tok, flat) if flat else []
    for k, (slot, *_rest) in enumerate(fim_jobs):
        p, s, m = enc[3 * k], enc[3 * k + 1], enc[3 * k + 2]
        pieces[slot] = [FIM_PREFIX] + p + [FIM_SUFFIX] + s + [FIM_MIDDLE] + m + [EOT]
    stream = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64)
    return stream, len(fim_jobs)


class Batches:
    """Packed windows of seq_len + 1 tokens (stride seq_len), shuffled per epoch, seeded."""

    def __init__(self, tok, texts, ids, seq_len, batch, seed, fim_rate):
        self.tok, self.texts, self.ids = tok, texts, ids
        self.seq_len, self.batch, self.fim_rate = seq_len, batch, fim_rate
        self.rng = random.Random(seed)
        self.epoch, self.windows, self.pos = 0, None, 0
        self.epoch_info = []

    def _new_epoch(self):
        stream, n_fim = epoch_stream(self.tok, self.texts, self.ids, self.rng, self.fim_rate)
        n = (len(stream) - 1) // self.seq_len
        idx = np.arange(n) * self.seq_len
        perm = np.array(self.rng.sample(range(n), n))
        self.windows = [torch.from_numpy(stream[s:s + self.seq_len + 1].copy()) for s in idx[perm]]
        self.pos = 0
        self.epoch += 1
        self.epoch_info.append({"epoch": self.epoch, "tokens": int(len(stream)), "windows": n, "fim_docs": n_fim,
                                "docs": len(self.texts)})
        log(f"epoch {self.epoch}: {len(stream):,} tokens, {n} windows, {n_fim}/{len(self.texts)} docs as FIM")

    def next(self) -> torch.Tensor:
        out = []
        while len(out) < self.batch:
            if self.windows is None or self.pos >= len(self.windows):
                self._new_epoch()
            out.append(self.windows[self.pos])
            self.pos += 1
        return torch.stack(out)


# ---- model --------------------------------------------------------------------------------------
def _sdpa_attention(self, x, cos, sin, allowed, past):
    """Training fast path for starlift's Attention.forward: the same math (same projections,
    RoPE, GQA and window mask) through F.scaled_dot_product_attention, ~1.9x faster per step
    on one core because the (B, H, T, S) scores are never materialized in float32. Used only
    while training; evaluation and sampling run starlift's own module unpatched."""
    assert past is None
    b, t, _ = x.shape
    q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q = q * cos + modeling.rotate_half(q) * sin
    k = k * cos + modeling.rotate_half(k) * sin
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=True)
    return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)), (k, v)


class fast_attention:
    orig_forward = modeling.Attention.forward

    def __enter__(self):
        modeling.Attention.forward = _sdpa_attention

    def __exit__(self, *exc):
        modeling.Attention.forward = fast_attention.orig_forward


def check_fast_attention(model, batch):
    with torch.no_grad():
        ref, _ = model(batch[:, :-1])
        with fast_attention():
            fast, _ = model(batch[:, :-1])
    return (ref - fast).abs().max().item()


def init_weights(model: Starcoder2, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "c_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)


def lm_loss(model, batch: torch.Tensor, precision: str) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def make_optimizer(model, lr, wd, betas):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8)


def lr_at(step, total, peak, warmup, min_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def benchmark(model0, batches, args):
    """Time fp32 vs bf16 autocast for a few steps from the same init on the same batches."""
    res = {}
    data = [batches[i] for i in range(args.bench_steps + args.bench_warmup)]
    for precision in ("fp32", "bf16"):
        torch.manual_seed(args.seed)
        m = copy.deepcopy(model0).train()
        opt = make_optimizer(m, args.lr, args.weight_decay, (0.9, 0.95))
        losses, t0 = [], None
        for i, b in enumerate(data):
            if i == args.bench_warmup:
                t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(i, 1000, args.lr, args.warmup, 0.1)
            loss = lm_loss(m, b, precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), args.clip)
            opt.step()
            losses.append(loss.item())
        dt = (time.perf_counter() - t0) / args.bench_steps
        res[precision] = {"sec_per_step": dt, "tokens_per_sec": b[:, 1:].numel() / dt,
                          "losses": [round(v, 4) for v in losses]}
        log(f"bench {precision}: {dt:.3f} s/step, {b[:, 1:].numel() / dt:.0f} tok/s, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        del m, opt
    return res


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, held_ids, unigram_logp, seq_len):
    """Teacher-forced loss / top-1 on held-out files, each as [EOT] + file + [EOT] in windows."""
    model.eval()
    tot_loss = tot_correct = n = 0.0
    uni_loss = uni_correct = 0.0
    uni_top = int(np.argmax(unigram_logp))
    ulp = torch.from_numpy(unigram_logp)
    for ids in held_ids:
        seq = torch.tensor([EOT] + ids + [EOT])
        for s in range(0, len(seq) - 1, seq_len):
            w = seq[s:s + seq_len + 1]
            x, y = w[:-1][None], w[1:]
            logits, _ = model(x)
            lp = F.log_softmax(logits[0], -1)
            tot_loss += -lp.gather(1, y[:, None]).sum().item()
            tot_correct += (lp.argmax(-1) == y).sum().item()
            uni_loss += -ulp[y].sum().item()
            uni_correct += (y == uni_top).sum().item()
            n += len(y)
    return {"tokens": int(n), "loss": tot_loss / n, "top1": tot_correct / n, "ppl": math.exp(tot_loss / n),
            "unigram_loss": uni_loss / n, "unigram_top1": uni_correct / n}


def validation_batch(held_ids: list[list[int]], seq_len: int, count: int = 8) -> torch.Tensor:
    """The fixed held-out subset of the loss curve: the first ``count`` full windows of
    seq_len + 1 tokens, each file as [EOT] + file + [EOT]."""
    windows = []
    for ids in held_ids:
        seq = [EOT] + ids + [EOT]
        for s in range(0, len(seq) - 1, seq_len):
            if len(seq[s:s + seq_len + 1]) == seq_len + 1:
                windows.append(torch.tensor(seq[s:s + seq_len + 1]))
    return torch.stack(windows[:count])


@torch.no_grad()
def greedy(model, ids: list[int], max_new: int, ctx: int) -> list[int]:
    """Greedy decode with the model's KV cache; stops at <|endoftext|>."""
    model.eval()
    ids = ids[-(ctx - max_new):]
    x = torch.tensor([ids])
    mask = torch.ones(1, len(ids), dtype=torch.long)
    logits, past = model(x, attention_mask=mask)
    out = []
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        logits, past = model(torch.tensor([[nxt]]), attention_mask=mask, past=past)
    return out


def ast_prompt(text: str, target_lines: int = 10):
    """First ~10 lines, ending at a top-level statement boundary so the prompt itself parses."""
    try:
        body = ast.parse(text).body
    except SyntaxError:
        return None
    ends = sorted({s.end_lineno for s in body})
    if not ends:
        return None
    below = [e for e in ends if e <= target_lines]
    end = below[-1] if below else ends[0]
    lines = text.splitlines(keepends=True)
    prompt = "".join(lines[:end])
    if not prompt.endswith("\n"):
        prompt += "\n"
    try:
        ast.parse(prompt)
    except SyntaxError:
        return None
    return prompt, end


def ast_check(model, tok, held, n_files, max_new, ctx):
    results = []
    for f in held:
        if len(results) >= n_files:
            break
        pr = ast_prompt(f["text"])
        if pr is None:
            continue
        prompt, n_lines = pr
        gen = greedy(model, [EOT] + tok.encode(prompt, add_special_tokens=False).ids, max_new, ctx)
        text = tok.decode(gen, skip_special_tokens=False)
        ended = len(gen) < max_new  # the model emitted <|endoftext|>
        completion = text if ended else text[: text.rfind("\n") + 1]
        try:
            ast.parse(prompt + completion)
            ok = True
        except SyntaxError:
            ok = False
        results.append({"path": f["path"], "prompt_lines": n_lines, "completion": completion, "parses": ok,
                        "complete_lines": completion.count("\n"), "nonempty": bool(completion.strip())})
    return results


# ---- output -------------------------------------------------------------------------------------
def plot_curve(curve, val_curve, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c["tokens"] / 1e6 for c in curve], [c["loss"] for c in curve], label="train (mean over log interval)")
    if val_curve:
        ax.plot([c["tokens"] / 1e6 for c in val_curve], [c["loss"] for c in val_curve], "o-", label="held-out subset")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("starcoder2-nano training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fence(s: str) -> str:
    return "```python\n" + s.replace("```", "`\u200b``") + ("" if s.endswith("\n") else "\n") + "```"


def model_card(rec) -> str:
    h, c, ev, tr = rec["hyperparameters"], rec["config"], rec["eval"], rec["training"]
    d = rec["data"]
    ast_res = rec["ast_check"]
    n_ok = sum(r["parses"] for r in ast_res)
    n_nonempty_ok = sum(r["parses"] and r["nonempty"] for r in ast_res)
    bench = rec["benchmark"]
    lines = [
        "---", "license: other", "license_name: psf-2.0 (training data); model weights released with starlift",
        "library_name: starlift", "tags: [starcoder2, code, tiny, cpu]", "---", "",
        "# starcoder2-nano",
        "",
        "A tiny StarCoder2-architecture code model ({:.2f}M parameters) trained from scratch on one CPU "
        "core for {:.1f} minutes on the Python standard library. It is the default model bundled with "
        "starlift, meant for testing the ONNX export pipeline end to end with real (not random) "
        "weights. It is **not** a useful coding assistant.".format(rec["parameters"] / 1e6, tr["train_seconds"] / 60),
        "",
        "## Data",
        "",
        f"- Source: the `.py` files of the CPython {d['python_version']} standard library "
        f"(`sysconfig.get_paths()['stdlib']`), excluding `site-packages` and every `test`, `tests` and "
        f"`idle_test` directory (tests are dropped), sorted by path. Files that are not UTF-8 or are empty are skipped "
        f"({len(d['skipped'])} skipped).",
        f"- Generated / data-table modules are excluded from both the training and the held-out set "
        f"({len(d['excluded_data_tables'])} files, {d['excluded_data_tables_bytes'] / 1e6:.2f} MB removed; listed "
        "with the reason in `training_record.json` under `data.excluded_data_tables`): every file under "
        f"{', '.join(f'`{x}/`' for x in h['data_table_dirs'])} "
        f"({sum(e['reason'].startswith('under ') for e in d['excluded_data_tables'])} files: character-map codecs, "
        "pydoc's topic dump), plus any file in which more than "
        f"{h['data_line_max_fraction']:.0%} of the non-empty lines are *data lines* "
        f"({sum(not e['reason'].startswith('under ') for e in d['excluded_data_tables'])} files: "
        + ", ".join(f"`{e['path']}`" for e in d["excluded_data_tables"] if not e["reason"].startswith("under "))
        + "). A data line is one that, after replacing each one-line string literal by `S`, dropping a trailing "
        "`#` comment and replacing each decimal or hex number by `N`, contains only `S`, `N`, whitespace and "
        "`, : ( ) [ ] { } + -`, with at least one literal and at least one `,` or `:` (dict entries such as "
        "`0x0088: 0x0088,` or `'AElig': 0xc6,`, rows of literal tuples). Without this the data is dominated by "
        "such tables and greedy completions drift into codec boilerplate. No size cap is applied (the largest "
        "remaining file, `_pydecimal.py`, is ordinary code).",
        "- License of the data: Python Software Foundation License (PSF-2.0).",
        f"- Split: a file is held out when `int(sha256(relative_path), 16) % {HOLDOUT_MODULUS} == 0`: "
        f"{len(d['train'])} training files ({d['train_bytes'] / 1e6:.2f} MB), {len(d['held_out'])} held-out files "
        f"({d['held_out_bytes'] / 1e6:.2f} MB, {ev['tokens']:,} tokens), never trained on. The modulus keeps at least "
        "20 held-out files after the data-table exclusion (about 3% of the files, 2% of the bytes). The tokenizer is "
        "also trained on the training files only. `training_record.json` lists every file with its sha256.",
        f"- Documents are files, each followed by `<|endoftext|>` (id 0). {h['fim_rate']:.0%} of the documents of "
        "each epoch are rewritten in StarCoder2's fill-in-the-middle PSM format "
        "`<fim_prefix>prefix<fim_suffix>suffix<fim_middle>middle<|endoftext|>` with two uniformly random character "
        "split points (special tokens inserted as ids). Documents are packed into "
        f"{h['seq_len']}-token windows (longer than the {c['sliding_window']}-token sliding window).",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE, vocabulary {c['vocab_size']} (trained with `tokenizers` {rec['versions']['tokenizers']}), "
        "StarCoder2's 38 special tokens at ids 0-37 in StarCoder2's order (`<|endoftext|>`=0, `<fim_prefix>`=1, "
        "`<fim_middle>`=2, `<fim_suffix>`=3, ...). Pre-tokenizer as StarCoder2: digits split one by one, then ByteLevel; "
        "ByteLevel decoder; no special tokens added on encode. `decode(encode(text)) == text` holds for every held-out "
        f"file ({d['roundtrip_ok']}/{len(d['held_out'])}). The vocabulary is 8192 rather than 12288 so that the fp32 "
        "checkpoint stays well under 30 MB. The ids are *not* compatible with the real StarCoder2 tokenizer beyond "
        "the special tokens.",
        "",
        "## Architecture",
        "",
        f"Full StarCoder2 architecture (`Starcoder2ForCausalLM`): {c['num_hidden_layers']} layers, hidden "
        f"{c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_attention_heads']} attention heads with "
        f"{c['num_key_value_heads']} KV heads (GQA), head dim {c['hidden_size'] // c['num_attention_heads']}, RoPE "
        f"theta {c['rope_theta']:g}, sliding window {c['sliding_window']}, max positions "
        f"{c['max_position_embeddings']}, LayerNorm with bias (eps {c['norm_epsilon']}), biases in every linear, "
        f"`{c['hidden_act']}`, tied embeddings, bos = eos = 0, no pad token. "
        f"Parameters: {rec['parameters']:,} (fp32 weights {rec['weights_bytes'] / 1e6:.1f} MB).",
        "",
        "## Training",
        "",
        f"- Seed {rec['seed']}; AdamW (betas {h['betas']}, eps 1e-8, weight decay {h['weight_decay']} on matrices "
        f"only), peak LR {h['lr']:g}, linear warmup {h['warmup']} steps then cosine decay to {h['min_lr_ratio']:g}x "
        f"over the planned {tr['planned_steps']} steps (planned = wall-clock budget / (benchmarked s/step x "
        f"{h['plan_margin']:g}), so that the cosine schedule completes within the budget; the margin leaves room "
        f"for the periodic held-out loss and was 1.2 in earlier runs, which left ~13% of the budget unused), "
        f"gradient clipping {h['clip']}, batch {h['batch']} x "
        f"{h['seq_len']} tokens. Init: normal(0, 0.02), residual output projections scaled by 1/sqrt(2 x layers), "
        "zero biases, LayerNorm weight 1.",
        f"- Precision: {tr['precision']} (measured over {h['bench_steps']} steps from the same init: fp32 "
        f"{bench['fp32']['sec_per_step']:.2f} s/step, bf16 autocast {bench['bf16']['sec_per_step']:.2f} s/step; "
        f"{tr['precision_reason']}). During training only, attention runs through "
        "`F.scaled_dot_product_attention` with starlift's own window mask (same math, max logit difference "
        f"{rec['fast_attention_max_logit_diff_at_init']:.1e} at init); evaluation uses starlift's module unpatched.",
        f"- {tr['steps']} steps, {tr['tokens_seen']:,} tokens seen ({tr['epochs_started']} epoch(s) started, one epoch "
        f"~{rec['batches_epochs'][0]['tokens']:,} tokens), training loop {tr['train_seconds'] / 60:.1f} min at "
        f"{tr['tokens_per_second']:.0f} tokens/s on {h['threads']} thread(s) ({rec['machine']}); whole script "
        f"{rec['total_seconds'] / 60:.1f} min. Final train loss (last log interval) {tr['final_train_loss']:.3f}.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Evaluation (held-out files, never trained on)",
        "",
        f"Teacher forced, each file as `<|endoftext|>` + file + `<|endoftext|>` in {h['seq_len']}-token windows, "
        f"{ev['tokens']:,} predicted tokens. The unigram baseline uses token frequencies of the training files "
        "(add-one smoothed) and always predicts the most frequent token.",
        "",
        "| model | loss (nats/token) | perplexity | next-token top-1 |",
        "|---|---|---|---|",
        f"| starcoder2-nano | {ev['loss']:.3f} | {ev['ppl']:.2f} | {ev['top1']:.3f} |",
        f"| unigram baseline | {ev['unigram_loss']:.3f} | {math.exp(ev['unigram_loss']):.1f} | {ev['unigram_top1']:.3f} |",
        "",
        f"**Syntax check:** {n_ok}/{len(ast_res)} held-out files give a completion for which "
        f"`ast.parse(prompt + completion)` succeeds ({n_nonempty_ok} of them with a non-empty completion). Method: "
        "the prompt is the first lines of the file up to the last top-level statement that ends at or before line 10 "
        "(or the end of the first top-level statement when that is later, e.g. a long docstring), so the prompt parses "
        f"on its own; the model greedily generates up to {h['ast_new_tokens']} tokens after `<|endoftext|>` + prompt; "
        "the completion is trimmed to its last complete line (unless the model emitted `<|endoftext|>`); the first "
        "20 held-out files in path order with a parseable prompt are used.",
        "",
        "| file | prompt lines | complete lines generated | parses |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{r['path']}` | {r['prompt_lines']} | {r['complete_lines']} | {'yes' if r['parses'] else 'no'} |"
              for r in ast_res]
    lines += ["", "## Sample completions (greedy)", ""]
    for s in rec["samples"]:
        lines += [f"**{s['name']}**, prompt:", "", fence(s["prompt_display"]), "", "completion:", "",
                  fence(s["completion"]), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from starlift.model import load_checkpoint, Tokenizer",
        "model = load_checkpoint('starcoder2-nano')          # the bundled checkpoint",
        "tok = Tokenizer.from_pretrained('starcoder2-nano')",
        "```",
        "",
        "It also loads with `transformers.Starcoder2ForCausalLM.from_pretrained(folder)`.",
        "",
        "## Reproduce",
        "",
        "The command that produced this checkpoint (from the repository root):",
        "",
        "```bash",
        rec["command"],
        "```",
        "",
        "The default `--precision auto` and the step count depend on a speed benchmark on the machine; to replay "
        "this exact run deterministically pin both:",
        "",
        "```bash",
        rec["pinned_command"],
        "```",
        "",
        f"Software: Python {rec['versions']['python']}, torch {rec['versions']['torch']}, tokenizers "
        f"{rec['versions']['tokenizers']}, numpy {rec['versions']['numpy']}.",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="starlift/checkpoints/starcoder2-nano")
    ap.add_argument("--minutes", type=float, default=33.0, help="wall-clock budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="planned steps (default: from the benchmark and --minutes)")
    ap.add_argument("--plan-margin", type=float, default=1.1,
                    help="planned steps = budget / (benchmarked s/step x this); >1 leaves room for validation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--fim-rate", type=float, default=0.5)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--bench-steps", type=int, default=15)
    ap.add_argument("--bench-warmup", type=int, default=3)
    ap.add_argument("--ast-files", type=int, default=20)
    ap.add_argument("--ast-new-tokens", type=int, default=64)
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    # -- data
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held, skipped, excluded = collect_files(stdlib)
    log(f"stdlib {stdlib}: {len(train)} train files, {len(held)} held-out, {len(skipped)} skipped, "
        f"{len(excluded)} data-table files excluded ({sum(f['bytes'] for f in excluded) / 1e6:.2f} MB)")
    if len(held) < 20:
        log(f"WARNING: only {len(held)} held-out files")
    train_texts = [f["text"] for f in train]

    # -- tokenizer
    t0 = time.time()
    tok = train_tokenizer(train_texts, args.vocab)
    log(f"tokenizer trained in {time.time() - t0:.0f}s, vocab {tok.get_vocab_size()}")
    work = Path(tempfile.mkdtemp(prefix="starcoder2-nano-work-"))
    tok_path = work / "tokenizer.json"
    tok.save(str(tok_path))
    tok = HFTokenizer.from_file(str(tok_path))  # exactly what ships
    train_ids = encode(tok, train_texts)
    held_ids = encode(tok, [f["text"] for f in held])
    roundtrip_ok = sum(tok.decode(ids, skip_special_tokens=False) == f["text"] for ids, f in zip(held_ids, held, strict=False))
    assert roundtrip_ok == len(held), f"decode(encode(x)) != x for {len(held) - roundtrip_ok} held-out files"
    n_special_in_text = sum(sum(1 for t in ids if t < len(SPECIAL_TOKENS)) for ids in train_ids + held_ids)
    n_train_tok = sum(map(len, train_ids))
    log(f"train tokens {n_train_tok:,} ({sum(f['bytes'] for f in train) / n_train_tok:.2f} bytes/token), "
        f"held-out tokens {sum(map(len, held_ids)):,}, round trip ok {roundtrip_ok}/{len(held)}, "
        f"special ids inside file text: {n_special_in_text}")
    counts = np.bincount(np.concatenate([np.array(x + [EOT]) for x in train_ids]), minlength=args.vocab).astype(np.float64)
    unigram_logp = np.log((counts + 1) / (counts + 1).sum()).astype(np.float32)

    # -- model
    config = Starcoder2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, sliding_window=args.window, rope_theta=args.rope_theta, norm_epsilon=1e-5,
        use_bias=True, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", bos_token_id=EOT,
        eos_token_id=EOT, pad_token_id=None, torch_dtype="float32",
    )
    model = Starcoder2(config)
    init_weights(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == config.num_parameters(), (n_params, config.num_parameters())
    log(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB fp32)")

    batches = Batches(tok, train_texts, train_ids, args.seq_len, args.batch, args.seed, args.fim_rate)
    # The benchmark reads its own batches from a separately seeded stream: the real run is unaffected.
    bench_src = Batches(tok, train_texts, train_ids, args.seq_len, args.batch, args.seed + 1, args.fim_rate)
    bench_batches = [bench_src.next() for _ in range(args.bench_steps + args.bench_warmup)]
    attn_diff = check_fast_attention(model, bench_batches[0][:1])
    log(f"fast attention vs starlift attention: max |logit diff| {attn_diff:.2e}")
    assert attn_diff < 1e-4
    fast_attention().__enter__()
    bench = benchmark(model, bench_batches, args)
    f32, b16 = bench["fp32"], bench["bf16"]
    loss_gap = b16["losses"][-1] - f32["losses"][-1]
    behaves = abs(loss_gap) < 0.1 and all(math.isfinite(v) for v in b16["losses"])
    if args.precision == "auto":
        faster = b16["sec_per_step"] < 0.95 * f32["sec_per_step"]
        precision = "bf16" if faster and behaves else "fp32"
        reason = (f"bf16 autocast is {f32['sec_per_step'] / b16['sec_per_step']:.2f}x the speed of fp32, final "
                  f"benchmark loss gap {loss_gap:+.3f}; chose {precision}")
    else:
        precision, reason = args.precision, f"pinned with --precision {args.precision}"
    sec_per_step = (b16 if precision == "bf16" else f32)["sec_per_step"]
    budget = args.minutes * 60
    planned = args.steps or int(budget / (sec_per_step * args.plan_margin))
    log(f"precision {precision} ({reason}); planned steps {planned}")

    # -- train
    model.train()
    torch.manual_seed(args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95))
    val_batch = validation_batch(held_ids, args.seq_len)

    def val_loss():
        model.eval()
        with torch.no_grad():
            v = lm_loss(model, val_batch, "fp32").item()
        model.train()
        return v

    curve, val_curve, acc, acc_n = [], [], 0.0, 0
    tokens_seen, step = 0, 0
    stop_reason = "planned steps done"
    t_train = time.time()
    val_time = 0.0
    while step < planned:
        if time.time() - t_train > budget:
            stop_reason = "wall-clock budget reached"
            break
        lr = lr_at(step, planned, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        b = batches.next()
        loss = lm_loss(model, b, precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        opt.step()
        step += 1
        tokens_seen += b[:, 1:].numel()
        lv = loss.item()
        if not math.isfinite(lv):
            raise RuntimeError(f"loss is {lv} at step {step}")
        acc += lv
        acc_n += 1
        if step % args.log_every == 0 or step == planned:
            el = time.time() - t_train
            curve.append({"step": step, "tokens": tokens_seen, "loss": round(acc / acc_n, 4), "lr": lr,
                          "grad_norm": round(gnorm, 3), "seconds": round(el, 1)})
            log(f"step {step}/{planned} loss {acc / acc_n:.4f} lr {lr:.2e} gnorm {gnorm:.2f} "
                f"{tokens_seen / el:.0f} tok/s elapsed {el / 60:.1f} min")
            acc, acc_n = 0.0, 0
        if step % args.val_every == 0 or step == planned:
            tv = time.time()
            v = val_loss()
            val_time += time.time() - tv
            val_curve.append({"step": step, "tokens": tokens_seen, "loss": round(v, 4)})
            log(f"  held-out subset loss {v:.4f}")
    train_seconds = time.time() - t_train
    modeling.Attention.forward = fast_attention.orig_forward
    if acc_n:
        curve.append({"step": step, "tokens": tokens_seen, "loss": round(acc / acc_n, 4), "lr": lr,
                      "grad_norm": round(gnorm, 3), "seconds": round(train_seconds, 1)})
    log(f"training done: {step} steps, {tokens_seen:,} tokens, {train_seconds / 60:.1f} min ({stop_reason})")
    model.eval()

    # -- evaluation
    t0 = time.time()
    ev = evaluate(model, held_ids, unigram_logp, args.seq_len)
    log(f"held-out: loss {ev['loss']:.4f} top1 {ev['top1']:.4f} | unigram loss {ev['unigram_loss']:.4f} "
        f"top1 {ev['unigram_top1']:.4f} ({time.time() - t0:.0f}s)")
    ctx = config.max_position_embeddings
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    prompts = [
        ("function", "def fibonacci(n):\n"),
        ("class", "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):\n"),
        ("imports", "import os\nimport sys\n"),
    ]
    samples = []
    for name, p in prompts:
        gen = greedy(model, [EOT] + enc(p), 64, ctx)
        samples.append({"name": name, "prompt": p, "prompt_display": p, "completion": tok.decode(gen, skip_special_tokens=False)})
    fim_prefix = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n"
    fim_suffix = "\n\n\ndef sub(a, b):\n    return a - b\n"
    fim_ids = [EOT, FIM_PREFIX] + enc(fim_prefix) + [FIM_SUFFIX] + enc(fim_suffix) + [FIM_MIDDLE]
    gen = greedy(model, fim_ids, 32, ctx)
    samples.append({"name": "fill-in-the-middle (PSM)", "prefix": fim_prefix, "suffix": fim_suffix,
                    "prompt_display": f"<fim_prefix>{fim_prefix}<fim_suffix>{fim_suffix}<fim_middle>",
                    "completion": tok.decode(gen, skip_special_tokens=False)})
    for s in samples:
        log(f"sample {s['name']}:\n{s['prompt_display']}|||{s['completion']}")
    held_sorted = sorted(held, key=lambda f: f["path"])
    ast_res = ast_check(model, tok, held_sorted, args.ast_files, args.ast_new_tokens, ctx)
    n_ok = sum(r["parses"] for r in ast_res)
    log(f"ast: {n_ok}/{len(ast_res)} parse ({sum(r['parses'] and r['nonempty'] for r in ast_res)} non-empty)")

    # -- write the checkpoint folder
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, val_curve, work / "loss_curve.png")
    weights_bytes = n_params * 4
    argv = " ".join(sys.argv[1:])
    rel_script = "training/train_nano.py"
    command = f".venv/bin/python {rel_script} {argv}".strip()
    pinned_command = (f".venv/bin/python {rel_script} --minutes {args.minutes * 2:g} --threads {args.threads} "
                      f"--seed {args.seed} --precision {precision} --steps {planned} --out {args.out}")
    rec = {
        "model": "starcoder2-nano",
        "seed": args.seed,
        "command": command,
        "pinned_command": pinned_command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "hyperparameters": {**{k: v for k, v in vars(args).items()}, "betas": [0.9, 0.95],
                            "holdout_rule": f"int(sha256(relpath),16) % {HOLDOUT_MODULUS} == 0",
                            "excluded_dirs": sorted(EXCLUDED_DIRS),
                            "data_table_dirs": list(DATA_TABLE_DIRS),
                            "data_line_max_fraction": DATA_LINE_MAX_FRACTION,
                            "data_line_rule": "after one-line string literals -> S, trailing # comment dropped, "
                                              "numbers (decimal/hex) -> N: only S N whitespace , : ( ) [ ] { } + -, "
                                              "at least one literal and one , or :"},
        "config": config.to_hf(),
        "parameters": n_params,
        "weights_bytes": weights_bytes,
        "data": {
            "stdlib": str(stdlib), "python_version": platform.python_version(), "license": "PSF-2.0",
            "train": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in train],
            "held_out": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in held],
            "skipped": skipped,
            "excluded_data_tables": excluded,
            "excluded_data_tables_bytes": sum(f["bytes"] for f in excluded),
            "train_bytes": sum(f["bytes"] for f in train), "held_out_bytes": sum(f["bytes"] for f in held),
            "train_tokens": n_train_tok, "held_out_tokens": sum(map(len, held_ids)),
            "roundtrip_ok": roundtrip_ok, "special_ids_inside_text": n_special_in_text,
        },
        "batches_epochs": batches.epoch_info,
        "benchmark": bench,
        "training": {
            "precision": precision, "precision_reason": reason, "planned_steps": planned, "steps": step,
            "stop_reason": stop_reason, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
            "val_seconds": val_time, "tokens_per_second": tokens_seen / train_seconds,
            "epochs_started": batches.epoch,
            "final_train_loss": curve[-1]["loss"] if curve else float("nan"),
        },
        "loss_curve": curve,
        "val_curve": val_curve,
        "eval": ev,
        "fast_attention_max_logit_diff_at_init": attn_diff,
        "ast_check": ast_res,
        "samples": samples,
    }
    rec["total_seconds"] = time.time() - t_start
    (work / "training_record.json").write_text(json.dumps(rec, indent=1) + "\n")
    (work / "README.md").write_text(model_card(rec))
    extra = {name: work / name for name in ("tokenizer.json", "README.md", "loss_curve.png", "training_record.json")}
    save_checkpoint(model, out, force=True, extra_files=extra)
    for p in extra.values():
        p.unlink()
    work.rmdir()

    # -- check what was written
    back = load_checkpoint(out)
    x = torch.tensor([[EOT] + enc("import os\n")])
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])
    os.chmod(out, 0o755)
    for p in out.iterdir():
        os.chmod(p, 0o644)
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.2f} MB): {sorted(p.name for p in out.iterdir())}; total "
        f"{(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
