"""The reference model equals transformers' Starcoder2ForCausalLM on checkpoints transformers saved."""

from __future__ import annotations

import pytest
import torch

from starlift.model import Starcoder2Config, attention_allowed, default_position_ids, load_checkpoint
from tests.conftest import TINY_VARIANTS, load_hf, write_hf_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def pair(request, tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=3,
                               **TINY_VARIANTS[request.param])
    return load_checkpoint(path), load_hf(path)


def padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
        ids[row, : total - n] = 0
    return ids, mask


def test_full_pass_matches_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = ours(ids)
        b = ref(ids).logits
    assert (a - b).abs().max().item() <= TOL


def test_logits_to_keep_matches_transformers(pair):
    ours, ref = pair
    ids, mask = padded_batch([30, 17], ours.config.vocab_size, seed=5)
    pos = default_position_ids(mask, ids.shape[1])
    with torch.no_grad():
        full, _ = ours(ids, attention_mask=mask)
        a, _ = ours(ids, attention_mask=mask, logits_to_keep=2)
        b = ref(ids, attention_mask=mask, position_ids=pos, logits_to_keep=2).logits
    assert a.shape == (2, 2, ours.config.vocab_size)
    assert (a - b).abs().max().item() <= TOL
    assert (a - full[:, -2:]).abs().max().item() == 0


def test_left_padded_batch_matches_transformers(pair):
    ours, ref = pair
    ids, mask = padded_batch([30, 17, 5], ours.config.vocab_size)
    pos = default_position_ids(mask, ids.shape[1])
    with torch.no_grad():
        a, _ = ours(ids, attention_mask=mask)
        b = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= TOL
    # Each row also equals the same prompt run alone, without padding.
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        with torch.no_grad():
            alone, _ = ours(ids[row:row + 1, -n:])
        assert (alone[0] - a[row, -n:]).abs().max().item() <= TOL


def test_cached_decode_in_uneven_chunks_matches_one_pass(pair):
    ours, ref = pair
    ids, mask = padded_batch([60, 45], ours.config.vocab_size, seed=2)
    with torch.no_grad():
        full, _ = ours(ids, attention_mask=mask)
        pos = default_position_ids(mask, ids.shape[1])
        ref_full = ref(ids, attention_mask=mask, position_ids=pos).logits
        past = ours.empty_past(batch=2)
        outs, start = [], 0
        for size in [1, 3, 7, 2, 11, 1, 5, 30]:
            end = min(start + size, ids.shape[1])
            if start == end:
                break
            logits, past = ours(ids[:, start:end], attention_mask=mask[:, :end], past=past)
            outs.append(logits)
            start = end
        chunked = torch.cat(outs, dim=1)
    real = mask.bool()
    assert start == ids.shape[1]
    assert (chunked[real] - full[real]).abs().max().item() <= TOL
    assert (chunked[real] - ref_full[real]).abs().max().item() <= TOL


def test_window_is_crossed_and_matters(pair):
    """Guard that the parity tests exercise the window: without it the logits change."""
    ours, _ = pair
    if ours.config.sliding_window is None:
        pytest.skip("this variant has no sliding window")
    ids = torch.randint(0, ours.config.vocab_size, (1, 3 * ours.config.sliding_window))
    with torch.no_grad():
        windowed, _ = ours(ids)
        import dataclasses
        ours.config = dataclasses.replace(ours.config, sliding_window=None)
        try:
            unwindowed, _ = ours(ids)
        finally:
            ours.config = dataclasses.replace(ours.config, sliding_window=pair[1].config.sliding_window)
    assert (windowed - unwindowed).abs().max().item() > 1e-3


def test_attention_mask_function():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    allowed = attention_allowed(mask, query_len=2, window=3)[0, 0]
    # queries are slots 4 and 5; slot 4 sees 2,3,4; slot 5 sees 3,4,5; slot 0 is padding
    assert allowed.tolist() == [[False, False, True, True, True, False],
                                [False, False, False, True, True, True]]
    assert default_position_ids(mask, 6).tolist() == [[0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_finite_and_close(tiny_checkpoint, dtype):
    ref = load_checkpoint(tiny_checkpoint)
    half = load_checkpoint(tiny_checkpoint, dtype=dtype)
    assert half.model.embed_tokens.weight.dtype == dtype
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, _ = ref(ids)
        b, present = half(ids)
    assert b.dtype == torch.float32 and present[0][0].dtype == dtype
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.05


def test_config_roundtrip(tiny_checkpoint):
    config = Starcoder2Config.from_hf(tiny_checkpoint)
    assert Starcoder2Config.from_hf(config.to_hf()) == config
