"""Evaluation metrics on tiny trained checkpoints: perplexity, expert-load balance, greedy replies, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mateconv.chat import load_model
from mateconv.evaluate import (EvalError, TextRecords, balance_stats, greedy_replies, read_jsonl, task_accuracy,
                               val_dataset)
from mateconv.logprobs import perplexity
from tiny_checkpoints import QA, checkpoint, load_tokenizer, single_thread, tasks_jsonl, texts_jsonl  # noqa: F401


def test_trained_model_has_lower_perplexity_than_untrained():
    results = {}
    for kind in ("untrained", "dense"):
        model, tokenizer = load_model(checkpoint(kind), device="cpu")
        results[kind] = perplexity(model, val_dataset(texts_jsonl(), tokenizer, 64), batch_size=4)
    untrained, trained = results["untrained"], results["dense"]
    assert untrained.tokens == trained.tokens > 0
    assert trained.ppl == pytest.approx(math.exp(trained.loss))
    # random init is near uniform over the vocabulary; the trained model has memorised these texts
    assert untrained.ppl > 0.5 * len(load_tokenizer())
    assert trained.ppl < 3.0
    assert untrained.expert_load is None


def test_perplexity_matches_model_loss():
    model, tokenizer = load_model(checkpoint("dense"), device="cpu")
    dataset = TextRecords(texts_jsonl(), tokenizer, 64)
    item = dataset[0]
    with torch.no_grad():
        loss = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
    single = torch.utils.data.Subset(dataset, [0])
    assert perplexity(model, single).loss == pytest.approx(float(loss), rel=1e-5)


def test_moe_expert_load_is_collected():
    model, tokenizer = load_model(checkpoint("moe"), device="cpu")
    result = perplexity(model, val_dataset(texts_jsonl(), tokenizer, 64), batch_size=4)
    load = torch.tensor(result.expert_load)
    assert load.shape == (model.config.n_layers, model.config.n_routed_experts)
    assert torch.allclose(load.sum(dim=1), torch.ones(model.config.n_layers), atol=1e-4)
    stats = balance_stats(result.expert_load)
    assert len(stats["cv"]) == model.config.n_layers and stats["cv_mean"] >= 0


def test_balance_stats_values():
    balanced = balance_stats([[0.25] * 4, [0.25] * 4])
    assert balanced["cv"] == pytest.approx([0.0, 0.0]) and balanced["max_min_worst"] == pytest.approx(1.0)
    skewed = balance_stats([[0.4, 0.2, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]])
    assert skewed["cv"][0] == pytest.approx(math.sqrt(0.0075) / 0.25)
    assert skewed["max_min"] == [pytest.approx(2.0), math.inf]


def test_greedy_replies_answer_the_learned_questions():
    model, tokenizer = load_model(checkpoint("dense"), device="cpu")
    replies = greedy_replies(model, tokenizer, [[{"role": "user", "content": q}] for q, _ in QA], max_new_tokens=8)
    assert replies == [a for _, a in QA]


def test_task_accuracy_uses_check_answer():
    model, tokenizer = load_model(checkpoint("dense"), device="cpu")
    result = task_accuracy(model, tokenizer, read_jsonl(tasks_jsonl()), max_new_tokens=8, batch_size=3)
    assert result.n == 7
    assert result.accuracy == pytest.approx(6 / 7)
    assert result.by_kind == {"add": pytest.approx(3 / 4), "word": 1.0}
    wrong = [row for row in result.rows if not row["correct"]]
    assert [(row["id"], row["response"]) for row in wrong] == [("task-val-wrong", "5")]
    with pytest.raises(EvalError, match="needs 'messages' and 'answer'"):
        task_accuracy(model, tokenizer, [{"id": "x", "messages": []}])


def test_bad_validation_inputs(tmp_path):
    tokenizer = load_tokenizer()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EvalError, match=r"broken.jsonl:2: not valid JSON"):
        val_dataset(broken, tokenizer, 32)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "x"}\n')
    with pytest.raises(EvalError, match="needs a 'text' string or a 'messages' list"):
        val_dataset(wrong, tokenizer, 32)
    with pytest.raises(EvalError, match="not a token shard directory"):
        val_dataset(tmp_path, tokenizer, 32)


def test_perplexity_over_stage3_shards(tmp_path):
    from mateconv.data.shards import build_shards

    from tiny_checkpoints import TEXTS, conversations, tokenizer_dir

    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    model, tokenizer = load_model(checkpoint("dense"), device="cpu")
    results = {}
    for kind in ("pretrain", "sft"):
        build_shards(kind, [tmp_path / f"{kind}.jsonl"], tokenizer_dir(), tmp_path / kind, workers=1, progress=False)
        results[kind] = perplexity(model, val_dataset(tmp_path / kind, tokenizer, 32), batch_size=4)
    assert results["pretrain"].tokens > 0 and results["pretrain"].ppl < 5.0  # texts it was trained on
    # SFT shards score only the assistant replies and their <|im_end|>
    answer_tokens = sum(len(tokenizer.encode(a, add_special_tokens=False)) + 1 for _, a in QA)
    assert results["sft"].tokens == answer_tokens
    assert results["sft"].ppl < 2.0
