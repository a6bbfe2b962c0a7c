"""The real StarCoder2 tokenizer (../shared) through starlift's Tokenizer."""

from __future__ import annotations

import pytest

from starlift.model import Tokenizer
from tests.conftest import ggml_vectors, tgi_snapshots

VECTORS = ggml_vectors()


@pytest.fixture(scope="module")
def tok(shared_tokenizer):
    return Tokenizer.from_file(shared_tokenizer)


def test_all_46_vectors_present(shared_tokenizer):
    assert len(VECTORS) == 46


@pytest.mark.parametrize("index", range(46))
def test_vector_encodes_roundtrips_and_streams(tok, index):
    if index >= len(VECTORS):
        pytest.skip("../shared/starcoder2-tokenizer vectors are absent")
    text, expected = VECTORS[index]
    ids = tok.encode(text)
    assert ids == expected
    assert tok.decode(ids) == text
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    for piece in pieces:  # never half a UTF-8 character
        piece.encode("utf-8")
        assert "\ufffd" not in piece or "\ufffd" in text


def test_tgi_snapshots_decode_exactly(tok):
    snaps = tgi_snapshots()
    if not snaps:
        pytest.skip("../shared/starcoder2-tokenizer/tgi is absent")
    checked = 0
    for snap in snaps:
        for item in snap if isinstance(snap, list) else [snap]:
            ids = [t["id"] for t in item["details"]["tokens"]]
            assert tok.decode(ids) == item["generated_text"]
            stream = tok.stream()
            assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == item["generated_text"]
            checked += 1
    assert checked >= 4


def test_stream_holds_back_split_utf8(tok):
    text = "naïve 😀 日本語"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_fim_tokens_and_prompt(tok):
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>")] == [0, 1, 2, 3]
    ids = tok.encode_fim("def f(x):\n    return ", "\n")
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids
    assert tok.decode(ids) == tok.fim_prompt("def f(x):\n    return ", "\n")


def test_bad_tokenizer_file(tmp_path):
    from starlift.core.errors import CheckpointError

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizers JSON"):
        Tokenizer.from_file(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
