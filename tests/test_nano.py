"""The bundled starcoder2-nano: loads everywhere by name, equals transformers on it, its
tokenizer round-trips the held-out files and keeps StarCoder2's FIM ids."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
import torch

import starlift
from starlift.model import Tokenizer, bundled_checkpoints, load_checkpoint, resolve_checkpoint

NANO = "starcoder2-nano"


@pytest.fixture(scope="module")
def folder() -> Path:
    assert NANO in bundled_checkpoints(), "starcoder2-nano must ship inside the package"
    return resolve_checkpoint(NANO)


def test_bundle_is_small_and_complete(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "loss_curve.png", "training_record.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 30 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["sliding_window"] < config["max_position_embeddings"]
    assert config["tie_word_embeddings"] and config["hidden_act"] == "gelu_pytorch_tanh"


def test_matches_transformers(folder):
    transformers = pytest.importorskip("transformers")
    ours = load_checkpoint(NANO)
    hf = transformers.Starcoder2ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = Tokenizer.from_pretrained(NANO)
    ids = torch.tensor([tok.encode(Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text())[:400]])
    assert ids.shape[1] > ours.config.sliding_window  # crosses the window
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


def test_tokenizer_roundtrips_held_out_files_and_fim_ids(folder):
    tok = Tokenizer.from_pretrained(NANO)
    assert [tok.token_id(t) for t in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")] == [1, 2, 3]
    record = json.loads((folder / "training_record.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    checked = 0
    for entry in record["data"]["held_out"]:
        path = stdlib / entry["path"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            continue  # another Python version: not the file the model held out
        text = path.read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text
        checked += 1
    if checked == 0:
        pytest.skip("this Python's standard library differs from the one starcoder2-nano was trained on")
    assert checked == len(record["data"]["held_out"])


def test_name_resolves_everywhere(nano_ort):
    """The bundled name works for the model, the tokenizer, the torch backend and the exporter
    (the session's nano_ort fixture is `export_checkpoint("starcoder2-nano", ...)`)."""
    assert load_checkpoint(NANO).config.vocab_size == Tokenizer.from_pretrained(NANO).vocab_size
    gen = starlift.load(NANO, backend="torch")
    assert isinstance(gen.generate("def add(a, b):", max_new_tokens=8), str)
    manifest = json.loads((nano_ort / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["source"]["checkpoint"] == NANO
    assert (nano_ort / "tokenizer.json").is_file()
    art = starlift.load(nano_ort)
    assert art.generate("import os\n", max_new_tokens=12) == gen.generate("import os\n", max_new_tokens=12)
