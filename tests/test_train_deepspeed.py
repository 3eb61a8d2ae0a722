"""4.pretrain.py under the real DeepSpeed launcher on CPU with 2 ranks (gloo): ZeRO-2 and ZeRO-3 agree, loss falls,
a ZeRO checkpoint resumes exactly, ZeRO-3 gathers the full weights for the Hugging Face save, and `kill -2` on the
`deepspeed` command stops the run with a checkpoint."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, losses, read_metrics, single_thread_env

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="session")
def deepspeed_command(tiny_flags):
    """`deepspeed_command(out_dir, zero_stage, max_steps=STEPS, *extra)` -> 4.pretrain.py of the tiny MoE model on
    2 CPU ranks under the DeepSpeed launcher."""
    def command(out_dir: Path, zero_stage: int, max_steps: int = STEPS, *extra: str) -> list[str]:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        return [str(deepspeed), "--num_gpus", "2", "--master_port", str(29500 + zero_stage),
                str(REPO / "4.pretrain.py"),
                *tiny_flags(out_dir, max_steps=max_steps, save_interval_steps=4, eval_interval=4, use_moe=True,
                            engine="deepspeed", zero_stage=zero_stage), *extra]
    return command


@pytest.fixture(scope="session")
def launch(deepspeed_command):
    """`launch(out_dir, zero_stage, *extra, max_steps=STEPS)`: run `deepspeed_command` to the end; it must succeed."""
    def run(out_dir: Path, zero_stage: int, *extra: str, max_steps: int = STEPS) -> None:
        command = deepspeed_command(out_dir, zero_stage, max_steps, *extra)
        result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def zero_runs(launch, tmp_path_factory) -> dict[int, Path]:
    if shutil.which("deepspeed", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("the deepspeed launcher is not installed in this environment")
    root = tmp_path_factory.mktemp("zero")
    runs = {stage: root / f"zero{stage}" for stage in (2, 3)}
    for stage, out_dir in runs.items():
        launch(out_dir, stage)
    return runs


def test_zero2_and_zero3_fp32_losses_match_and_decrease(zero_runs):
    zero2, zero3 = losses(zero_runs[2]), losses(zero_runs[3])
    assert sorted(zero2) == sorted(zero3) == list(range(1, STEPS + 1))
    for step in zero2:
        assert zero2[step] == pytest.approx(zero3[step], abs=1e-5), step
    assert zero2[STEPS] < zero2[1] - 0.2


def test_torchrun_ddp_matches_zero2(zero_runs, tiny_flags, tmp_path):
    """The plain-PyTorch engine under torchrun (DDP over gloo) trains the same MoE model to the same losses."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29509", str(REPO / "4.pretrain.py"),
               *tiny_flags(tmp_path, max_steps=STEPS, save_interval_steps=4, eval_interval=4, use_moe=True)]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp, zero2 = losses(tmp_path), losses(zero_runs[2])
    assert sorted(ddp) == list(range(1, STEPS + 1))
    for step in ddp:
        assert ddp[step] == pytest.approx(zero2[step], abs=1e-5), step
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_zero3_final_model_is_gathered(zero_runs):
    from transformers import AutoModelForCausalLM

    import model as _registers_mateconv  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(zero_runs[3] / "final")
    assert model.config.use_moe and model.model.layers[0].mlp.experts[0].up_proj.weight.shape == (192, 64)
    twin = AutoModelForCausalLM.from_pretrained(zero_runs[2] / "final")
    for name, param in model.state_dict().items():
        assert param.allclose(twin.state_dict()[name], atol=1e-4), name


def test_zero2_checkpoint_resumes_exactly(zero_runs, launch, tmp_path):
    checkpoint = zero_runs[2] / "checkpoints" / "step_00000004"
    assert (checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # sharded optimizer state
    launch(tmp_path, 2, "--resume", str(checkpoint))
    resumed, full = losses(tmp_path), losses(zero_runs[2])
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-5), step


def test_kill_2_on_the_deepspeed_command_stops_with_a_checkpoint(deepspeed_command, launch, tmp_path):
    """The seeds' stop: `nohup deepspeed ... & echo $! > train.pid`, later `kill -2 $(ps -o pgid= -p $(cat train.pid))`,
    i.e. SIGINT to the `deepspeed` front process only (it leads its process group). It dies at once; the ranks notice
    their launcher was orphaned, save a checkpoint and exit, and the same command resumes."""
    out_dir = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        front = subprocess.Popen(deepspeed_command(out_dir, 2, 10_000, "--save_interval_steps", "10000",
                                                   "--eval_interval", "10000"),
                                 cwd=REPO, env=single_thread_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 300
        while not ((out_dir / "metrics.jsonl").exists() and len(losses(out_dir)) >= 3):
            assert front.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.5)
        workers = psutil.Process(front.pid).children(recursive=True)
        os.kill(front.pid, signal.SIGINT)
        front.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=180)
        for process in alive:
            process.kill()
    output = (tmp_path / "train.log").read_text()
    assert not alive, output[-3000:]
    assert "the DeepSpeed launcher was stopped" in output and "exits successfully" in output, output[-3000:]
    stopped_at = max(losses(out_dir))
    assert stopped_at < 10_000 and (out_dir / "checkpoints" / "latest").exists()

    launch(out_dir, 2, max_steps=stopped_at + 2)  # the same run, resumed from its checkpoint
    steps = [row["step"] for row in read_metrics(out_dir) if "loss" in row]
    assert steps == list(range(1, stopped_at + 3)), steps  # continued, not restarted
