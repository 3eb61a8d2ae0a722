"""A 2-rank DeepSpeed (ZeRO-2, CPU/gloo) DPO run with a precomputed reference completes, then resumes; under ZeRO-3
the ranks split an evaluation and measure what one rank does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL_FLAGS, read_metrics, single_thread_env
from mateconv.procs import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def launch(args: list[str], out_dir: Path) -> str:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    flags = [f for f in TINY_MODEL_FLAGS if f not in ("--engine", "torch")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
                             str(ROOT / "9.train_dpo.py"), *flags, "--zero_stage", "2", "--out_dir", str(out_dir),
                             *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_two_rank_deepspeed_dpo_completes_and_resumes(tiny_sft_model, tiny_tokens, tmp_path):
    out = tmp_path / "dpo"
    data = tmp_path / "dpo_tokens"  # a private copy: the reference cache is written next to the data
    shutil.copytree(tiny_tokens / "dpo", data)
    common = ["--init_from", str(tiny_sft_model), "--data_path", str(data / "train"), "--val_data_path",
              str(data / "val"), "--forget_data_paths", str(tiny_tokens / "sft" / "val"), "--batch_size", "4",
              "--learning_rate", "5e-4", "--save_interval_steps", "2", "--eval_interval", "2", "--eval_batches", "2",
              "--log_interval", "1", "--precompute_ref"]
    first = launch(common + ["--max_steps", "2"], out)
    assert (out / "final" / "config.json").is_file() and (out / "checkpoints").is_dir()
    caches = list((data / "train" / "ref_logps").iterdir())
    assert len(caches) == 1 and (caches[0] / "sums.npy").is_file()
    assert "resumed from" not in first

    second = launch(common + ["--max_steps", "4"], out)
    assert "resumed from" in second and "step 2" in second
    assert "reusing reference log-probs" in second  # the cache is not recomputed
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"rewards/accuracies"' in line]
    assert len(steps) == 4  # steps 1-4 each logged once, across the two runs
    assert (out / "forgetting.png").is_file()


def test_held_out_evaluation_is_split_over_ranks(tiny_flags, tiny_sft_model, tiny_untrained_model, tiny_tokens,
                                                 tmp_path):
    """Under ZeRO-3 on 2 ranks an evaluation's 5 held-out pairs and 5 forgetting rows are split over the ranks (each
    rank ran all of them), rank 1's last batch being padding (run on one row, weighing nothing, as ZeRO-3 needs as
    many forwards on each rank), and the step-0 metrics are those of one rank with another batch size. The reference
    is another model, so that rewards and KL are not 0."""
    from mateconv.config import parse_config
    from mateconv.train.stages import RECIPES, run

    def flags(out: Path, batch_size: int, **extra) -> list[str]:
        return tiny_flags(out, "dpo", init_from=str(tiny_sft_model), ref_model_path=str(tiny_untrained_model),
                          forget_data_paths=str(tiny_tokens / "sft" / "val"), batch_size=batch_size, max_steps=1,
                          eval_examples=5, eval_batches=0, dpo_kl_coef=0.2, dpo_sft_coef=0.5, **extra)

    ids = tmp_path / "ids"
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "tests" / "sample_ids_driver.py"), "dpo",
               *flags(tmp_path / "two", 2, engine="deepspeed", zero_stage=3)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**single_thread_env(), "SAMPLE_IDS_DIR": str(ids)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluations = 2  # the starting model's and step 1's
    for rank, rows in ((0, [0, 2, 4]), (1, [0, 1, 3])):  # rank 1's third row repeats row 0: padding
        read = (ids / f"held_out_rank{rank}.txt").read_text().splitlines()
        for data in (tiny_tokens / "dpo" / "val", tiny_tokens / "sft" / "val"):
            assert sorted(int(line.split()[1]) for line in read if line.split()[0] == str(data)) == sorted(
                rows * evaluations), (rank, data)

    run(RECIPES["dpo"], parse_config(flags(tmp_path / "one", 3), RECIPES["dpo"].defaults))
    one_rank, two_ranks = (read_metrics(tmp_path / name)[0] for name in ("one", "two"))
    keys = {"val_loss", "eval/kl_ref", "eval/nll/chosen", "eval/rewards/margins", "forget/sft_ppl"}
    assert one_rank["step"] == two_ranks["step"] == 0 and keys <= one_rank.keys()
    assert one_rank["eval/kl_ref"] > 0.1 and one_rank["eval/rewards/margins"] != 0
    for key, value in one_rank.items():
        if key.startswith(("val_loss", "eval/", "forget/")):
            assert two_ranks[key] == pytest.approx(value, rel=1e-6), key
