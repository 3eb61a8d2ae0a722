"""`python -m mateconv.export` on a trained tiny model: the Llama directory and the GGUF file decode the same
greedy tokens as our own decoder (GGUF through llama.cpp itself, via llama-cpp-python); MoE is refused in one line."""
from __future__ import annotations

import subprocess
import sys

import jinja2
import pytest
import torch
from llama_cpp import Llama
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from mateconv.chat import load_model
from model.generation import generate_tokens

QUESTIONS = ["Which is larger, 14 or 6?", "12 千克等于多少克？"]
NEW_TOKENS = 12


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mateconv.export", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny_sft_model):
    """[(prompt ids, our greedy continuation up to and including EOS)] for each question."""
    model, tokenizer = load_model(tiny_sft_model, device="cpu", dtype="float32")
    cases = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        out = generate_tokens(model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, temperature=0,
                              eos_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        cases.append((list(prompt), out))
    return cases


def test_llama_directory(tiny_sft_model, reference, tmp_path):
    result = export(tiny_sft_model, "--to", "llama", "--out", tmp_path / "llama")
    assert result.returncode == 0, result.stderr[-2000:]
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    for prompt, ours in reference:
        out = llama.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(prompt):].tolist() == ours
    assert GenerationConfig.from_pretrained(tmp_path / "llama").do_sample is True  # servers sample by default
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "The answer is 14."}]
    plain = jinja2.Environment().from_string(tokenizer.chat_template).render(messages=messages,
                                                                             add_generation_prompt=False)
    assert plain == tokenizer.apply_chat_template(messages, tokenize=False) and "generation" not in plain


def test_moe_is_refused_in_one_line(tiny_moe_sft_model, tmp_path):
    result = export(tiny_moe_sft_model, "--to", "gguf", "--out", tmp_path / "gguf")
    assert result.returncode != 0 and not (tmp_path / "gguf").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("export: ") and "Mixture-of-Experts" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_in_llama_cpp(tiny_sft_model, reference, tmp_path, dtype):
    result = export(tiny_sft_model, "--to", "gguf", "--dtype", dtype, "--out", tmp_path / "gguf")
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "gguf" / f"model-{dtype}.gguf"
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft_model)
    eos = tokenizer.eos_token_id
    for question, (prompt, ours) in zip(QUESTIONS, reference):
        text = tokenizer.decode(prompt)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # the "gpt2" pre-tokenizer fits
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(int(token))
            if token == eos or len(theirs) == NEW_TOKENS:
                break
        if dtype == "q8_0":  # 8-bit weights: the first tokens must agree, later ones may drift
            assert theirs[:3] == ours[:3], (question, theirs, ours)
        else:
            assert theirs == ours, (question, theirs, ours)
    metadata = llm.metadata
    assert metadata["tokenizer.ggml.pre"] == "gpt-2" and int(metadata["llama.context_length"]) == 96
    template = metadata["tokenizer.chat_template"]  # the one llama.cpp applies: plain Jinja, no generation markers
    assert "<|im_start|>" in template and "endgeneration" not in template and "{% generation" not in template
