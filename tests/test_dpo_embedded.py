"""DPO after SFT on the embedded verifiable data set: held-out reward accuracy goes up, greedy task accuracy is
measured, and the forgetting curves (held-out pretraining/SFT perplexity) are logged and plotted."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL_FLAGS
from mateconv.config import parse_config
from mateconv.train.dpo import STAGE_DEFAULTS, DPOObjective, DPOSettings, preference_eval, run

pytestmark = pytest.mark.slow


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model  # noqa: F401  registers MateConv

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_dpo_after_sft_improves_held_out_preferences_and_tasks(tiny_sft_model, tiny_tokens, tiny_embedded_data,
                                                               tmp_path):
    from mateconv.data.shards import DPOTokens
    from mateconv.evaluate import task_accuracy

    tasks = [json.loads(line) for line in (tiny_embedded_data / "tasks_train.jsonl").read_text().splitlines()][:40]
    sft, tokenizer = load(tiny_sft_model)
    before = task_accuracy(sft, tokenizer, tasks, max_new_tokens=12).accuracy

    out = tmp_path / "dpo"
    config = parse_config(TINY_MODEL_FLAGS + [
        "--init_from", str(tiny_sft_model), "--data_path", str(tiny_tokens / "dpo" / "train"),
        "--val_data_path", str(tiny_tokens / "dpo" / "val"), "--out_dir", str(out),
        "--forget_data_paths", f"{tiny_tokens / 'pretrain' / 'val'},{tiny_tokens / 'sft' / 'val'}",
        "--batch_size", "16", "--learning_rate", "5e-4", "--max_steps", "60", "--warmup_iters", "0",
        "--eval_interval", "30", "--save_interval_steps", "60", "--eval_batches", "4", "--log_interval", "10",
        "--dpo_beta", "0.1",
    ], STAGE_DEFAULTS)
    summary = run(config)
    assert summary["step"] == 60 and not summary["stopped"]

    dpo, _ = load(out / "final")
    held_out = DPOTokens(tiny_tokens / "dpo" / "val", 96)
    reward = preference_eval(dpo, DPOObjective(DPOSettings(beta=0.1), reference=sft), held_out, 16, None, "cpu")
    # the reference prefers neither side (all rewards 0, accuracy 0); after DPO most unseen pairs are ranked right
    assert reward["rewards/accuracies"] > 0.55, reward
    assert reward["rewards/margins"] > 0
    after = task_accuracy(dpo, tokenizer, tasks, max_new_tokens=12).accuracy
    # measured, not asserted: this 0.13M-parameter model is too weak for DPO to raise greedy task accuracy (see report)
    print(f"greedy task accuracy on 40 training tasks: SFT {before:.3f} -> DPO {after:.3f}")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "forget/pretrain_ppl" in r]
    assert [r["step"] for r in evals][0] == 0 and evals[-1]["step"] == 60
    assert all(r["forget/sft_ppl"] > 1 and "eval/rewards/accuracies" in r for r in evals)
    assert evals[-1]["eval/rewards/accuracies"] > evals[0]["eval/rewards/accuracies"]
    trained = [r for r in rows if "rewards/margins" in r]
    assert trained and all(key in trained[-1] for key in ("loss", "rewards/chosen", "rewards/rejected",
                                                          "rewards/accuracies", "logps/chosen", "logps/rejected",
                                                          "kl_ref"))
    assert (out / "forgetting.png").stat().st_size > 10_000
