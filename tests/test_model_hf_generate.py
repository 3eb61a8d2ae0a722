"""transformers' `generate()` on trained MateConv checkpoints agrees token for token with our own decoder
(`generate_tokens`) and with decoding without a KV cache: dense and MoE, greedy and sampling, left-padded batches.

A trained model matters here: with random weights the next token barely depends on the context, so a dropped KV
cache (transformers >= 5.24 passes it as `cache=`) went unnoticed while users got "The answer answer answer".
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model.generation import generate_tokens

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["dense", "moe"])
def trained(request, tiny_sft_model, tiny_moe_sft_model, tiny_embedded_data):
    """(model, tokenizer, left-padded batch of 4 held-out chat prompts of different lengths)."""
    path = tiny_sft_model if request.param == "dense" else tiny_moe_sft_model
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    records = [json.loads(line) for line in (tiny_embedded_data / "sft_val.jsonl").read_text().splitlines()]
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
               for r in records[:4]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1, "prompts of one length test no padding"
    return model, tokenizer, batch


def hf_generate(model, tokenizer, batch, **options) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **options)


def test_greedy_generate_matches_our_decoder_and_the_uncached_path(trained):
    model, tokenizer, batch = trained
    with_cache = hf_generate(model, tokenizer, batch, do_sample=False)
    without_cache = hf_generate(model, tokenizer, batch, do_sample=False, use_cache=False)
    ours = generate_tokens(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(with_cache, without_cache)
    width = min(ours.shape[1], with_cache.shape[1])  # both stop once every row has ended
    assert torch.equal(with_cache[:, :width], ours[:, :width])
    # the trained model answers: replies end with EOS and say "The answer is" / "答案是", not a repeated token
    replies = tokenizer.batch_decode(with_cache[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(("answer" in reply or "答案" in reply) for reply in replies) >= 3, replies
    assert all(len(set(reply.split())) > 1 for reply in replies if reply.strip()), replies


def test_sampling_with_cache_equals_sampling_without(trained):
    model, tokenizer, batch = trained
    options = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        samples.append(hf_generate(model, tokenizer, batch, use_cache=use_cache, **options))
    assert torch.equal(*samples)
    torch.manual_seed(124)
    assert not torch.equal(samples[0], hf_generate(model, tokenizer, batch, **options))


def test_seed_001_quick_start_samples_with_its_temperature(tmp_path, caplog):
    """Seed 001's quick start as written (its names, tiny sizes): `generate(ids, temperature=0.7, top_p=0.9)` samples
    (transformers' greedy default dropped both with a warning), do_sample=False stays greedy, and a saved model keeps
    sampling defaults in generation_config.json, as the exported ones do."""
    from model.LLMconfig import LLMconfig
    from model.model import LLM

    config = LLMconfig(vocab_size=320, dim=64, n_layers=2, n_heads=8, max_seq_len=256)
    model = LLM(config).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(0, 320, (1, 8))
    sampled = {tuple(model.generate(input_ids, max_new_tokens=12, temperature=0.7, top_p=0.9)[0].tolist())
               for _ in range(4)}
    assert len(sampled) > 1
    assert not [r for r in caplog.records if "not valid" in r.getMessage()]
    greedy = [model.generate(input_ids, max_new_tokens=12, do_sample=False) for _ in range(2)]
    assert torch.equal(*greedy)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["do_sample"], saved["temperature"], saved["top_p"]) == (True, 0.7, 0.9)


def test_static_cache_generates_as_the_dynamic_one(trained):
    """`generate(cache_implementation="static")`, the cache transformers compiles with, hands attention all its slots
    (it stopped with "The size of tensor a (61) must match the size of tensor b (21)"): a left-padded batch and one
    unpadded prompt (for which generate sends position ids and no attention mask)."""
    model, tokenizer, batch = trained
    for rows in (batch, {"input_ids": batch["input_ids"][batch["attention_mask"].sum(-1).argmax()][None]}):
        dynamic = hf_generate(model, tokenizer, rows, do_sample=False)
        assert torch.equal(hf_generate(model, tokenizer, rows, do_sample=False, cache_implementation="static"), dynamic)
