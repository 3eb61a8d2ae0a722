"""Evaluation metrics on tiny trained checkpoints: perplexity, expert-load balance, greedy replies, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mateconv.chat import load_model
from mateconv.evaluate.data import EvalError, TextRecords, read_jsonl, val_dataset
from mateconv.evaluate.metrics import balance_stats, greedy_replies, task_accuracy
from mateconv.evaluate.models import ModelReport, model_kind
from mateconv.evaluate.report import win_rate_line, write_summary
from mateconv.logprobs import perplexity
from mateconv.tasks import check_answer
from mateconv.winrate import WinRate

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 512  # the tiny tokenizer's


def sft_val_perplexity(model_dir, tiny_tokens):
    model, tokenizer = load_model(model_dir, device="cpu")
    return perplexity(model, val_dataset(tiny_tokens / "sft" / "val", tokenizer, 96), batch_size=8)


def test_trained_model_has_lower_perplexity_than_untrained(tiny_sft_model, tiny_untrained_model, tiny_tokens):
    untrained = sft_val_perplexity(tiny_untrained_model, tiny_tokens)
    trained = sft_val_perplexity(tiny_sft_model, tiny_tokens)
    assert untrained.tokens == trained.tokens > 0
    assert trained.ppl == pytest.approx(math.exp(trained.loss))
    # random init is near uniform over the vocabulary; the SFT model knows the answer form of held-out replies
    assert untrained.ppl > 0.5 * VOCAB
    assert trained.ppl < 3.0  # measured 2.2
    assert untrained.expert_load is None


def test_perplexity_matches_model_loss(tiny_sft_model, tiny_embedded_data):
    model, tokenizer = load_model(tiny_sft_model, device="cpu")
    dataset = TextRecords(tiny_embedded_data / "pretrain_val.jsonl", tokenizer, 64)
    item = dataset[0]
    with torch.no_grad():
        loss = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
    single = torch.utils.data.Subset(dataset, [0])
    assert perplexity(model, single).loss == pytest.approx(float(loss), rel=1e-5)


def test_moe_expert_load_counts_the_real_tokens_only():
    """SFT rows (token_mask) padded to 48: the evaluated load is the share of the real tokens' picks, each batch
    weighted by its real tokens; the padding, most of these positions, counted before."""
    from model import MateConvConfig, MateConvForCausalLM

    torch.manual_seed(0)
    model = MateConvForCausalLM(MateConvConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                               max_seq_len=48, use_moe=True, n_routed_experts=4)).eval()
    lengths, rows, expected = [3, 30, 7, 12, 5], [], 0
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(3, 50, (n,))
            model(ids[None])
            expected = expected + model.expert_load() * n
            padded = torch.cat([ids, torch.zeros(48 - n, dtype=torch.long)])
            rows.append({"input_ids": padded, "labels": padded.masked_fill(torch.arange(48) >= n, -100),
                         "token_mask": (torch.arange(48) < n).long()})
    load = torch.tensor(perplexity(model, rows, batch_size=2).expert_load)
    torch.testing.assert_close(load, expected / sum(lengths))


def test_moe_expert_load_is_collected(tiny_moe_sft_model, tiny_tokens):
    result = sft_val_perplexity(tiny_moe_sft_model, tiny_tokens)
    load = torch.tensor(result.expert_load)
    assert load.shape == (2, 4)  # layers x routed experts of the tiny MoE model
    assert torch.allclose(load.sum(dim=1), torch.ones(2), atol=1e-4)
    stats = balance_stats(result.expert_load)
    cv = (load.std(dim=1, unbiased=False) / load.mean(dim=1)).tolist()
    assert stats["cv"] == pytest.approx(cv, rel=1e-4) and stats["cv_mean"] == pytest.approx(sum(cv) / 2, rel=1e-4)


def test_model_kind_of_ours_and_of_transformers_moe_models():
    """An MoE model exported to Qwen2-MoE (or any transformers MoE) is reported as MoE, as the model it came from."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    from model import MateConvConfig

    assert model_kind(MateConvConfig(use_moe=True)) == "moe" and model_kind(MateConvConfig()) == "dense"
    assert model_kind(Qwen2MoeConfig(num_experts=4)) == model_kind(MixtralConfig()) == "moe"
    assert model_kind(LlamaConfig()) == "dense"


def test_balance_stats_values():
    balanced = balance_stats([[0.25] * 4, [0.25] * 4])
    assert balanced["cv"] == pytest.approx([0.0, 0.0]) and balanced["max_min_worst"] == pytest.approx(1.0)
    skewed = balance_stats([[0.4, 0.2, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]])
    assert skewed["cv"][0] == pytest.approx(math.sqrt(0.0075) / 0.25)
    assert skewed["max_min"] == [pytest.approx(2.0), math.inf]


def test_summary_json_is_strict_json(tmp_path):
    """An idle expert (max/min inf) and a comparison the judge never answered (win rate NaN) are null in summary.json:
    NaN and Infinity are no JSON, and JavaScript's parser, for one, refuses them."""
    report = ModelReport("moe/final", "out/moe/final", "moe", 1.0, balance=balance_stats([[0.5, 0.5, 0.0, 0.0]]))
    report.win_rates.append(WinRate("moe/final", "sft/final", "judge", failed=3))
    assert '"win_rate": null' in win_rate_line(report.win_rates[0])  # the printed line too (it said NaN)
    write_summary([report], tmp_path)

    def refuse(constant: str):
        raise AssertionError(f"summary.json holds {constant}")
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    [model] = summary["models"]
    assert model["balance"]["max_min"] == [None] and model["load_max_min"] is None
    assert summary["win_rates"][0]["win_rate"] is None and summary["win_rates"][0]["failed"] == 3


def val_tasks(tiny_embedded_data) -> list[dict]:
    return read_jsonl(tiny_embedded_data / "tasks_val.jsonl")


def test_batched_greedy_replies_equal_one_prompt_at_a_time(tiny_sft_model, tiny_embedded_data, greedy_reply):
    model, tokenizer = load_model(tiny_sft_model, device="cpu")
    questions = [task["messages"][0]["content"] for task in val_tasks(tiny_embedded_data)[:6]]
    replies = greedy_replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                             max_new_tokens=12, batch_size=3)  # left-padded batches of prompts of different lengths
    assert replies == [greedy_reply(tiny_sft_model, q, 12)[0] for q in questions]


def test_replies_longer_than_the_context_are_one_line(tiny_pretrain_model, tmp_path):
    """--max_new_tokens at or above the model's context (96) fails that model in one line; it stopped the evaluation
    with a traceback (the whole prompt kept at 96, an empty one above)."""
    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    for tokens in (96, 200):
        with pytest.raises(EvalError, match=f"--max_new_tokens {tokens} leaves no room for a prompt in the model's "
                                            "context of 96 tokens"):
            greedy_replies(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=tokens)
    assert len(greedy_replies(model, tokenizer, [[{"role": "user", "content": "Hi " * 200}]], max_new_tokens=95)) == 1


def test_task_accuracy_uses_check_answer(tiny_sft_model, tiny_untrained_model, tiny_embedded_data):
    tasks = val_tasks(tiny_embedded_data)
    results = {}
    for name, path in (("untrained", tiny_untrained_model), ("trained", tiny_sft_model)):
        model, tokenizer = load_model(path, device="cpu")
        results[name] = task_accuracy(model, tokenizer, tasks, max_new_tokens=12, batch_size=20)
    trained = results["trained"]
    assert trained.n == len(tasks) == 60
    verdicts = [check_answer(task, row["response"]) for task, row in zip(tasks, trained.rows)]
    assert [row["correct"] for row in trained.rows] == verdicts
    assert trained.accuracy == pytest.approx(sum(verdicts) / len(tasks))
    for kind, accuracy in trained.by_kind.items():
        hits = [v for task, v in zip(tasks, verdicts) if task["kind"] == kind]
        assert accuracy == pytest.approx(sum(hits) / len(hits))
    # the SFT model answers held-out prompts in the data set's answer form, and some correctly (measured 15 of 60);
    # the untrained model never does
    assert all(row["response"].startswith(("The answer is", "答案是")) for row in trained.rows)
    assert trained.accuracy >= 0.1 and results["untrained"].accuracy == 0.0


def test_bad_validation_inputs(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EvalError, match=r"broken.jsonl:2: malformed JSON"):
        val_dataset(broken, tokenizer, 32)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "x"}\n')
    with pytest.raises(EvalError, match=r"wrong.jsonl:1: unknown record shape with keys \['prompt'\]"):
        val_dataset(wrong, tokenizer, 32)
    with pytest.raises(EvalError, match="not a token shard directory"):
        val_dataset(tmp_path, tokenizer, 32)


def test_perplexity_over_stage3_shards(tiny_sft_model, tiny_tokens, tiny_embedded_data):
    model, tokenizer = load_model(tiny_sft_model, device="cpu")
    pretrain = perplexity(model, val_dataset(tiny_tokens / "pretrain" / "val", tokenizer, 64), batch_size=8)
    assert pretrain.tokens > 0 and pretrain.ppl == pytest.approx(math.exp(pretrain.loss))
    # SFT shards score only the assistant replies and their <|im_end|>: the chat template's assistant mask counts them
    sft = perplexity(model, val_dataset(tiny_tokens / "sft" / "val", tokenizer, 96), batch_size=8)
    conversations = [record["messages"] for record in read_jsonl(tiny_embedded_data / "sft_val.jsonl")]
    masks = [tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)["assistant_masks"]
             for messages in conversations]
    assert sft.tokens == sum(sum(mask[:96]) for mask in masks)
    assert sft.ppl < 3.0


def test_pretrain_shards_are_scored_whole_whatever_the_length(tiny_pretrain_model, tiny_tokens):
    """Every token of the validation stream is scored once, at any sequence length: the last row, which the
    training packer leaves out when the stream does not fill it, is kept and padded (label -100 on the padding).
    One longer than the whole shard still scores it (it used to score nothing)."""
    from mateconv.data.shards import shard_info

    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    shards = tiny_tokens / "pretrain" / "val"
    stream = shard_info(shards)["num_tokens"]
    for length in (16, 64, 95, stream + 40):
        dataset = val_dataset(shards, tokenizer, length)
        rows = [dataset[i] for i in range(len(dataset))]
        assert all(len(row["input_ids"]) == len(row["labels"]) == length for row in rows)
        assert sum(int((row["labels"][1:] != -100).sum()) for row in rows) == stream
        padding = rows[-1]["labels"] == -100
        assert (rows[-1]["input_ids"][padding] == dataset.pad_id).all()
        assert rows[-1]["token_mask"].tolist() == (~padding).long().tolist()  # padding is no MoE expert load
    assert {perplexity(model, val_dataset(shards, tokenizer, length)).tokens for length in (16, 95)} == {stream}


def test_a_record_longer_than_the_sequence_is_scored_whole(tiny_pretrain_model, tiny_embedded_data, tmp_path):
    """--val FILE.jsonl: a document of more than --seq_len tokens is scored in rows that overlap by one token (every
    token after its first, once), not cut to its first seq_len tokens."""
    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    text = read_jsonl(tiny_embedded_data / "pretrain_val.jsonl")[0]["text"][:200]
    held_out = tmp_path / "long.jsonl"
    held_out.write_text(json.dumps({"text": text}) + "\n")
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(ids) > 40
    result = perplexity(model, TextRecords(held_out, tokenizer, 16), batch_size=4)
    nll = 0.0
    with torch.no_grad():  # by hand: token t predicted from the row that holds it, rows starting every 15 tokens
        for t in range(1, len(ids)):
            begin = (t - 1) // 15 * 15
            logits = model(input_ids=torch.tensor([ids[begin:t]]), use_cache=False).logits[0, -1]
            nll -= float(torch.log_softmax(logits.double(), dim=-1)[ids[t]])
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
