"""Tiny real checkpoints for the inference tests (serve, chat, evaluate).

A byte-level BPE tokenizer trained here with `tokenizers` (ChatML special tokens at ids 0/1/2), and tiny MateConv
models (dense and MoE) trained for a few plain-PyTorch AdamW steps until they answer a handful of fixed questions.
Built once per test session (the functions are cached), in a temporary directory.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Questions the tiny models learn to answer (the tests check these replies).
QA = [
    ("What is 2+3?", "5"),
    ("What is 4+4?", "8"),
    ("Say hello.", "hello world"),
    ("Name a colour.", "blue"),
    ("Capital of France?", "Paris"),
    ("What is 7+2?", "9"),
]
TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "a small model learns to answer simple questions.",
    "numbers: one two three four five six seven eight nine ten.",
    "paris is the capital of france; blue is a colour.",
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models on shared CPU cores run fastest on one thread (import this fixture into a test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mateconv-inference-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]


@functools.cache
def tokenizer_dir() -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = TEXTS + [f"user\n{q}\nassistant\n{a}\n" for q, a in QA]
    bpe.train_from_iterator(corpus * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    out = root() / "tokenizer"
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def training_sequences(tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations()]
    texts = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in TEXTS]
    return [list(ids) for ids in chats + texts]


@functools.cache
def checkpoint(kind: str = "dense", steps: int = 120) -> Path:
    """A tiny MateConv model + tokenizer saved with save_pretrained. kind: "dense" or "moe" (trained), "untrained",
    or "slow" (untrained, wider and with a 1024-token context: long generations for the concurrency tests)."""
    from model import MateConvConfig, MateConvForCausalLM

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    moe = {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1} if kind == "moe" else {}
    size = dict(dim=256, n_layers=4, max_seq_len=1024) if kind == "slow" else dict(dim=64, n_layers=2, max_seq_len=128)
    config = MateConvConfig(vocab_size=len(tokenizer), n_heads=4, n_kv_heads=2, **size, **moe)
    model = MateConvForCausalLM(config)
    if kind in ("dense", "moe"):
        sequences = training_sequences(tokenizer)
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        labels = torch.tensor([s + [-100] * (width - len(s)) for s in sequences])
        attention_mask = (labels != -100).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(steps if kind == "dense" else steps // 3):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    out = root() / kind
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@functools.cache
def texts_jsonl() -> Path:
    """Validation texts for perplexity (the training texts and conversations, so a trained model scores well)."""
    path = root() / "val_texts.jsonl"
    lines = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    lines += [{"id": f"c{i}", "messages": c} for i, c in enumerate(conversations())]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@functools.cache
def tasks_jsonl() -> Path:
    """Verifiable prompts in the stage-2 tasks format: the learned questions, plus one whose recorded answer the
    model cannot give (so a trained dense model scores exactly 6/7)."""
    kinds = {"What is 2+3?": "add", "What is 4+4?": "add", "What is 7+2?": "add"}
    records = [{"id": f"task-val-{i}", "kind": kinds.get(q, "word"), "messages": [{"role": "user", "content": q}],
                "answer": a} for i, (q, a) in enumerate(QA)]
    records.append({"id": "task-val-wrong", "kind": "add", "messages": [{"role": "user", "content": QA[0][0]}],
                    "answer": "6"})
    path = root() / "tasks_val.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
