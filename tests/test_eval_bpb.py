"""Bits per byte on whole held-out documents (mateconv.logprobs.bits_per_byte) against a hand computation from the
model's logits, one forward per scored token."""
from __future__ import annotations

import math

import pytest
import torch

from mateconv.chat import load_model
from mateconv.evaluate.data import read_jsonl
from mateconv.logprobs import bits_per_byte, document_windows

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 512  # the tiny tokenizer's


def held_out_texts(tiny_embedded_data, n: int, chars: int | None = None) -> list[str]:
    texts = [record["text"] for record in read_jsonl(tiny_embedded_data / "pretrain_val.jsonl")[:n]]
    return [text[:chars] for text in texts] if chars else texts


def hand_nll(model, ids: list[int], start: int, window: int) -> float:
    """Each token at position t of [start] + ids predicted from the window holding it: windows start every
    window - 1 positions, so the token's context begins at ((t - 1) // (window - 1)) * (window - 1)."""
    sequence = [start] + ids
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(sequence)):
            begin = (t - 1) // (window - 1) * (window - 1)
            logits = model(input_ids=torch.tensor([sequence[begin:t]]), use_cache=False).logits[0, -1]
            nll -= float(torch.log_softmax(logits.double(), dim=-1)[sequence[t]])
    return nll


def test_document_windows_score_every_token_once():
    ids = list(range(10, 30))
    windows = document_windows(ids, [2], 8)
    scored = [token for window, unscored in windows for token in window[unscored:]]
    assert scored == ids
    assert all(len(window) <= 8 for window, _ in windows)
    assert [window[0] for window, _ in windows[1:]] == [window[-1] for window, _ in windows[:-1]]
    assert document_windows([], [2], 8) == []
    assert [w[u:] for w, u in document_windows([7], [1, 2], 8)] == [[7]]  # a longer start is context only


@pytest.mark.parametrize("window", [96, 16])
def test_bpb_equals_hand_computation(tiny_pretrain_model, tiny_embedded_data, window):
    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    texts = held_out_texts(tiny_embedded_data, 2, chars=120) + ["", "héllo wörld 你好"]
    result = bits_per_byte(model, tokenizer, texts, seq_len=window, batch_size=3)
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    nll = sum(hand_nll(model, ids, tokenizer.eos_token_id, window) for ids in encoded)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    assert result.tokens == sum(map(len, encoded)) and result.bytes == n_bytes and result.documents == 4
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.bpb == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)


def test_untrained_model_is_near_uniform_and_training_lowers_bpb(tiny_untrained_model, tiny_pretrain_model,
                                                                  tiny_embedded_data):
    texts = held_out_texts(tiny_embedded_data, 12)
    results = {}
    for name, path in (("untrained", tiny_untrained_model), ("pretrain", tiny_pretrain_model)):
        model, tokenizer = load_model(path, device="cpu")
        results[name] = bits_per_byte(model, tokenizer, texts, seq_len=96)
    untrained = results["untrained"]
    uniform = math.log2(VOCAB) * untrained.tokens / untrained.bytes  # a uniform guess over the vocabulary
    assert untrained.bpb == pytest.approx(uniform, rel=0.02)  # measured 0.5% above
    # 6 steps of pretraining already move off uniform (measured 4.22 against 4.59 bits/byte)
    assert results["pretrain"].bpb < 0.95 * untrained.bpb


def test_bpb_bad_arguments(tiny_pretrain_model):
    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    with pytest.raises(ValueError, match="no text to score"):
        bits_per_byte(model, tokenizer, ["", ""], seq_len=32)
    with pytest.raises(ValueError, match="start_ids must hold at least one token"):
        bits_per_byte(model, tokenizer, ["abc"], seq_len=32, start_ids=[])
