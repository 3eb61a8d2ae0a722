"""Continued pretraining of a Hugging Face model (a tiny random Qwen2 built locally, no download): via
`4.pretrain.py --init_from` and via the CPTTrainer API; both save a model AutoModelForCausalLM reloads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mateconv.config import ConfigError, parse_config
from mateconv.cpt import CPTConfig, CPTTrainer, PackedTexts
from mateconv.train.stages import RECIPES, run
from conftest import losses

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny_qwen(tiny_tokenizer, tmp_path):
    """A randomly initialised 2-layer Qwen2 with the tiny tokenizer, saved like a downloaded model."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    path = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
    return path


def test_init_from_hf_model(tiny_qwen, tiny_flags, tmp_path):
    # model-shape flags (dim 64 etc. from tiny_flags, and a deliberately wrong n_layers) are ignored with init_from
    summary = run(RECIPES["pretrain"], parse_config(tiny_flags(tmp_path / "run", init_from=tiny_qwen, max_steps=8,
                                                               n_layers=7, learning_rate=3e-3)))
    curve = losses(tmp_path / "run")
    assert summary["step"] == 8 and curve[8] < curve[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").vocab_size == 512


def test_cpt_trainer_api(tiny_qwen, tiny_embedded_data, tmp_path):
    lines = (tiny_embedded_data / "pretrain_train.jsonl").read_text(encoding="utf-8").splitlines()[:150]
    texts = [json.loads(line)["text"] for line in lines]
    trainer = CPTTrainer(CPTConfig(model_name_or_path=str(tiny_qwen), max_length=64, learning_rate=3e-3,
                                   num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   use_muon_optimizer=True, use_gradient_checkpointing=True, use_bf16=False,
                                   output_dir=str(tmp_path / "cpt"), max_samples=100, max_steps=6))
    final_loss = trainer.train(texts)
    curve = losses(tmp_path / "cpt")
    assert final_loss == pytest.approx(curve[6]) and curve[6] < curve[1]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt" / "final")
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(reloaded.state_dict()[weight], original.state_dict()[weight])


def test_packed_texts_and_errors(tiny_qwen):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    texts = [" ".join(["to be or not to be"] * (1 + i % 2) + ["that is the question"] * (i % 3)) for i in range(120)]
    data = PackedTexts(texts, tokenizer, 64)
    rows = [data[i]["input_ids"].tolist() for i in range(len(data))]
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    starts = np.cumsum([0] + [len(doc) for doc in docs])[:-1].tolist()
    # rows of 64 tokens from the EOS-separated stream; fewer tokens are read without the beginning of their
    # document than in plain 63-token windows
    assert len(rows) > 10 and all(len(row) == 64 for row in rows)
    assert data.stream.tolist() == [token for doc in docs for token in doc]
    cut_off = sum(n for start, n in zip(data.piece_starts.tolist(), data.piece_lengths.tolist()) if start not in starts)
    by_windows = sum(start + len(doc) - (start + len(doc) - 1) // 63 * 63 for start, doc in zip(starts, docs)
                     if start // 63 != (start + len(doc) - 1) // 63)
    assert cut_off < 0.6 * by_windows, (cut_off, by_windows)
    with pytest.raises(ConfigError, match="fewer than one row"):
        PackedTexts(["short"], tokenizer, 4096)
    with pytest.raises(ConfigError, match="init_from: /nonexistent/model does not exist"):
        CPTTrainer(CPTConfig(model_name_or_path="/nonexistent/model")).train(["text"])
