"""A 2-rank DeepSpeed (ZeRO-2, CPU/gloo) DPO run with a precomputed reference completes, then resumes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL_FLAGS
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
