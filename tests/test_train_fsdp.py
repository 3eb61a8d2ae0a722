"""PyTorch FSDP (`--engine fsdp`) on 2 CPU ranks under torchrun (gloo): in fp32 it trains the tiny MoE model to DDP's
losses and gradient norms (with gradient accumulation); its final model is an ordinary save_pretrained directory
holding DDP's weights; an FSDP checkpoint resumes under plain PyTorch in one process, and a DDP checkpoint under FSDP
in one process started with seed 003's `--overrides trainer=FSDPTrainer`, both with the uninterrupted losses; DPO
(frozen reference, held-out evaluators) matches DDP too; a NaN on one rank is skipped by both and stops the run with
the last good weights. What FSDP does not take is refused with one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, losses, read_metrics, single_thread_env
from test_train_faults import check_halted_after_step_4, two_rank_nan_inputs
from mateconv.config import ConfigError, parse_config
from mateconv.procs import free_port
from mateconv.train.fsdp import blocks, shard

STEPS = 6
SAVE_AT = 3
GLOBAL_BATCH = 8  # samples per step over all ranks: 2 ranks x 2 x 2 micro-batches, or 1 rank x 4 x 2
GRAD_CLIP = 0.5  # below every gradient norm here: FSDP's norm must be the one over all shards, before clipping
TOLERANCE = 2e-5


def train(tiny_flags, out: Path, ranks: int, *extra: str, stage: str = "pretrain", **flags) -> str:
    """A short fp32 run of the tiny MoE model (pretraining) or of DPO; two ranks under torchrun, one as a plain
    process. Returns its output."""
    if stage == "pretrain":
        flags = {"use_moe": True, **flags}
    args = tiny_flags(out, stage, max_steps=STEPS, batch_size=GLOBAL_BATCH // (2 * ranks), accumulation_steps=2,
                      save_interval_steps=SAVE_AT, eval_interval=SAVE_AT, grad_clip=GRAD_CLIP, **flags)
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
                 str(free_port())] if ranks == 2 else [sys.executable])
    script = {"pretrain": "4.pretrain.py", "dpo": "9.train_dpo.py"}[stage]
    result = subprocess.run([*launcher, str(REPO / script), *args, *extra], cwd=REPO, env=single_thread_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def metric(out_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(out_dir) if key in row}


def assert_same_losses(run: Path, reference: Path, steps: list[int]) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == steps
    for step in steps:
        assert got[step] == pytest.approx(expected[step], abs=TOLERANCE), step


@pytest.fixture(scope="module")
def runs(tiny_flags, tmp_path_factory) -> dict[str, Path]:
    """The same 2-rank run under FSDP and under DDP (`--engine torch`)."""
    root = tmp_path_factory.mktemp("fsdp")
    outputs = {engine: train(tiny_flags, root / engine, 2, engine=engine) for engine in ("fsdp", "torch")}
    assert "PyTorch FSDP, 2 rank(s)" in outputs["fsdp"]
    return {engine: root / engine for engine in outputs}


@pytest.mark.slow
def test_fsdp_trains_to_ddps_losses_and_gradient_norms(runs):
    steps = list(range(1, STEPS + 1))
    assert_same_losses(runs["fsdp"], runs["torch"], steps)
    norms, ddp_norms = metric(runs["fsdp"], "grad_norm"), metric(runs["torch"], "grad_norm")
    assert min(ddp_norms.values()) > GRAD_CLIP
    for step in steps:
        assert norms[step] == pytest.approx(ddp_norms[step], rel=1e-4), step
    assert losses(runs["fsdp"])[STEPS] < losses(runs["fsdp"])[1] - 0.2
    assert metric(runs["fsdp"], "val_loss")[STEPS] == pytest.approx(metric(runs["torch"], "val_loss")[STEPS],
                                                                   abs=TOLERANCE)


@pytest.mark.slow
def test_fsdp_final_model_is_a_plain_hugging_face_model_with_ddps_weights(runs):
    from transformers import AutoModelForCausalLM

    import model as _registers_mateconv  # noqa: F401
    fsdp = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "final")
    ddp = AutoModelForCausalLM.from_pretrained(runs["torch"] / "final")
    assert fsdp.config.architectures == ["MateConvForCausalLM"]
    assert fsdp.model.layers[0].mlp.experts[0].up_proj.weight.shape == (192, 64)  # full, not a shard
    for name, weight in ddp.state_dict().items():
        assert fsdp.state_dict()[name].allclose(weight, atol=1e-5), name


@pytest.mark.slow
def test_checkpoints_resume_across_engines_on_one_rank(tiny_flags, runs, tmp_path):
    """FSDP's checkpoint (2 ranks) under plain PyTorch alone, DDP's under FSDP alone (seed 003's override): the
    steps after it have the uninterrupted losses, so model, optimizer, schedule and data position all came back."""
    after = list(range(SAVE_AT + 1, STEPS + 1))
    checkpoint = Path("checkpoints") / f"step_{SAVE_AT:08d}"
    train(tiny_flags, tmp_path / "torch", 1, engine="torch", resume=runs["fsdp"] / checkpoint)
    assert_same_losses(tmp_path / "torch", runs["fsdp"], after)
    output = train(tiny_flags, tmp_path / "fsdp", 1, "--overrides", "trainer=FSDPTrainer",
                   resume=runs["torch"] / checkpoint)
    assert "PyTorch FSDP, 1 rank(s)" in output
    assert_same_losses(tmp_path / "fsdp", runs["torch"], after)


@pytest.mark.slow
def test_fsdp_dpo_matches_ddp(tiny_flags, tiny_pretrain_model, tiny_tokens, tmp_path):
    """The policy sharded, the frozen reference whole on each rank; the held-out pairs and the forgetting set are
    evaluated through the sharded model."""
    missing = tmp_path / "no_tokens"
    dpo = {"init_from": tiny_pretrain_model, "forget_data_paths": [tiny_tokens / "pretrain" / "val", missing],
           "eval_batches": 1, "learning_rate": 5e-4}
    for engine in ("fsdp", "torch"):
        output = train(tiny_flags, tmp_path / engine, 2, stage="dpo", engine=engine, **dpo)
        assert output.count(f"forgetting eval: {missing} not found, skipped") == 1  # said once, not once per rank
    assert_same_losses(tmp_path / "fsdp", tmp_path / "torch", list(range(1, STEPS + 1)))
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "forget/pretrain_ppl"):
        got, expected = metric(tmp_path / "fsdp", key), metric(tmp_path / "torch", key)
        assert got and sorted(got) == sorted(expected), key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, step)


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_all_and_stops_the_run(tiny_flags, tiny_tokens, tiny_tokenizer, tmp_path):
    """NaN in rank 0's batch at steps 3 and 5, then rank 1's at 6: both ranks skip those updates (the gradient norm
    over all shards is NaN on every rank), and with max_nonfinite_steps 2 the run stops at step 6 with one line and a
    checkpoint whose weights are those after step 4."""
    data, init = two_rank_nan_inputs(tiny_tokens, tiny_tokenizer, tmp_path)
    out_dir = tmp_path / "run"
    args = tiny_flags(out_dir, engine="fsdp", init_from=init, data_path=data, val_data_path="", batch_size=4,
                      max_steps=8, max_nonfinite_steps=2, warmup_iters=4, save_interval_steps=2)
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "4.pretrain.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    check_halted_after_step_4(result.stdout + result.stderr, result.returncode, out_dir)
    after_4, at_6 = (torch.load(out_dir / "checkpoints" / f"step_0000000{s}" / "training_state.pt",
                                weights_only=False)["model"] for s in (4, 6))
    for name, weights in after_4.items():  # steps 5 and 6 changed nothing
        torch.testing.assert_close(at_6[name], weights, rtol=0, atol=0, equal_nan=True)


def test_blocks_are_the_models_own_transformer_layers(tiny_llama):
    from model import MateConvConfig, MateConvForCausalLM

    llama = tiny_llama()
    assert blocks(llama) == list(llama.model.layers)
    mateconv = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64,
                                                  max_seq_len=32))
    assert blocks(mateconv) == list(mateconv.model.layers)
    with pytest.raises(ConfigError, match="engine fsdp: Sequential names no transformer block class"):
        shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), compile_blocks=False)


@pytest.mark.parametrize("flags, refused", [
    (["--zero_stage", "2"], "zero_stage, ds_config and offload are DeepSpeed's settings"),
    (["--use_lora"], "LoRA is not supported with engine fsdp"),
    (["--optimizer", "muon"], "optimizer muon is not supported with engine fsdp"),
    (["--wandb_watch", "gradients"], "wandb_watch is not supported with engine fsdp"),
])
def test_what_fsdp_does_not_take_is_one_line(flags, refused):
    with pytest.raises(ConfigError, match=refused):
        parse_config(["--engine", "fsdp", *flags], {})
    parse_config(["--engine", "torch", *flags] if "--zero_stage" not in flags else ["--zero_stage", "2"], {})


def test_seed_003s_trainer_override_picks_the_engine():
    assert parse_config(["--overrides", "trainer=FSDPTrainer"], {}).parallel.engine == "fsdp"
    assert parse_config(["--overrides", "trainer=BasicTrainer"], {}).parallel.engine == "auto"
    with pytest.raises(ConfigError, match="trainer: 'TensorParallelTrainer' is not one of BasicTrainer, FSDPTrainer"):
        parse_config(["--overrides", "trainer=TensorParallelTrainer"], {})


def test_plain_python_with_several_gpus_reruns_on_every_one(tiny_flags, tmp_path, monkeypatch):
    """Seed 003 starts FSDP as `python train.py config.yml --overrides trainer=FSDPTrainer`, and its trainer then uses
    every visible GPU. Here too: with 2 GPUs visible (their count faked: this machine has none) the stage's command
    reruns under torchrun with 2 ranks, and that command, run for real (CPU ranks here), trains on 2 ranks. Under a
    launcher, with another engine, on the CPU or with one GPU: no rerun."""
    from mateconv.train.distributed import every_gpu_command

    args = tiny_flags(tmp_path / "run", max_steps=2, engine="fsdp", device="auto")
    script = str(REPO / "4.pretrain.py")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    command = every_gpu_command(parse_config(args, {}).parallel, script, args)
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "PyTorch FSDP, 2 rank(s)" in result.stdout, result.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    for other in (["--engine", "torch"], ["--device", "cpu"]):
        assert every_gpu_command(parse_config(args + other, {}).parallel, script, args) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert every_gpu_command(parse_config(args, {}).parallel, script, args) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert every_gpu_command(parse_config(args, {}).parallel, script, args) is None
