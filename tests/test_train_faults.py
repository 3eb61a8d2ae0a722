"""Faults the plain-PyTorch engine survives, in process: NaN steps (skipped, counted, and after max_nonfinite_steps in
a row a stop with a checkpoint), a torn or corrupt newest checkpoint (resume falls back), a full disk during a save
(the previous checkpoint and `latest` stay), a resume into another model, a finished run or changed data. The
DeepSpeed twins are in test_train_deepspeed.py."""
from __future__ import annotations

import bisect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mateconv.config import ConfigError, parse_config
from mateconv.train.signals import TrainingHalted
from mateconv.train.engine import Trainer
from mateconv.train.command import main
from mateconv.train.stages import RECIPES, run
from conftest import REPO, losses, read_metrics, single_thread_env
from full_disk_driver import written_to_a_full_disk

pytestmark = pytest.mark.usefixtures("single_thread")


def poisoned_tokens(tokens_dir, out_dir, world_size: int, bad: dict[int, int], batch_size: int = 4,
                    seq_len: int = 96, seed: int = 42) -> tuple[Path, int]:
    """A copy of pretraining shards in which the batch of each {step: rank} of `bad` (the engine's sampler, first
    epoch) holds a token id found nowhere else in the stream -> (copy, that id). Only a non-EOS token changes, so
    the rows stay the same."""
    from mateconv.data.shards import PretrainTokens
    from mateconv.train.data import ResumableDistributedSampler

    shutil.copytree(tokens_dir, out_dir)
    data = PretrainTokens(out_dir, seq_len)
    orders = [ResumableDistributedSampler(data, rank, world_size, seed).indices() for rank in range(world_size)]
    streams = [np.memmap(out_dir / f"{shard['name']}.tokens.bin", dtype=data.dtype, mode="r+")
               for shard in data.shards]
    used = set(np.unique(np.concatenate(streams)).tolist())
    token = max(set(range(data.index["vocab_size"])) - used)
    for step, rank in bad.items():
        first = data.row_bounds[orders[rank][(step - 1) * batch_size]]  # the first piece of the batch's first row
        position = int(data.piece_starts[first])
        # a piece of 2+ tokens keeps the token from leading another row (a row's lead is the token before its piece)
        assert data.piece_lengths[first] > 1
        shard = bisect.bisect_right(data.starts, position) - 1
        assert streams[shard][position - data.starts[shard]] != data.eos_id
        streams[shard][position - data.starts[shard]] = token
    for stream in streams:
        stream.flush()
    return out_dir, token


def poisoned_model(out_dir, tokenizer_dir, tokens: list[int], use_moe: bool = False):
    """A tiny model (input and output embeddings untied; MoE with `use_moe`) whose input embedding rows of `tokens` are
    NaN: a batch holding one of them gets a NaN loss and NaN gradients, any other batch trains normally."""
    from transformers import AutoTokenizer

    from model import MateConvConfig, MateConvForCausalLM

    torch.manual_seed(0)
    model = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                               max_seq_len=96, tie_word_embeddings=False, use_moe=use_moe))
    with torch.no_grad():
        model.get_input_embeddings().weight[tokens] = float("nan")
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


# Two ranks: a poisoned token in rank 0's batch at steps 3 and 5, then in rank 1's at 6 (step: the rank)
TWO_RANK_NAN_STEPS = {3: 0, 5: 0, 6: 1}


def two_rank_nan_inputs(tiny_tokens: Path, tiny_tokenizer: Path, tmp_path: Path,
                        use_moe: bool = False) -> tuple[Path, Path]:
    """(data, init_from) of a 2-rank run whose batches at TWO_RANK_NAN_STEPS give a NaN loss and gradients."""
    data, token = poisoned_tokens(tiny_tokens / "pretrain" / "train", tmp_path / "data", 2, TWO_RANK_NAN_STEPS)
    return data, poisoned_model(tmp_path / "init", tiny_tokenizer, [token], use_moe)


def check_halted_after_step_4(output: str, returncode: int, out_dir: Path) -> list[dict]:
    """A 2-rank run on two_rank_nan_inputs with max_nonfinite_steps 2 failed with one line at step 6 naming the
    weights after step 4, and logged the NaN steps as such; returns its logged training rows."""
    assert returncode != 0, output[-3000:]
    halted = [line for line in output.splitlines() if line.startswith("pretrain: the loss or gradient was NaN/inf")]
    assert len(halted) == 1 and "steps 5-6" in halted[0] and "after step 4" in halted[0], output[-3000:]
    rows = [row for row in read_metrics(out_dir) if "loss" in row]
    assert [step for step, row in enumerate(rows, 1) if not math.isfinite(row["loss"])] == list(TWO_RANK_NAN_STEPS)
    assert [row["nonfinite_steps"] for row in rows] == [0, 0, 1, 1, 2, 3]
    return rows


@pytest.fixture
def train(tiny_flags):
    def train_stage(out_dir, **overrides) -> dict:
        return run(RECIPES["pretrain"], parse_config(tiny_flags(out_dir, **overrides)))
    return train_stage


def test_nonfinite_steps_are_skipped_and_stop_the_run_in_a_row(train, tiny_tokens, tiny_tokenizer, tmp_path, capsys,
                                                                monkeypatch):
    """NaN at step 3 (skipped, logged although log_interval is 2, training goes on), then at steps 5 and 6: with
    max_nonfinite_steps 2 the run stops at step 6 with a checkpoint whose weights are those after step 4; the same
    command then trains past the bad data."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    data, token = poisoned_tokens(tiny_tokens / "pretrain" / "train", tmp_path / "data", 1, {3: 0, 5: 0, 6: 0})
    init = poisoned_model(tmp_path / "init", tiny_tokenizer, [token])
    flags = dict(init_from=init, data_path=data, max_steps=8, max_nonfinite_steps=2, save_interval_steps=4,
                 val_data_path="", warmup_iters=4, log_interval=2)
    with pytest.raises(TrainingHalted, match=r"in 2 steps in a row \(steps 5-6.*stopped at step 6 .*after step 4"):
        train(tmp_path / "run", tracker="wandb", **flags)
    assert "step 3: loss nan, grad_norm nan: not finite, optimizer step skipped (1 in a row" in capsys.readouterr().out
    rows = {row["step"]: row for row in read_metrics(tmp_path / "run") if "loss" in row}
    assert sorted(rows) == [2, 3, 4, 5, 6]
    assert [step for step, row in rows.items() if not math.isfinite(row["loss"])] == [3, 5, 6]
    assert [row["nonfinite_steps"] for row in rows.values()] == [0, 1, 1, 2, 3]
    assert rows[4]["lr"] == rows[3]["lr"] > rows[2]["lr"]  # in the warmup; the skipped step 3 did not advance it
    import wandb
    from wandb_records import history_rows, records

    wandb.teardown()  # run.finish() can return before the service has written the run file's last block
    run_file, = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {int(row["_step"]): row["nonfinite_steps"] for row in history_rows(run_file) if "loss" in row}
    assert logged == {step: row["nonfinite_steps"] for step, row in rows.items()}
    # the halted stage's run is finished as failed (before: exit code 0, shown as a finished run)
    assert [r.exit.exit_code for r in records(run_file) if r.WhichOneof("record_type") == "exit"] == [1]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000006"
    assert json.loads((checkpoints / "step_00000006" / "trainer_state.json").read_text())["nonfinite_steps"] == 3
    after_4, at_6 = (torch.load(checkpoints / f"step_0000000{s}" / "training_state.pt", weights_only=False)
                     for s in (4, 6))
    for name, weights in after_4["model"].items():  # steps 5 and 6 changed nothing
        torch.testing.assert_close(at_6["model"][name], weights, rtol=0, atol=0, equal_nan=True)
        assert name == "model.embed_tokens.weight" or weights.isfinite().all(), name

    summary = train(tmp_path / "run", **flags)  # the same command: resumes at step 6, past the bad batches
    assert summary["step"] == 8 and not summary["stopped"]
    resumed = losses(tmp_path / "run")
    assert 7 not in resumed and math.isfinite(resumed[8])  # 7 is not logged: a non-finite step always would be


# 4.pretrain.py whose evaluation fails with an error nothing expects, at the first one (a bug, a lost file handle)
CRASHING_RUN = """
import sys
from mateconv.train.engine import Trainer
from mateconv.train.command import main

def crash(self):
    raise RuntimeError("unexpected failure")

Trainer.evaluate = crash
sys.exit(main("pretrain", sys.argv[1:]))
"""


def test_a_run_that_crashes_with_loader_workers_exits(tiny_flags, tmp_path):
    """A run that fails with a traceback while its loader workers live (num_workers 2, the default) exits. Before,
    the workers, which ignore SIGTERM so that only the main process decides to stop, were sent SIGTERM at interpreter
    exit (the traceback kept the loader alive) and waited for forever: the crashed run held its GPU and never ended."""
    command = [sys.executable, "-c", CRASHING_RUN, *tiny_flags(tmp_path / "run", max_steps=8, eval_interval=3,
                                                                num_workers=2)]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "RuntimeError: unexpected failure" in result.stderr, result.stderr[-2000:]


def test_torn_and_corrupt_newest_checkpoints_fall_back(train, tmp_path, capsys):
    """step_9 truncated, step_6 with flipped bytes (same size): the resume names both in a line each, moves them
    aside, goes on from step_3 and reproduces the uninterrupted run. The half-written save of a run killed mid-save
    (.incoming/step_10) is deleted: it stayed, as large as a checkpoint, for ever."""
    flags = dict(max_steps=9, save_interval_steps=3, eval_interval=100)
    train(tmp_path / "full", **flags)  # finished; run again, the same command resumes from its newest checkpoint
    full = losses(tmp_path / "full")
    checkpoints = tmp_path / "full" / "checkpoints"
    torn = checkpoints / "step_00000009" / "training_state.pt"
    os.truncate(torn, torn.stat().st_size // 2)
    corrupt = checkpoints / "step_00000006" / "training_state.pt"
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    corrupt.write_bytes(bytes(data))
    cut_short = shutil.copytree(checkpoints / "step_00000003", checkpoints / ".incoming" / "step_00000010")
    capsys.readouterr()

    train(tmp_path / "full", **flags)
    out = capsys.readouterr().out
    assert "checkpoint step_00000009 is damaged (training_state.pt has" in out
    assert "checkpoint step_00000006 is damaged (training_state.pt is corrupt (CRC mismatch" in out
    assert "resumed from" in out and "step_00000003 at step 3" in out
    resumed = losses(tmp_path / "full")
    for step in range(4, 10):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5), step
    assert (checkpoints / "step_00000009.damaged").is_dir() and (checkpoints / "latest").read_text() == "step_00000009"
    assert not cut_short.exists()


def test_a_resume_says_when_latest_names_a_checkpoint_that_is_gone(train, tmp_path, capsys):
    """out_dir copied to another machine without its newest checkpoint: the resume went on from an older one without a
    word about the steps that were lost."""
    flags = dict(max_steps=6, save_interval_steps=3, eval_interval=100)
    train(tmp_path, **flags)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    capsys.readouterr()
    train(tmp_path, **flags)
    out = capsys.readouterr().out
    assert "[train] note: `latest` names step_00000006, which is not there or incomplete; going on from the newest " \
           "complete checkpoint" in out and "step_00000003 at step 3" in out, out


def test_init_from_a_damaged_checkpoint_or_on_a_full_disk_is_one_line(train, tmp_path, monkeypatch):
    """A training checkpoint given as a model (--init_from, also to chat and export) is consolidated from its files
    into <checkpoint>/model/: a torn one ended in torch's traceback (DeepSpeed's for a ZeRO shard) from deep in the
    loading, and so did a full disk while writing model/. The files are checked as a resume checks them, and a failed
    write is one line."""
    from transformers import modeling_utils

    train(tmp_path / "first", max_steps=2, save_interval_steps=2, eval_interval=100)
    checkpoint = tmp_path / "first" / "checkpoints" / "step_00000002"
    real_save = modeling_utils.safe_save_file
    monkeypatch.setattr(modeling_utils, "safe_save_file",
                        lambda *args, **kwargs: written_to_a_full_disk(real_save, *args, **kwargs))
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the driver does; put back after
    try:
        with pytest.raises(ConfigError, match=re.escape(f"consolidating {checkpoint} into {checkpoint / 'model'} "
                                                        "failed (SafetensorError: ") + ".*: free some space"):
            train(tmp_path / "second", max_steps=1, init_from=checkpoint)
    finally:
        signal.signal(signal.SIGXFSZ, ignored)
    assert not (checkpoint / "model").exists()
    state = checkpoint / "training_state.pt"
    os.truncate(state, state.stat().st_size // 2)
    with pytest.raises(ConfigError, match=re.escape(f"{checkpoint} is damaged (training_state.pt has ")):
        train(tmp_path / "second", max_steps=1, init_from=checkpoint)


def test_a_resume_into_another_model_a_finished_run_or_other_data_says_so(train, tiny_flags, tiny_tokens, tmp_path,
                                                                           capsys):
    """The same out_dir with another size or MoE is refused before anything loads, naming the settings; --resume
    never starts over. The finished run run again trains nothing and says so (its done line has no loss: no step
    ran); given more steps and other data, it notes the data changed and goes on."""
    run_dir = tmp_path / "run"
    train(run_dir, max_steps=3, eval_interval=100)
    for overrides, differences in (({"dim": 96}, r"dim 64 there, 96 here; hidden_dim 192 there, 256 here"),
                                   ({"use_moe": True}, r"use_moe False there, True here"),
                                   # dropout may change on a resume: not named among the differences
                                   ({"use_moe": True, "dropout": 0.1}, r"use_moe False there, True here"),
                                   # the same shapes, another model: it went on as that one, its final/ saying so
                                   ({"rope_theta": 1e4}, r"rope_theta 1000000.0 there, 10000.0 here")):
        with pytest.raises(ConfigError, match=rf"resume: .*step_00000003 holds another model \({differences}\): give "
                                              r"this run its own --out_dir, or pass --resume never to start"):
            train(run_dir, max_steps=3, eval_interval=100, **overrides)
    capsys.readouterr()

    assert main("pretrain", tiny_flags(run_dir, max_steps=3, eval_interval=100)) == 0
    out = capsys.readouterr().out
    assert "this run is finished (step 3 of 3): nothing to train; raise --max_steps" in out
    assert "[pretrain] done: step 3\n" in out and "nan" not in out

    # shards rebuilt from changed inputs (3.dataset.py gives them another fingerprint) with as many examples
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(tiny_tokens / "pretrain" / "train", rebuilt)
    index = json.loads((rebuilt / "index.json").read_text())
    (rebuilt / "index.json").write_text(json.dumps({**index, "fingerprint": "0123456789abcdef"}))
    train(run_dir, max_steps=4, eval_interval=100, data_path=rebuilt)
    assert ("note: the training data was made from other or changed files (or another tokenizer) than the checkpoint's "
            "run's, with as many examples") in capsys.readouterr().out

    other_data = tiny_tokens / "pretrain" / "val"  # fewer examples than the training shards
    summary = train(run_dir, max_steps=5, eval_interval=100, data_path=other_data, val_data_path="")
    out = capsys.readouterr().out
    assert re.search(r"note: the training data now has \d+ examples, the checkpoint's run had \d+: training goes on",
                     out)
    assert summary["step"] == 5 and math.isfinite(summary["loss"])
    summary = train(run_dir, max_steps=3, eval_interval=100, use_moe=True, resume="never")
    assert summary["step"] == 3 and json.loads((run_dir / "final" / "config.json").read_text())["use_moe"]


def test_full_disk_during_save_keeps_the_previous_checkpoint(train, tmp_path, monkeypatch):
    """The save of step 6 fails half-way, in the operating system as on a full disk (torch.save then raises its own
    RuntimeError, not an OSError): the run stops with one clear line, step_3 and `latest` are as they were, nothing
    half-written is left, and the same command resumes from step_3."""
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_00000006" in str(path):
            return written_to_a_full_disk(real_save, obj, path, *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the driver does; put back after
    flags = dict(max_steps=8, save_interval_steps=3, val_data_path="")  # no best/ written beside the failing save
    try:
        with pytest.raises(TrainingHalted, match=r"saving checkpoint step_00000006 failed \(torch could not write the "
                                                 r"file: .* MiB free in .*\); step_00000003 and `latest` are intact"):
            train(tmp_path, **flags)
    finally:
        signal.signal(signal.SIGXFSZ, ignored)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".incoming", "latest", "step_00000003"]
    assert not any((checkpoints / ".incoming").iterdir())
    monkeypatch.setattr(torch, "save", real_save)
    assert train(tmp_path, **flags)["step"] == 8  # resumed from step_3
    assert sorted(losses(tmp_path)) == list(range(1, 9))


def test_full_disk_while_writing_the_final_model_is_one_line(train, tmp_path, monkeypatch):
    """The last checkpoint is saved, then the disk is full while final/ is written (safetensors' own error): a
    traceback before, with rank 0 alone out of the run under several ranks. Now one line, no half-written final/, and
    the same command, with space again, writes it."""
    from transformers import modeling_utils

    real_save = modeling_utils.safe_save_file
    monkeypatch.setattr(modeling_utils, "safe_save_file",
                        lambda *args, **kwargs: written_to_a_full_disk(real_save, *args, **kwargs))
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the driver does; put back after
    flags = dict(max_steps=3, save_interval_steps=3, val_data_path="")  # no best/: final/ is the only model written
    try:
        with pytest.raises(TrainingHalted, match=re.escape(f"writing {tmp_path / 'final'} failed (SafetensorError: ")
                           + r".*\); it is as it was, and the checkpoints are intact: free some space"):
            train(tmp_path, **flags)
    finally:
        signal.signal(signal.SIGXFSZ, ignored)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not [path.name for path in tmp_path.iterdir() if "final" in path.name]
    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
    assert train(tmp_path, **flags)["step"] == 3
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_a_full_disk_under_the_metrics_file_is_one_line_and_training_goes_on(train, tmp_path, capsys):
    """metrics.jsonl on a full disk (/dev/full: every write fails with ENOSPC) ended the run at its first row with
    a traceback and without a checkpoint. The rows are left out, said once, and the run trains and saves on."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    summary = train(tmp_path, max_steps=3, save_interval_steps=3, eval_interval=100)
    assert summary["step"] == 3 and (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    out = capsys.readouterr().out
    assert out.count(f"[train] cannot write {tmp_path / 'metrics.jsonl'} (No space left on device): its rows are left "
                     "out while that lasts; training goes on") == 1, out


def test_out_of_gpu_memory_is_one_line_and_the_same_command_resumes(tiny_flags, tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory error in step 4's forward (raised where torch would, with torch's message; this machine has
    no GPU): the stage exits with one line that gives torch's figures, the settings that set the memory and what to
    change, and names the checkpoint of step 2, from which the same command resumes and finishes."""
    real_micro_step, calls = Trainer.micro_step, []

    def micro_step(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.05 GiB is free. Including non-PyTorch memory, this process has 78.13 GiB memory in use. Of the "
                "allocated memory 76.50 GiB is allocated by PyTorch.\nIf reserved but unallocated memory is large try "
                "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
        return real_micro_step(self, *args)

    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    flags = tiny_flags(tmp_path, max_steps=6, save_interval_steps=2, eval_interval=100)
    with pytest.raises(SystemExit) as stopped:
        main("pretrain", flags)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("pretrain: out of GPU memory (Tried to allocate 2.00 GiB; total capacity of 79.19 GiB "
                              "of which 1.05 GiB is free) with batch_size 4, max_seq_len 96, gradient_checkpointing "
                              "false, zero_stage 0: lower --batch_size and raise --accumulation_steps")
    assert message.endswith("checkpoint step_00000002 is kept: the same command resumes from it")

    capsys.readouterr()
    assert main("pretrain", flags) == 0  # the same command, with memory to spare this time
    assert "step_00000002 at step 2" in capsys.readouterr().out
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 7))


def test_pretraining_with_empty_validation_shards_trains_without_validation(tiny_flags, tiny_tokenizer, tmp_path,
                                                                          capsys):
    """A small --data corpus whose hash split put no document in pretrain_val.jsonl: the empty validation shards
    stopped pretraining at its last evaluation, after the training, with the sampler's traceback."""
    from mateconv.data.tokenizing import build_shards

    (tmp_path / "empty.jsonl").write_text("")
    build_shards("pretrain", [tmp_path / "empty.jsonl"], tiny_tokenizer, tmp_path / "val", workers=1, progress=False)
    flags = tiny_flags(tmp_path / "run", max_steps=2, eval_interval=1, val_data_path=str(tmp_path / "val"))
    assert main("pretrain", flags) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert "val_loss" not in capsys.readouterr().out


@pytest.mark.parametrize("device, message", [
    ("cuda:99", "device cuda:99 is not there: {visible} CUDA GPU(s) visible; --device auto takes what there is"),
    ("gpu", "device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
])
def test_a_device_that_is_not_there_is_one_line(tmp_path, capsys, device, message):
    """Seed 000's `--device cuda:0` on a machine without that GPU (torch's AttributeError or 'invalid device ordinal'
    before), or a name torch does not know: one line, and no out_dir left behind."""
    out = tmp_path / "out_x"
    with pytest.raises(SystemExit) as stopped:
        main("pretrain", ["--device", device, "--out_dir", str(out), "--tracker", "none"])
    assert str(stopped.value) == f"pretrain: {message.format(visible=torch.cuda.device_count())}"
    assert not out.exists()
