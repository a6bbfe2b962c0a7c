"""Shared fixtures: tiny checkpoints written by transformers itself, the shared tokenizer."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_TOKENIZER = SHARED / "starcoder2-tokenizer"

# Tiny configs in transformers' own tester shape (vocab 99, hidden 32, 2 layers, 4 heads).
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=16, bos_token_id=0,
            eos_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TINY_VARIANTS = {
    "gqa-window": {},
    "mha": dict(num_key_value_heads=4, sliding_window=None),
    "untied": dict(tie_word_embeddings=False, hidden_act="gelu", sliding_window=8),
    "gqa4-nobias": dict(num_key_value_heads=1, use_bias=False, sliding_window=5),
}


# Tests send Ctrl-C (SIGINT) to CLI subprocesses and expect it handled. A run started in the
# background by a non-interactive shell (`nohup ... &`, some CI runners) inherits SIGINT ignored,
# and an ignored signal stays ignored across exec, so every child would ignore Ctrl-C too (seen:
# `starlift generate --interactive` never saw it). Handled here, children get the default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def write_hf_checkpoint(path: Path, seed: int = 0, tokenizer: Path | None = None, **overrides) -> Path:
    """A random Starcoder2ForCausalLM saved by transformers' own save_pretrained."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (test extra)")
    torch.manual_seed(seed)
    config = transformers.Starcoder2Config(**{**TINY, **overrides})
    model = transformers.Starcoder2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1: randomize them to test them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer is not None:
        (path / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return path


def load_hf(path: Path):
    import transformers

    return transformers.Starcoder2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Verification stamps (starlift.core.artifact.stamp_path) go to a folder of this session, for
    the subprocesses too, never into the user's ~/.cache."""
    old = os.environ.get("STARLIFT_CACHE_DIR")
    os.environ["STARLIFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("starlift-cache"))
    yield
    if old is None:
        os.environ.pop("STARLIFT_CACHE_DIR", None)
    else:
        os.environ["STARLIFT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def nano_ort(tmp_path_factory) -> Path:
    """The bundled, trained starcoder2-nano exported once per session (ort flavour). Read-only:
    tests that change an artifact make their own."""
    from starlift.export import export_checkpoint

    out = tmp_path_factory.mktemp("nano") / "ort"
    export_checkpoint("starcoder2-nano", out, flavour="ort", progress=False)
    return out


@pytest.fixture(scope="session")
def engine_artifacts(tmp_path_factory) -> Path:
    """test_engine's tiny checkpoint (character tokenizer, window 16, context 2048) in ``ckpt``
    and its exports in ``ort`` and ``portable``, made once for the engine and speculative
    decoding tests. Read-only: a test that changes one copies it first."""
    from starlift.export import export_checkpoint
    from tests.test_engine import CONTEXT, write_char_tokenizer

    root = tmp_path_factory.mktemp("engine")
    ckpt = write_hf_checkpoint(root / "ckpt", seed=6, initializer_range=0.5, max_position_embeddings=CONTEXT)
    write_char_tokenizer(ckpt / "tokenizer.json")
    for flavour in ("ort", "portable"):
        export_checkpoint(ckpt, root / flavour, flavour=flavour, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def shared_tokenizer() -> Path:
    path = SHARED_TOKENIZER / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real StarCoder2 tokenizer lives in ../shared (present in CI, "
                    "not in a user's fresh clone)")
    return path


def ggml_vectors() -> list[tuple[str, list[int]]]:
    inp = SHARED_TOKENIZER / "ggml-vocab-starcoder.gguf.inp"
    out = SHARED_TOKENIZER / "ggml-vocab-starcoder.gguf.out"
    if not inp.is_file():
        return []
    cases = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if cases and cases[-1] == "":
        cases.pop()
    ids = out.read_text(encoding="utf-8").split("\n")[: len(cases)]
    return [(text, [int(x) for x in line.split()]) for text, line in zip(cases, ids, strict=True)]


def tgi_snapshots() -> list[dict]:
    folder = SHARED_TOKENIZER / "tgi"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A 4-layer tiny checkpoint (window 16) and its fp32 artifacts in both flavours, exported
    once for the parity and localization tests."""
    from starlift.export import export_checkpoint

    root = tmp_path_factory.mktemp("tiny4")
    ckpt = write_hf_checkpoint(root / "ckpt", seed=4, num_hidden_layers=4, initializer_range=0.3)
    arts = {flavour: root / flavour for flavour in ("portable", "ort")}
    for flavour, path in arts.items():
        export_checkpoint(ckpt, path, flavour=flavour, progress=False)
    return ckpt, arts


@pytest.fixture(scope="session")
def text_exports(tmp_path_factory, shared_tokenizer) -> tuple[Path, dict[str, Path]]:
    """A tiny checkpoint with the real StarCoder2 tokenizer (vocab 49152) and its fp32 artifacts
    in both flavours, exported once for the runner and generation-input tests (read-only)."""
    from starlift.export import export_checkpoint

    root = tmp_path_factory.mktemp("text")
    ckpt = write_hf_checkpoint(root / "ckpt", seed=3, tokenizer=shared_tokenizer, vocab_size=49152,
                               initializer_range=0.3)
    arts = {flavour: root / flavour for flavour in ("portable", "ort")}
    for flavour, path in arts.items():
        export_checkpoint(ckpt, path, flavour=flavour, progress=False)
    return ckpt, arts


@pytest.fixture(scope="session")
def signing(nano_ort, tmp_path_factory):
    """A signed copy of the nano (read-only for the tests), its signer's public key, and a public
    key that did not sign it: for the servers' --public-key tests."""
    pytest.importorskip("cryptography", reason="signatures need the cryptography package (the sign extra)")
    import shutil

    from starlift.core.signing import generate_keypair, sign_artifact

    root = tmp_path_factory.mktemp("signed")
    generate_keypair(root / "build.key")
    generate_keypair(root / "other.key")
    shutil.copytree(nano_ort, root / "signed")
    sign_artifact(root / "signed", root / "build.key")
    return {"artifact": root / "signed", "pub": root / "build.key.pub", "other": root / "other.key.pub"}
