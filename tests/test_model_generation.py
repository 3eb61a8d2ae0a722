"""Generation: KV cache vs full recompute, the fixed-shape decode step against the growing-cache path and
transformers' `generate` (eager and compiled), sampling flags, EOS, batching, streaming text."""
from __future__ import annotations

import pytest
import torch

from model import MateConvConfig, MateConvForCausalLM
from model.export import to_llama
from model.generation import (KVCache, SamplingConfig, apply_repetition_penalty, decode_step, detokenize,
                              filter_top_k_top_p, generate_tokens, stream_text)

TEXTS = ["你好，世界！今天天气很好。🌞🌈", "小模型也能学会说话 😀👍🏽", "hello world, 中文 and emoji 🎉 mixed"]


def tiny_model(use_moe: bool = False, vocab_size: int = 97, seed: int = 0, std: float = 0.02) -> MateConvForCausalLM:
    """std 0.3 instead of 0.02: the next token depends on the context (at 0.02 a random model repeats one token,
    whatever it attends to), so a decoder that attends to the wrong keys gives other tokens."""
    torch.manual_seed(seed)
    config = MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=96,
                            use_moe=use_moe, initializer_range=std)
    return MateConvForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_matches_full_recompute(use_moe):
    model = tiny_model(use_moe)
    prompt = torch.randint(3, 97, (2, 7))
    generated = generate_tokens(model, prompt, max_new_tokens=15, temperature=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(15):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated, sequence)
        # logits: prefill + one token at a time through our cache == one full forward, appending (growing shapes)
        # and in the fixed-shape decode step (whole 30-slot buffers, the 8 unwritten slots masked), SDPA and math
        for fixed, sdpa in ((False, True), (True, True), (True, False)):
            for layer in model.model.layers:
                layer.self_attn.use_sdpa = sdpa
            cache = KVCache(2, 2, 2, 16, 30, torch.device("cpu"), torch.float32)
            steps = [model(sequence[:, :10], cache=cache, use_cache=True).logits]
            if fixed:
                cache.start_decoding(None)
                steps += [decode_step(model, cache, sequence[:, i])[:, None] for i in range(10, 22)]
            else:
                steps += [model(sequence[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(10, 22)]
            assert (torch.cat(steps, dim=1) - model(sequence).logits).abs().max() < 1e-4


def test_left_padded_batch_matches_single_prompts():
    model = tiny_model()
    short, long = torch.randint(3, 97, (1, 5)), torch.randint(3, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    out = generate_tokens(model, batch, max_new_tokens=10, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 4:], generate_tokens(model, short, max_new_tokens=10, temperature=0)[0])
    assert torch.equal(out[1], generate_tokens(model, long, max_new_tokens=10, temperature=0)[0])


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt, or three of lengths 4, 9 and 6 left-padded with id 0 -> (input_ids, attention_mask)."""
    lengths = (4, 9, 6) if padded else (7,)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, 97, (length,))
        mask[row, -length:] = 1
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_fixed_shape_decoding_matches_growing_cache_and_hf_generate(padded):
    """MateConv decodes with the fixed-shape step; the exported Llama goes through the growing DynamicCache path of
    the same loop; transformers' `generate` runs MateConv's own forward with its cache. Same greedy tokens, also
    when EOS ends one row early (the others go on, the ended row is padded) and then all rows."""
    model = tiny_model(std=0.3)
    llama = to_llama(model).eval()
    for generating in (model, llama):
        generating.generation_config.eos_token_id = None
    torch.manual_seed(1)
    ids, mask = prompts(padded)
    free = generate_tokens(model, ids, max_new_tokens=14, temperature=0, attention_mask=mask)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 3])
    assert eos not in new[0, :3].tolist() and (not padded or eos not in new[1:].flatten().tolist()), \
        "pick another seed: the EOS token must first appear in row 0 at step 4 and nowhere in the other rows"
    for eos_id in (None, eos):
        options = dict(max_new_tokens=14, attention_mask=mask, eos_token_id=eos_id, pad_token_id=0)
        fixed = generate_tokens(model, ids, temperature=0, **options)
        assert torch.equal(fixed, generate_tokens(llama, ids, temperature=0, **options))
        assert torch.equal(fixed, model.generate(ids, do_sample=False, **options))
    ended = fixed[0, ids.shape[1]:]
    assert torch.equal(ended[:4], new[0, :4]) and (ended[4:] == 0).all()
    if padded:
        assert torch.equal(fixed[1:], free[1:])  # the other rows go on
    else:
        assert fixed.shape[1] == ids.shape[1] + 4  # stops once every row has ended


def test_fixed_shape_sampling_matches_growing_cache():
    model = tiny_model(std=0.3)
    llama = to_llama(model).eval()
    ids, mask = prompts(padded=True)

    def sample(generating, seed: int) -> torch.Tensor:
        return generate_tokens(generating, ids, max_new_tokens=12, temperature=1.0, top_k=20, attention_mask=mask,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(model, 5), sample(llama, 5))
    assert not torch.equal(sample(model, 5), sample(model, 6))


@pytest.mark.usefixtures("single_thread")
def test_compiled_decode_step_gives_the_same_tokens():
    """torch.compile of the decode step (inductor on CPU; CUDA graphs on CUDA): the same greedy tokens as eager; a
    second call with other prompt lengths and padding reuses the compiled graph and the pooled cache."""
    model = tiny_model(std=0.3)
    batches = [prompts(padded=True), (torch.randint(3, 97, (3, 11)), torch.ones(3, 11, dtype=torch.long))]
    for index, (ids, mask) in enumerate(batches):
        eager = generate_tokens(model, ids, max_new_tokens=16, temperature=0, attention_mask=mask, compile=False)
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            compiled = generate_tokens(model, ids, max_new_tokens=16, temperature=0, attention_mask=mask,
                                       compile=True)
        assert torch.equal(compiled, eager)


def test_top_k_one_equals_greedy_and_seeds_reproduce():
    model = tiny_model()
    prompt = torch.randint(3, 97, (3, 6))
    greedy = generate_tokens(model, prompt, max_new_tokens=12, temperature=0)
    top1 = generate_tokens(model, prompt, max_new_tokens=12, temperature=1.5, top_k=1,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)

    def sample(seed: int) -> torch.Tensor:
        return generate_tokens(model, prompt, max_new_tokens=12, temperature=1.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert not torch.equal(sample(7), greedy)


def test_tiny_temperature_and_top_p_sample_the_most_likely_token():
    """OpenAI takes any temperature in (0, 2] and top_p in (0, 1]: logits / 1e-40 overflow float32 and a top_p below
    float32's smallest number is 0, which must still give the best token, not NaN probabilities."""
    model = tiny_model()
    prompt = torch.randint(3, 97, (2, 6))
    greedy = generate_tokens(model, prompt, max_new_tokens=8, temperature=0)
    for temperature, top_p in ((1e-40, 1.0), (1.0, 1e-50)):
        sampled = generate_tokens(model, prompt, max_new_tokens=8, temperature=temperature, top_p=top_p,
                                  generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled, greedy), (temperature, top_p)


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, top_k=2, top_p=1.0)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=0, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=0, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logits, top_k=0, top_p=0.81)) == [True, True, True, False]


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    # a strong penalty stops greedy decoding from repeating any token of the prompt or its own output
    model = tiny_model()
    prompt = torch.randint(3, 97, (1, 4))
    out = generate_tokens(model, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1e4)[0].tolist()
    assert len(set(out)) == len(out)


def test_eos_stops_each_row_and_pads():
    model = tiny_model()
    prompt = torch.randint(3, 97, (2, 5))
    free = generate_tokens(model, prompt, max_new_tokens=12, temperature=0)
    eos = int(free[0, 8])  # row 0 emits this token at its 4th step
    out = generate_tokens(model, prompt, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=0)
    first = free[0, 5:].tolist().index(eos)
    assert out[0, 5 + first] == eos and (out[0, 6 + first:] == 0).all()
    if eos not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1])
    solo = generate_tokens(model, prompt[:1], max_new_tokens=12, temperature=0, eos_token_id=eos)
    assert solo.shape[1] == 5 + first + 1  # stops as soon as every row ended


def test_invalid_sampling_and_context_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_tokens(tiny_model(), torch.zeros(1, 90, dtype=torch.long), max_new_tokens=10)


def test_detokenize_waits_for_complete_characters(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        pieces = list(detokenize(tokenizer, ids))
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in piece for piece in pieces)
    # an emoji is several byte-level tokens: it must come out whole, in one piece
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1 and list(detokenize(tokenizer, ids)) == ["🎉"]
    # cut inside it, the emoji's bytes are dropped; continuing a prompt cut inside it, they complete it (no text)
    assert "".join(detokenize(tokenizer, tokenizer.encode("a") + ids[:-1])) == "a"
    assert "".join(detokenize(tokenizer, ids[-1:] + tokenizer.encode("b"), context=ids[:-1])) == "b"


def test_stream_text_concatenates_to_the_full_decode(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), seed=3)
    prompt = tokenizer.encode(TEXTS[0])[:6]
    options = dict(max_new_tokens=30, temperature=0.8, top_p=0.95)
    pieces = list(stream_text(model, tokenizer, prompt, generator=torch.Generator().manual_seed(0), **options))
    full = generate_tokens(model, torch.tensor([prompt]), eos_token_id=tokenizer.eos_token_id,
                           generator=torch.Generator().manual_seed(0), **options)[0, 6:].tolist()
    if tokenizer.eos_token_id in full:
        full = full[: full.index(tokenizer.eos_token_id)]
    assert len(pieces) > 1 and "".join(pieces) == tokenizer.decode(full, skip_special_tokens=True)
