"""Stage 7's dpo_pairs.jsonl is accepted as it is by `datasets`, by TRL 1.16 (its format checks and a real
DPOTrainer step) and by stage 3 (`build_shards("dpo", ...)` read back with DPOTokens)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mateconv.prefs import PrefsConfig, run
from mateconv.tasks import check_answer
from prefs_fake_server import FakeOpenAI, tasks

N_PROMPTS = 8


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    """Pairs judged by the known answers and the (fake) judge model together (--judge both)."""
    root = tmp_path_factory.mktemp("prefs_formats")
    prompts = root / "tasks.jsonl"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in tasks(N_PROMPTS)))
    fake = FakeOpenAI()
    try:
        run(PrefsConfig(prompts_path=str(prompts), n_prompts=N_PROMPTS, output_dir=str(root / "prefs"),
                        generator_base_url=fake.url, generator_model="gen", judge_base_url=fake.url,
                        judge_model="judge", progress=False), env={})
    finally:
        fake.close()
    return root / "prefs" / "dpo_pairs.jsonl"


def test_both_judges_combine_and_records_are_self_describing(pairs_path):
    records = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    assert len(records) == N_PROMPTS
    for record in records:
        assert record["judge"] == "both" and record["judge_error"] is None
        assert record["judge_scores"] == {"rule": [10.0, 1.0, 1.0, 1.0], "model": [9.0, 7.0, 5.0, 3.0]}
        assert record["scores"] == pytest.approx([10.9, 1.7, 1.5, 1.3])  # correctness first, then the model
        assert record["rationale"][0] == "matches the known answer; checked the sum"
        task = next(t for t in tasks(N_PROMPTS) if t["id"] == record["id"])
        assert check_answer(task, record["chosen"][0]["content"])
        assert not check_answer(task, record["rejected"][0]["content"])
        assert record["settings"]["k_samples"] == 4 and record["settings"]["temperature"] == 0.7


def test_datasets_and_trl_accept_the_pairs(pairs_path, tiny_tokenizer, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    dataset = load_dataset("json", data_files=str(pairs_path), split="train")
    assert dataset.num_rows == N_PROMPTS and {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    for example in dataset:
        assert is_conversational(example)
        rendered = maybe_apply_chat_template(example, tokenizer)
        assert rendered["prompt"] == tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True,
                                                                   tokenize=False)
        assert rendered["chosen"] == example["chosen"][0]["content"] + "<|im_end|>\n"
        assert rendered["rejected"] == example["rejected"][0]["content"] + "<|im_end|>\n"

    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert tokenizer.decode(first["chosen_ids"]) == dataset[0]["chosen"][0]["content"] + "<|im_end|>\n"
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_stage3_tokenizes_the_pairs(pairs_path, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from mateconv.data.shards import DPOTokens
    from mateconv.data.tokenizing import build_shards

    result = build_shards("dpo", [pairs_path], tiny_tokenizer, tmp_path / "tokens", workers=1, progress=False)
    assert result.bad_records == [] and result.index["complete"]
    tokens = DPOTokens(tmp_path / "tokens", seq_len=64)
    assert len(tokens) == N_PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    contents = {json.loads(line)["chosen"][0]["content"] for line in pairs_path.read_text().splitlines()}
    decoded = set()
    for item in tokens:
        labels = item["chosen_labels"]
        decoded.add(tokenizer.decode(labels[labels != -100], skip_special_tokens=True))
    assert decoded == contents
