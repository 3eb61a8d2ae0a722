"""The 2gpu preset's run (`deepspeed --num_gpus=2`, ZeRO-2) on two CPU ranks (DS_ACCELERATOR=cpu) at the tiny size:
pretraining, `stop` during it and the resume; and a machine with fewer GPUs than the preset asks for."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
import pytest
from conftest import single_thread_env

from mateconv.files import read_metrics
from mateconv.pipeline import main

SMALL = """extends: 2gpu
stages:
  pretrain:
    config: configs/pretrain_tiny.yaml
    args: {vocab_size: 512, dim: 64, max_seq_len: 96, max_steps: 5000, save_interval_steps: 4, log_interval: 1,
           eval_interval: 1000, num_workers: 0}
"""


@pytest.mark.slow
def test_two_rank_pretraining_stop_and_resume(tiny_tokens, tiny_tokenizer, tmp_path):
    """`stop pretrain` under the launcher: its front process died of the SIGINT while the ranks saved, and the pipeline
    said `pretrain failed with exit code -2` (exit status 254) where a lone rank's stop is a stop to resume; the
    per-node launcher, signalled too, sent the ranks SIGTERM and would have killed them 30 s later, saved or not."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out/tokens").symlink_to(tiny_tokens)  # the data stages' outputs, as the pipeline's own names
    (tmp_path / "out/tokenizer").symlink_to(tiny_tokenizer)
    preset = tmp_path / "small2gpu.yaml"
    preset.write_text(SMALL)
    command = [sys.executable, "-m", "mateconv.pipeline", "run", "--preset", str(preset), "--only", "pretrain"]
    env = single_thread_env()
    metrics = tmp_path / "out/pretrain/metrics.jsonl"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and any(row.get("step", 0) >= 3 for row in read_metrics(metrics))):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.1)
    running = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "status"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert running.stdout.startswith("pretrain     running (pid "), running.stdout
    stop = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "stop", "pretrain"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "pretrain: stopped" in stop.stdout, stop.stdout + stop.stderr
    printed = first.communicate(timeout=60)[0]
    # a free port, not DeepSpeed's default 29500, which another run on the machine (GPUs 2,3 beside 0,1) may hold
    port = re.search(r"\[pipeline\] pretrain: \S+deepspeed --master_port=(\d+) ", printed)
    assert port and int(port.group(1)) != 29500, printed[:3000]
    assert first.returncode == 0 and "[pipeline] pretrain stopped before it finished" in printed, printed[-3000:]
    assert not [p.pid for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(tmp_path)]  # no rank left
    log = (tmp_path / "logs/pretrain.log").read_text()
    assert "KeyboardInterrupt" not in log and "Killing subprocess" not in log, log[-3000:]  # the launcher waited
    assert "DeepSpeed ZeRO-2, 2 rank(s)" in log and log.count("[pretrain] step 3/5000 ") == 1, log[-3000:]  # rank 0
    stopped_at = max(row["step"] for row in read_metrics(metrics))
    assert not (tmp_path / "out/pretrain/final").exists()
    status = subprocess.run([sys.executable, "-m", "mateconv.pipeline", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.stdout.startswith("pretrain     not running  step="), status.stdout

    # run again, to 3 steps past the checkpoint so that it ends soon (a run's length may change when it resumes)
    again = subprocess.run([*command, "--set", f"pretrain.max_steps={stopped_at + 3}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[train] resumed from out/pretrain/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in again.stdout
    steps = [row["step"] for row in read_metrics(metrics) if "loss" in row]
    assert max(steps) == stopped_at + 3 and steps.count(1) == 1, steps  # went on from the checkpoint, not from step 1
    assert (tmp_path / "out/pretrain/final/model.safetensors").exists()


def test_more_gpus_than_the_machine_has_is_one_line_before_any_stage(tmp_path, monkeypatch, capsys):
    """The launcher starts num_gpus ranks whatever it finds: with no GPU, CPU ranks that would train for days; with
    fewer, ranks whose GPU is not there fail once pretraining starts, after the data stages ran."""
    preset = tmp_path / "many.yaml"
    preset.write_text("extends: tiny\nnum_gpus: 64\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert main(["--preset", str(preset), "--only", "tokenizer,pretrain", "--logs", str(tmp_path / "logs")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the preset's num_gpus is 64 but ") and error.count("\n") == 1, error
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()
