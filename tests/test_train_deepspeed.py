"""4.pretrain.py under the real DeepSpeed launcher on CPU with 2 ranks (gloo): ZeRO-0 to ZeRO-3 agree with DDP on the
losses and the gradient norm before clipping and with one rank on the validation loss, loss falls, a ZeRO checkpoint
resumes exactly, ZeRO-3 gathers the full weights for the Hugging Face save, and `kill -2` on the `deepspeed` command
stops the run with a checkpoint. Faults: a NaN on one rank is skipped by all, a full disk on one rank during a save
and a torn newest checkpoint are survived, and the stop file stops a run started from a non-interactive shell."""
from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, losses, read_metrics, single_thread_env
from mateconv.procs import free_port, group_alive
from test_train_faults import TWO_RANK_NAN_STEPS, check_halted_after_step_4, two_rank_nan_inputs

pytestmark = pytest.mark.slow
STEPS = 8
GRAD_CLIP = 0.5  # below every gradient norm of these runs: a norm measured after clipping would show it
LAUNCH_PORTS: set[int] = set()  # deepspeed_command's master ports (free ones: other test modules run beside these)


@pytest.fixture(scope="session")
def deepspeed_command(tiny_flags):
    """`deepspeed_command(out_dir, zero_stage, max_steps=STEPS, *extra, script=4.pretrain.py)` -> the tiny MoE model
    on 2 CPU ranks under the DeepSpeed launcher."""
    def command(out_dir: Path, zero_stage: int, max_steps: int = STEPS, *extra: str,
                script: Path = REPO / "4.pretrain.py") -> list[str]:
        deepspeed, port = Path(sys.executable).with_name("deepspeed"), free_port()
        LAUNCH_PORTS.add(port)
        return [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), str(script),
                *tiny_flags(out_dir, max_steps=max_steps, save_interval_steps=4, eval_interval=4, use_moe=True,
                            engine="deepspeed", zero_stage=zero_stage, grad_clip=GRAD_CLIP), *extra]
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
    runs = {stage: root / f"zero{stage}" for stage in (0, 1, 2, 3)}
    for stage, out_dir in runs.items():
        launch(out_dir, stage, "--eval_at_start")
    return runs


@pytest.fixture(scope="module")
def ddp_run(tiny_flags, tmp_path_factory) -> Path:
    """The plain-PyTorch engine under torchrun (DDP over gloo) on the same MoE model and data."""
    out_dir = tmp_path_factory.mktemp("ddp")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "4.pretrain.py"),
               *tiny_flags(out_dir, max_steps=STEPS, save_interval_steps=4, eval_interval=4, use_moe=True,
                           grad_clip=GRAD_CLIP)]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir


def metric(out_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(out_dir) if key in row}


def test_zero_stages_fp32_losses_match_and_decrease(zero_runs):
    reference = losses(zero_runs[2])
    assert sorted(reference) == list(range(1, STEPS + 1))
    for stage, out_dir in zero_runs.items():
        for step, loss in losses(out_dir).items():
            assert loss == pytest.approx(reference[step], abs=1e-5), (stage, step)
    assert reference[STEPS] < reference[1] - 0.2


def test_cpu_ranks_leave_no_shared_memory_behind(zero_runs):
    """DeepSpeed's CPU all-reduce buffer (66 MB per rank, in RAM-backed /dev/shm) is removed when each rank exits:
    before, every CPU run left its ranks' buffers until the memory was full."""
    left = [path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")
            if int(path.name.split("_")[-2]) in LAUNCH_PORTS]
    assert len(LAUNCH_PORTS) >= len(zero_runs) and left == []


def test_torchrun_ddp_matches_zero2(zero_runs, ddp_run):
    """The plain-PyTorch engine under torchrun (DDP over gloo) trains the same MoE model to the same losses."""
    ddp, zero2 = losses(ddp_run), losses(zero_runs[2])
    assert sorted(ddp) == list(range(1, STEPS + 1))
    for step in ddp:
        assert ddp[step] == pytest.approx(zero2[step], abs=1e-5), step
    assert (ddp_run / "final" / "model.safetensors").exists()


def test_every_zero_stage_reports_the_grad_norm_before_clipping(zero_runs, ddp_run):
    """The same losses, so the same gradients: every ZeRO stage logs DDP's norm, measured before clipping (above
    grad_clip). ZeRO-0 logged NaN: DeepSpeed measures no norm for the torch optimizer it steps as it is."""
    reference = metric(ddp_run, "grad_norm")
    assert sorted(reference) == list(range(1, STEPS + 1)) and min(reference.values()) > GRAD_CLIP
    for stage, out_dir in zero_runs.items():
        norms = metric(out_dir, "grad_norm")
        for step, norm in reference.items():
            assert norms[step] == pytest.approx(norm, rel=1e-4), (stage, step)


def test_validation_loss_does_not_depend_on_ranks(zero_runs, tiny_flags, tmp_path):
    """The starting model's validation loss (step 0) on 2 ranks is that of 1 rank: the sampler pads the 9 rows to 10
    by repeating one, which counted twice moved it by 2e-4 (relative); ZeRO-3 runs the padded batch's forward too."""
    from mateconv.config import parse_config
    from mateconv.train.stages import RECIPES, run

    run(RECIPES["pretrain"], parse_config(tiny_flags(tmp_path, max_steps=1, use_moe=True, eval_at_start=True),
                                          RECIPES["pretrain"].defaults))
    one_rank = metric(tmp_path, "val_loss")[0]
    for stage, out_dir in zero_runs.items():
        assert metric(out_dir, "val_loss")[0] == pytest.approx(one_rank, rel=1e-6), stage


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


@pytest.mark.parametrize("saved, asked", [(2, 3), (3, 2)])
def test_resuming_under_another_zero_stage_is_one_line(zero_runs, deepspeed_command, tmp_path, saved, asked):
    """DeepSpeed's loader ended in a bare AssertionError (state_dict_factory.check_ckpt_list)."""
    checkpoint = zero_runs[saved] / "checkpoints" / "step_00000004"
    command = deepspeed_command(tmp_path, asked, STEPS, "--resume", str(checkpoint))
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert (f"pretrain: resume: {checkpoint} was saved under ZeRO-{saved}, this run has --zero_stage {asked}: resume "
            f"with --zero_stage {saved} (on any number of ranks)") in output, output[-3000:]


def test_a_zero3_checkpoint_is_a_model_source(zero_runs, tiny_flags, tmp_path):
    """A stopped ZeRO run has checkpoints but no final/: chat/export said "no model at ...", --init_from "Should have
    a model_type key in its config.json". Its weights are consolidated once into <checkpoint>/model/: the last
    checkpoint is the final model, and a new run starts from it."""
    from transformers import AutoModelForCausalLM

    from mateconv.chat import load_model
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    shutil.copytree(zero_runs[3] / "checkpoints" / checkpoint.name, checkpoint)
    model, _ = load_model(checkpoint, device="cpu", dtype="float32")
    final = AutoModelForCausalLM.from_pretrained(zero_runs[3] / "final").state_dict()
    assert model.config.use_moe and model.state_dict().keys() == final.keys()
    for name, param in model.state_dict().items():
        assert param.allclose(final[name], atol=1e-6), name
    command = [sys.executable, str(REPO / "5.full_sft.py"),
               *tiny_flags(tmp_path / "sft", "sft", init_from=str(checkpoint), max_steps=1, val_data_path="")]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "sft" / "final" / "config.json").is_file()


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


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nan_on_one_rank_is_skipped_by_all_and_stops_the_run(deepspeed_command, tiny_tokens, tiny_tokenizer,
                                                             tmp_path, zero_stage):
    """NaN in rank 0's batch at steps 3 and 5, then rank 1's at 6: every rank skips those steps (ZeRO-0:
    our CheckedStep; ZeRO-3: DeepSpeed's own check), and with max_nonfinite_steps 2 the run stops at step 6 with one
    line and a checkpoint whose weights are those after step 4."""
    data, init = two_rank_nan_inputs(tiny_tokens, tiny_tokenizer, tmp_path, use_moe=True)  # the command's MoE
    out_dir = tmp_path / "run"
    command = deepspeed_command(out_dir, zero_stage, STEPS, "--init_from", str(init), "--data_path", str(data),
                                "--max_nonfinite_steps", "2", "--val_data_path", "", "--warmup_iters", "4")
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    rows = check_halted_after_step_4(result.stdout + result.stderr, result.returncode, out_dir)
    assert rows[3]["lr"] == rows[2]["lr"] > rows[1]["lr"]  # the skipped step did not advance the schedule
    assert all(math.isfinite(row["grad_norm"]) for step, row in enumerate(rows, 1) if step not in TWO_RANK_NAN_STEPS)
    checkpoints = out_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000006"
    if zero_stage == 0:
        after_4, at_6 = (torch.load(checkpoints / f"step_0000000{s}" / "mp_rank_00_model_states.pt",
                                    weights_only=False)["module"] for s in (4, 6))
        for name, weights in after_4.items():  # steps 5 and 6 changed nothing
            torch.testing.assert_close(at_6[name], weights, rtol=0, atol=0, equal_nan=True)


def test_full_disk_on_one_rank_then_a_torn_checkpoint(deepspeed_command, tmp_path):
    """Rank 1's files of checkpoint step_6 fail mid-save as on a full disk (torch.save's RuntimeError escaped
    DeepSpeed's save on that rank alone): every rank agrees, the run stops with one line, step_4 and `latest` stay.
    Then rank 1's optimizer shard of step_4 is truncated: the resume says so, falls back to step_2 and repeats steps
    3-6 with the losses they had."""
    out_dir = tmp_path / "run"
    command = deepspeed_command(out_dir, 2, STEPS, "--save_interval_steps", "2",
                                script=REPO / "tests" / "full_disk_driver.py")
    env = {**single_thread_env(), "FULL_DISK_RANK": "1", "FULL_DISK_CHECKPOINT": "step_00000006"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    failed = [line for line in output.splitlines() if line.startswith("pretrain: saving checkpoint step_00000006")]
    assert len(failed) == 1, output[-3000:]
    assert "(rank 1: torch could not write the file: " in failed[0]
    assert "step_00000004 and `latest` are intact" in failed[0]
    checkpoints = out_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert not list((checkpoints / ".incoming").glob("step_*"))  # (DeepSpeed keeps its zero_to_fp32.py there)
    first = losses(out_dir)
    assert sorted(first) == list(range(1, 7))

    shard = checkpoints / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(shard, shard.stat().st_size - 100)
    result = subprocess.run(deepspeed_command(out_dir, 2, STEPS, "--save_interval_steps", "2"), cwd=REPO,
                            env=single_thread_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "checkpoint step_00000004 is damaged (" in output and "zero_pp_rank_1_mp_rank_00_optim_states.pt has" \
        in output, output[-3000:]
    assert "step_00000002 at step 2" in output
    resumed = losses(out_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in first.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step


def test_stop_file_stops_a_run_started_from_a_non_interactive_shell(deepspeed_command, tmp_path):
    """`nohup deepspeed ... &` in a script: SIGINT is ignored by the launcher (`kill -2` does nothing), which the run
    says at once, naming what works; `scripts/stop.sh OUT_DIR` (`touch <out_dir>/STOP`, then a wait) stops every rank
    with a checkpoint, and the file is removed."""
    out_dir = tmp_path / "run"
    command = shlex.join(deepspeed_command(out_dir, 2, 10_000, "--save_interval_steps", "10000",
                                           "--eval_interval", "10000"))
    log, pid_file = tmp_path / "train.log", tmp_path / "train.pid"
    starter = subprocess.run(["bash", "-c", f"nohup {command} > {log} 2>&1 & echo $! > {pid_file}"], cwd=REPO,
                             env=single_thread_env(), start_new_session=True, timeout=30)
    assert starter.returncode == 0
    front = int(pid_file.read_text())
    group = os.getpgid(front)
    try:
        deadline = time.monotonic() + 300
        while not ((out_dir / "metrics.jsonl").exists() and len(losses(out_dir)) >= 3):
            assert psutil.pid_exists(front) and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert f"the deepspeed launcher (pid {front}) ignores SIGINT" in log.read_text()
        assert f"`kill {front}`" in log.read_text() and f"`touch {out_dir / 'STOP'}`" in log.read_text()
        processes = [psutil.Process(front), *psutil.Process(front).children(recursive=True)]
        stop = subprocess.run(["bash", str(REPO / "scripts" / "stop.sh"), str(out_dir), "180"], capture_output=True,
                              text=True, timeout=200)
        assert stop.returncode == 0 and stop.stdout.splitlines()[-1].startswith("stopped: checkpoint step_"), stop
        gone, alive = psutil.wait_procs(processes, timeout=60)
    finally:
        if group_alive(group):
            os.killpg(group, signal.SIGKILL)
    output = log.read_text()
    assert not alive, output[-3000:]
    assert "STOP found: checkpoint saved, the file removed" in output and output.count("exits successfully") == 2
    assert not (out_dir / "STOP").exists() and not (out_dir / "final").exists()
    assert (out_dir / "checkpoints" / "latest").read_text() == f"step_{max(losses(out_dir)):08d}"


def test_bad_input_under_the_launcher_is_one_line_per_rank(deepspeed_command, tmp_path):
    """A data file missing on two ranks: each rank stops with its one line, rank 1's labelled, and no traceback."""
    missing = tmp_path / "missing.jsonl"
    command = deepspeed_command(tmp_path / "run", 2, STEPS, "--data_path", str(missing))
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    said = sorted(line.split(":")[0] for line in output.splitlines() if str(missing) in line
                  and line.startswith("pretrain"))
    assert said == ["pretrain", "pretrain (rank 1)"], output[-3000:]


def test_sft_on_two_ranks_weighs_every_labelled_token_like_one_rank(tiny_flags, tiny_pretrain_model, tmp_path):
    """SFT rows hold very different numbers of assistant tokens: a step of 4 rows on 2 ranks, under ZeRO-2 (2
    micro-batches of 1 row per rank) and under DDP (1 of 2), is one rank's step of 4 rows: a micro-batch's loss weighs
    by its share of the labelled tokens of the step on both ranks. Before, each rank's mean weighed alike."""
    from safetensors.torch import load_file

    from mateconv.config import parse_config
    from mateconv.train.stages import RECIPES, run

    def flags(name: str, **extra) -> list[str]:
        return tiny_flags(tmp_path / name, "sft", init_from=tiny_pretrain_model, max_steps=2, dropout=0.0,
                          val_data_path="", save_interval_steps=100, **extra)

    run(RECIPES["sft"], parse_config(flags("one_rank"), RECIPES["sft"].defaults))
    launchers = {"zero2": ["deepspeed", "--num_gpus", "2"], "ddp": ["torchrun", "--nproc_per_node", "2"]}
    settings = {"zero2": dict(engine="deepspeed", zero_stage=2, batch_size=1, accumulation_steps=2),
                "ddp": dict(batch_size=2)}
    for name, (launcher, *options) in launchers.items():
        command = [str(Path(sys.executable).with_name(launcher)), *options, "--master_port", str(free_port()),
                   str(REPO / "5.full_sft.py"), *flags(name, **settings[name])]
        result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = {key: metric(tmp_path / "one_rank", key) for key in ("loss", "lm_loss", "grad_norm")}
    weights = load_file(tmp_path / "one_rank" / "final" / "model.safetensors")
    for name in launchers:
        for key, values in reference.items():
            assert metric(tmp_path / name, key) == pytest.approx(values, rel=1e-5), (name, key)
        trained = load_file(tmp_path / name / "final" / "model.safetensors")
        assert all(torch.allclose(trained[k], weights[k], rtol=1e-5, atol=1e-6) for k in weights), name
