"""The training engine in plain-PyTorch mode, in process: exact resume, rotation, SFT loss mask, MoE tracking, kill -2."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mateconv.config import ConfigError, config_to_dict, parse_config
from mateconv.data import DataError
from mateconv.data.shards import shard_info
from mateconv.train.models import model_dir
from mateconv.train.optim import lr_multiplier
from mateconv.train.stages import RECIPES, run
from conftest import REPO, losses, read_metrics, single_thread_env

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def train(tiny_flags):
    """`train(out_dir, stage="pretrain", **overrides)` -> the stage's summary of a tiny in-process run."""
    def train_stage(out_dir, stage="pretrain", **overrides) -> dict:
        return run(RECIPES[stage], parse_config(tiny_flags(out_dir, stage, **overrides)))
    return train_stage


def test_loss_decreases_and_artifacts(train, tmp_path):
    summary = train(tmp_path, max_steps=12, save_interval_steps=6, eval_interval=6)
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 13))
    assert curve[12] < curve[1] - 0.3
    rows = read_metrics(tmp_path)
    assert all({"lr", "grad_norm", "tokens_per_sec", "ppl"} <= set(r) for r in rows if "loss" in r)
    assert all(r["real_tokens_per_sec"] == r["tokens_per_sec"] for r in rows if "loss" in r)  # packed: no padding
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    lrs = [r["lr"] for r in rows if "lr" in r]  # the rate each step used: warmup over 2 steps, then cosine
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[-1] == pytest.approx(3e-3 * lr_multiplier(11, 2, 12, 0.1))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert summary["val_loss"] == rows[-1]["val_loss"]
    assert (tmp_path / "training.png").stat().st_size > 10_000  # the curves of metrics.jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(model).__name__ == "MateConvForCausalLM" and model.config.dim == 64
    assert AutoTokenizer.from_pretrained(tmp_path / "final").eos_token == "<|im_end|>"
    saved = parse_config([str(tmp_path / "checkpoints" / "step_00000012" / "config.yaml")])
    assert saved.optim.max_steps == 12 and saved.checkpoint.out_dir == str(tmp_path)


@pytest.mark.parametrize("dropout, optimizer", [(0.0, "adamw"), (0.1, "adamw"), (0.0, "muon")])
def test_resume_equals_uninterrupted(train, tmp_path, dropout, optimizer):
    """8 steps straight vs resume from the step-3 checkpoint: the same losses (and the same final weights), with
    dropout too (a resumed run's data loader drew a worker seed from the restored global RNG, so the dropout masks,
    LoRA's included, differed after a resume), and with Muon (its combined optimizer listed the param groups that
    loading the checkpoint replaces, so the resumed run trained at the checkpoint's learning rate to the end)."""
    flags = dict(max_steps=8, accumulation_steps=2, save_interval_steps=3, eval_interval=100, dropout=dropout,
                 optimizer=optimizer)
    train(tmp_path / "full", **flags)
    train(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_00000003", **flags)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(4, 9))
    for step, loss in resumed.items():
        assert abs(loss - full[step]) < 1e-5, (step, loss, full[step])
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_compiled_model_trains_like_eager(train, tmp_path):
    """--compile 1 (torch.compile of the model, in place): the same losses
    and metrics per log step as eager, and a final model with the eager model's parameter names. SLOW on CPU: the
    cold compile took 110 s on the loaded 2-core dev box (load 8), 22 s with the inductor cache warm."""
    flags = dict(max_steps=3, accumulation_steps=2, log_interval=1, eval_interval=100, save_interval_steps=100)
    train(tmp_path / "eager", compile=0, **flags)
    train(tmp_path / "compiled", compile=1, **flags)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) < 1e-4, (step, loss, compiled[step])
    rows = {name: [r for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("eager", "compiled")}
    for a, b in zip(rows["eager"], rows["compiled"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    from safetensors.torch import load_file

    assert load_file(tmp_path / "eager" / "final" / "model.safetensors").keys() == \
        load_file(tmp_path / "compiled" / "final" / "model.safetensors").keys()


@pytest.mark.parametrize("stage", ["pretrain", "dpo"])
def test_micro_batches_do_not_wait_for_the_device(train, tmp_path, monkeypatch, stage, request):
    """Host syncs (`Tensor.item`) do not grow with the micro-batches per step (the loss, the objective's metrics, LM
    or DPO, and the MoE load stay on the device), and the tracker logs on log steps only."""
    from mateconv.train.tracking import Tracker

    items, logged = [], []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or item(self))
    log = Tracker.log
    monkeypatch.setattr(Tracker, "log",
                        lambda self, step, row, **kwargs: logged.append(step) or log(self, step, row, **kwargs))
    start = {"pretrain": dict(use_moe=True, init_from=""),  # from scratch, with the MoE load to log
             "dpo": dict(init_from=request.getfixturevalue("tiny_moe_sft_model"))}[stage]
    counts = {}
    for accumulation in (1, 4):
        items.clear(), logged.clear()
        train(tmp_path / str(accumulation), stage, max_steps=4, accumulation_steps=accumulation, log_interval=2,
              val_data_path="", save_interval_steps=100, **start)
        counts[accumulation] = len(items)
        assert logged == [2, 4]
    assert counts[4] == counts[1]
    rows = [row for row in read_metrics(tmp_path / "4") if "loss" in row]
    assert "moe/cv_mean" in rows[0] and (stage != "dpo" or "rewards/accuracies" in rows[0])


def test_tokens_per_second_leave_out_evaluations(train, tmp_path, monkeypatch):
    """An evaluation between two logged steps is not training time: slowed down here to 0.4 s each (a step of the
    tiny model takes some 10 ms), the rows right after one show the other rows' tokens/s. Before, they showed a
    tenth of it, a saw-tooth in every tokens/s chart."""
    from mateconv.train.engine import Trainer

    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: time.sleep(0.4) or evaluate(self))
    train(tmp_path, max_steps=9, log_interval=1, eval_interval=2, save_interval_steps=100)
    rows = [row for row in read_metrics(tmp_path) if "loss" in row and row["step"] > 1]
    rates = {row["step"]: row["tokens_per_sec"] for row in rows}
    assert min(rates.values()) > 0.4 * statistics.median(rates.values()), rates


def test_tracker_rows_and_progress_lines_have_their_own_intervals(train, tmp_path, capsys):
    """Seed 000's `--log_interval 3 --wandb_log_freq 1`: a tracker row (metrics.jsonl, W&B) at every step, a progress
    line every third. Before, wandb_log_freq was log_interval: the later flag set both."""
    train(tmp_path, max_steps=6, log_interval=3, wandb_log_freq=1, eval_interval=100, save_interval_steps=100)
    assert [row["step"] for row in read_metrics(tmp_path) if "loss" in row] == [1, 2, 3, 4, 5, 6]
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line and " loss " in line]
    assert [line.split()[2] for line in lines] == ["3/6", "6/6"]


def test_steps_do_not_wait_for_the_device(train, tmp_path, monkeypatch):
    """With fused AdamW (the default) the host reads a step's loss and gradient norm only once the next step's forward
    and backward are issued, at once where a checkpoint is due, and calls `Tensor.item` no more in a longer run; each
    row's tokens/s still covers its own step's forward and backward (slowed down here to dominate). Reading every
    step at once instead trains and logs the same."""
    from mateconv.train.engine import StepFigures, Trainer

    events, items, starts = [], [], []
    read, micro_step, item = StepFigures.read, Trainer.micro_step, torch.Tensor.item

    def slow_micro_step(self, *args, **kwargs):
        events.append("step")
        starts.append(time.time())
        time.sleep(0.2)
        return micro_step(self, *args, **kwargs)

    monkeypatch.setattr(StepFigures, "read", lambda self: events.append("read") or read(self))
    monkeypatch.setattr(Trainer, "micro_step", slow_micro_step)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or item(self))
    flags = dict(val_data_path="", save_interval_steps=3, log_interval=1)
    train(tmp_path / "lagged", max_steps=6, **flags)
    assert events == ["step", "step", "read", "step", "read", "read"] * 2  # checkpoints at steps 3 and 6
    rows = [row for row in read_metrics(tmp_path / "lagged") if "loss" in row]
    rates = [row["tokens_per_sec"] for row in rows]
    assert max(rates) < 1.5 * min(rates), rates
    gaps = [next_start - row["time"] for row, next_start in zip(rows, starts[1:])]
    assert min(gaps) > -0.001, gaps  # each row is dated at its step's end (to the millisecond), before the next
    counts = []
    for steps in (3, 6):
        items.clear()
        train(tmp_path / f"items{steps}", max_steps=steps, val_data_path="", save_interval_steps=100)
        counts.append(len(items))
    assert counts[0] == counts[1]

    setup = Trainer._setup_engine
    monkeypatch.setattr(Trainer, "_setup_engine",
                        lambda self, model: setup(self, model) or setattr(self, "lags", False))
    events.clear()
    train(tmp_path / "at_once", max_steps=6, **flags)
    assert events == ["step", "read"] * 6
    lagged, at_once = read_metrics(tmp_path / "lagged"), read_metrics(tmp_path / "at_once")
    assert [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in lagged if "loss" in r] == \
        [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in at_once if "loss" in r]


def test_loader_workers_persist_across_epochs(train, tmp_path, monkeypatch):
    """With loader workers, epochs after the first reuse them (no restart at each boundary) and the run trains on
    the same batches in the same order as without workers."""
    from torch.utils.data import dataloader

    starts = []
    start = dataloader._MultiProcessingDataLoaderIter.__init__
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__",
                        lambda self, loader: starts.append(1) or start(self, loader))
    flags = dict(max_steps=30, batch_size=32, val_data_path="", save_interval_steps=100)  # 13 steps an epoch
    train(tmp_path / "workers", num_workers=2, **flags)
    train(tmp_path / "main", num_workers=0, **flags)
    epochs = {r["epoch"] for r in read_metrics(tmp_path / "workers") if "loss" in r}
    assert len(epochs) >= 3, epochs
    assert len(starts) == 1
    workers, main = losses(tmp_path / "workers"), losses(tmp_path / "main")
    assert workers.keys() == main.keys() and all(abs(workers[s] - main[s]) < 1e-5 for s in main)


def test_an_epoch_is_one_pass_over_the_data_when_a_step_holds_more_than_it(train, tmp_path, monkeypatch):
    """batch_size x accumulation_steps over the data (13 micro-batches an epoch, 8 a step): each epoch ends with a
    shorter step, as in HF Trainer, so `--epochs 2` is 2 passes (4 steps: 8 + 5 micro-batches each), not 1 step
    that took 8 micro-batches of the first epoch; and a resume at the mid-epoch step goes on alike."""
    from mateconv.train import engine

    seen = []
    count = engine.batch_tokens
    monkeypatch.setattr(engine, "batch_tokens", lambda batch, pad_id: seen.append(len(batch["input_ids"])) or
                        count(batch, pad_id))
    flags = dict(max_steps=0, epochs=2, batch_size=32, accumulation_steps=8, val_data_path="", save_interval_steps=1,
                 keep_checkpoint_max=4)
    train(tmp_path / "full", **flags)
    assert seen == [32] * 26
    rows = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 1), (3, 1), (4, 2)]
    assert rows[-1]["lr"] == pytest.approx(3e-3 * lr_multiplier(3, 2, 4, 0.1))  # the schedule spans the 4 steps
    seen.clear()
    train(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "step_00000001", **flags)
    assert seen == [32] * (5 + 13)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [2, 3, 4] and all(abs(resumed[s] - full[s]) < 1e-5 for s in resumed)


def test_training_data_of_fewer_rows_than_a_batch_is_one_line(train, tiny_tokens, tmp_path):
    """A corpus shorter than one row (36 tokens, max_seq_len 96) ended in a traceback from the sampler ("the
    training data set is empty"); one of 9 rows with batch_size 16 is refused the same way."""
    corpus = tmp_path / "small.jsonl"
    corpus.write_text('{"text": "hello world, a short document."}\n{"text": "another one."}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"0 rows \(a corpus shorter than max_seq_len 96 tokens makes none\)"):
        train(tmp_path / "empty", data_path=corpus, val_data_path="")
    with pytest.raises(ConfigError, match="9 rows, fewer than one batch of 16"):
        train(tmp_path / "short", data_path=tiny_tokens / "pretrain" / "val", val_data_path="", batch_size=16)


def test_validation_data_of_no_row_is_told(train, tmp_path, capsys):
    """A validation file shorter than one row (36 tokens, max_seq_len 96) turned validation off without a word."""
    corpus = tmp_path / "small.jsonl"
    corpus.write_text('{"text": "hello world, a short document."}\n{"text": "another one."}\n', encoding="utf-8")
    train(tmp_path / "run", max_steps=1, val_data_path=corpus)
    assert (f"[pretrain] no validation (nor best/ model): {tmp_path / 'run' / 'data_tokens' / 'val'} gives no row at "
            "max_seq_len 96") in capsys.readouterr().out
    # held-out shards of no record (stage 2 with --val_frac 0) are told as such, not as too short for max_seq_len
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    train(tmp_path / "empty_run", max_steps=1, val_data_path=empty)
    assert (f"[pretrain] no validation (nor best/ model): {tmp_path / 'empty_run' / 'data_tokens' / 'val'} holds no "
            "records") in capsys.readouterr().out


def test_validation_data_of_fewer_rows_than_a_batch_is_evaluated(train, tmp_path):
    """9 validation rows, batch_size 16: the loader dropped its one short batch, so the run had no val_loss, no eval
    line and no best/ model, and said nothing. The rows of a short last batch count by their number."""
    summary = train(tmp_path, max_steps=2, batch_size=16, eval_interval=1, eval_batches=0, save_interval_steps=1)
    assert [r["step"] for r in read_metrics(tmp_path) if "val_loss" in r] == [1, 2]
    assert 0 < summary["val_loss"] < 10 and (tmp_path / "best").is_dir()


def test_the_sampler_tells_its_padding_apart():
    """Ranks get as many samples each by repeating the first ones; those repeats come last, after `unpadded_len`."""
    from mateconv.train.data import ResumableDistributedSampler

    samplers = [ResumableDistributedSampler(range(9), rank, 2, 0, shuffle=False) for rank in (0, 1)]
    assert [(s.indices(), s.unpadded_len()) for s in samplers] == [([0, 2, 4, 6, 8], 5), ([1, 3, 5, 7, 0], 4)]
    for sampler in samplers:
        sampler.set_position(0, 6)
    assert [(s.indices(), s.unpadded_len()) for s in samplers] == [([6, 8], 2), ([7, 0], 1)]


def test_validation_loss_is_the_token_mean_over_the_first_examples(train, tiny_pretrain_model, tmp_path):
    """val_loss is the mean over the labelled tokens of the first `eval_batches` x `batch_size` (or `eval_examples`)
    validation examples, however they are batched: 16 SFT conversations in 2 batches of 8 or 4 of 5. Each batch's mean
    was weighed by its rows, and `eval_examples 16` evaluated whole batches (20 conversations)."""
    def starting_val_loss(name: str, **sizes) -> float:
        train(tmp_path / name, "sft", init_from=tiny_pretrain_model, max_steps=1, eval_at_start=True, **sizes)
        return next(row["val_loss"] for row in read_metrics(tmp_path / name) if row["step"] == 0)

    assert starting_val_loss("batches", batch_size=8, eval_batches=2) == pytest.approx(
        starting_val_loss("examples", batch_size=5, eval_examples=16), rel=1e-6)


def test_checkpoints_are_written_while_training_goes_on(train, tmp_path, monkeypatch):
    """Alone, a save copies the state and writes it in a background thread: the next step starts before the
    checkpoint's file is written (slowed down here), and the run's end waits for the last one. That a checkpoint
    holds its own step's state is test_resume_equals_uninterrupted's business."""
    from mateconv.train.engine import Trainer

    events = []
    real_save, micro_step = torch.save, Trainer.micro_step

    def slow_save(obj, path, *args, **kwargs):
        if Path(path).name == "training_state.pt":
            time.sleep(1.0)
            events.append(Path(path).parent.name)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    monkeypatch.setattr(Trainer, "micro_step", lambda self, *a, **k: events.append("step") or micro_step(self, *a, **k))
    train(tmp_path, max_steps=4, save_interval_steps=2, val_data_path="")
    assert events.index("step_00000002") > 2 and events[-1] == "step_00000004"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (tmp_path / "checkpoints" / "step_00000004" / "training_state.pt").is_file()


def test_the_stop_file_goes_once_the_checkpoint_is_in_place(train, tmp_path, monkeypatch):
    """`touch OUT/STOP` (scripts/stop.sh): the run removes the file only once its checkpoint, written in the
    background and slowed down here, is in place; stop.sh reads the removal as "saved". Before, the file went while
    the checkpoint was still being written, and a user who then ended the machine lost it."""
    real_save, real_unlink = torch.save, Path.unlink
    saved_when_removed = []

    def slow_save(obj, path, *args, **kwargs):
        if Path(path).name == "training_state.pt":
            time.sleep(1.0)
        return real_save(obj, path, *args, **kwargs)

    def unlink(path, missing_ok=False):
        if path.name == "STOP":
            saved_when_removed.append((tmp_path / "checkpoints" / "latest").is_file())
        return real_unlink(path, missing_ok=missing_ok)

    from mateconv.train.engine import Trainer

    micro_step = Trainer.micro_step

    def first_step_then_stop(self, *args, **kwargs):
        (tmp_path / "STOP").touch()
        return micro_step(self, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(Trainer, "micro_step", first_step_then_stop)
    summary = train(tmp_path, max_steps=6, val_data_path="")
    assert summary["stopped"] and summary["step"] == 1
    assert saved_when_removed == [True] and not (tmp_path / "STOP").exists()


def test_a_stop_during_the_setup_ends_the_run_before_its_first_step(train, tmp_path, capsys):
    """A stop asked while the run sets up (here the stop file, there before the run; `kill -2` alike: the handler is
    set as the stage starts, not when training does) ends it before its first step, saying so; the same command
    then trains. Before, a SIGINT during the setup of a run started from a script was lost (SIGINT ignored until
    the training loop), and one from a terminal killed it with a traceback."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "STOP").touch()  # newer than this process: a request, not a leftover
    summary = train(tmp_path, max_steps=3, val_data_path="")
    assert summary["stopped"] and summary["step"] == 0 and not (tmp_path / "checkpoints").exists()
    assert ("[train] stopped before its first step (asked during the setup): nothing new to save; the same command "
            "starts the run") in capsys.readouterr().out
    assert not (tmp_path / "STOP").exists()
    assert train(tmp_path, max_steps=3, val_data_path="")["step"] == 3


def test_a_launcher_orphaned_before_the_rank_looked_is_a_stop_and_pid_1_is_never_named(tmp_path):
    """A DeepSpeed launcher whose front process was stopped while the rank started has parent 1 when the rank looks:
    that is a stop (before, it trained on), and the hint names this process, not `kill -2 1` (SIGINT to init)."""
    import os

    import psutil

    from mateconv.train.signals import StopRequest

    stop = StopRequest(tmp_path)
    stop.watch.launcher, stop.watch.front_pid = psutil.Process(), 1
    assert stop.requested
    assert stop.stop_hint().endswith(f"`kill -2 {os.getpid()}` or `kill {os.getpid()}`")


def test_auto_resume_continues_in_place(train, tmp_path):
    train(tmp_path, max_steps=4, save_interval_steps=2, eval_interval=100)
    train(tmp_path, max_steps=6, save_interval_steps=2, eval_interval=100)  # --resume auto picks step 4
    steps = [row["step"] for row in read_metrics(tmp_path) if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_resume_takes_the_learning_rate_and_weight_decay_given_to_it(train, tmp_path, capsys):
    """Lowering the learning rate for a resume (what a NaN stop advises) takes effect: the checkpoint's optimizer and
    scheduler state held the old rate and decay, which the resume used silently. A note says what changed."""
    train(tmp_path, max_steps=8, save_interval_steps=4, eval_interval=100)
    capsys.readouterr()
    train(tmp_path, max_steps=8, save_interval_steps=4, eval_interval=100, learning_rate=1e-3, weight_decay=0.05,
          resume=tmp_path / "checkpoints" / "step_00000004")
    assert ("changed since the checkpoint: learning rate 0.003 -> 0.001, weight decay 0.1 -> 0.05; training goes on "
            "from step 4 with the new values") in capsys.readouterr().out
    lrs = {row["step"]: row["lr"] for row in read_metrics(tmp_path) if "lr" in row}
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(1e-3 * lr_multiplier(step - 1, 2, 8, 0.1)), step
    saved = torch.load(tmp_path / "checkpoints" / "step_00000008" / "training_state.pt", weights_only=False)
    assert {group["weight_decay"] for group in saved["optimizer"]["param_groups"]} == {0.0, 0.05}


@pytest.mark.parametrize("saved, asked", [("adamw", "muon"), ("muon", "adamw")])
def test_resuming_with_another_optimizer_is_one_line(train, tmp_path, saved, asked):
    """The checkpoint's optimizer state fits only its own optimizer (torch's loader raised a KeyError)."""
    train(tmp_path, max_steps=2, save_interval_steps=2, eval_interval=100, optimizer=saved)
    with pytest.raises(ConfigError, match=f"saved with --optimizer {saved}, this run has --optimizer {asked}: resume "
                                          f"with --optimizer {saved}"):
        train(tmp_path, max_steps=4, save_interval_steps=2, eval_interval=100, optimizer=asked)


def test_resuming_under_the_other_kind_of_engine_is_one_line(train, tmp_path):
    """A checkpoint of `python 4.pretrain.py` (plain PyTorch) resumed by `deepspeed 4.pretrain.py` (DeepSpeed, the
    engine under its launcher) ended in DeepSpeed's bare AssertionError."""
    train(tmp_path, max_steps=2, save_interval_steps=2, eval_interval=100)
    with pytest.raises(ConfigError, match=r"step_00000002 was saved by PyTorch \(--engine torch or fsdp\), this run "
                                          r"uses DeepSpeed: resume with --engine torch"):
        train(tmp_path, max_steps=4, save_interval_steps=2, eval_interval=100, engine="deepspeed")


def test_an_out_dir_that_cannot_be_made_is_one_line(train, tmp_path):
    """A file where the output directory should be (or a read-only mount): a ConfigError, which the stage prints as
    one line, not mkdir's traceback after the whole setup."""
    (tmp_path / "taken").write_text("")
    for out_dir, why in ((tmp_path / "taken", "create the directory {} (File exists"),
                         (tmp_path / "taken" / "run", "create the directory {} (Not a directory"),
                         (Path("/proc"), "write in the directory {} (")):  # there, but no file can be made in it
        with pytest.raises(ConfigError, match=re.escape(f"out_dir: cannot {why.format(out_dir)}")):
            train(out_dir, max_steps=1)


def test_a_warmup_as_long_as_the_run_is_told(train, tmp_path, capsys):
    """Hugging Face's Trainer accepts a warmup of max_steps or more without a word; the learning rate then never
    reaches its peak nor decays, which a note now says."""
    train(tmp_path, max_steps=2, warmup_iters=3, eval_interval=100, save_interval_steps=100)
    assert ("[train] note: the warmup (warmup_iters: 3 steps) is not shorter than the run (2 steps): the learning "
            "rate rises for the whole run, to 0.002 at its last step (learning_rate 0.003), and never decays"
            ) in capsys.readouterr().out


def test_another_stage_does_not_resume_a_checkpoint(train, tmp_path):
    """SFT pointed at pretraining's out_dir went on from its checkpoint as if it were SFT's own: pretraining's step,
    optimizer state, data position and best validation loss (and not the --init_from model)."""
    train(tmp_path, max_steps=2, save_interval_steps=2, eval_interval=100)
    with pytest.raises(ConfigError, match="step_00000002 is a checkpoint of pretrain, this run is sft: give this run "
                                          "its own --out_dir"):
        train(tmp_path, "sft", max_steps=4, init_from=tmp_path / "final")
    assert json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())["step"] == 2


def test_a_resume_says_when_init_from_names_another_model(train, tiny_pretrain_model, tmp_path, capsys):
    """The resume trains the checkpoint's model: an --init_from that names another one (the next pretraining's
    final/) was silently not used."""
    train(tmp_path, max_steps=2, save_interval_steps=2, eval_interval=100)
    train(tmp_path, max_steps=3, save_interval_steps=2, eval_interval=100, init_from=tiny_pretrain_model)
    assert (f"note: the checkpoint's run started from scratch, this run names --init_from {tiny_pretrain_model}: the "
            "resume goes on with the checkpoint's model") in capsys.readouterr().out
    train(tmp_path, max_steps=4, save_interval_steps=2, eval_interval=100, init_from=tiny_pretrain_model)
    assert "note: the checkpoint's run started from" not in capsys.readouterr().out


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_runs(train, tmp_path):
    """The same command started twice (a nohup line run again): the second resumed from the first's checkpoints and
    both wrote checkpoints, `latest` and metrics.jsonl between each other. Rank 0 locks out_dir for the run; the
    lock goes with its process, however that ends."""
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from mateconv.files import locked; lock = locked(Path(sys.argv[1]) / '.run.lock'); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"^{tmp_path} is in use by another run \\(pid {holder.pid}\\): stop it "
                                              f"first"):
            train(tmp_path, max_steps=2)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(tmp_path, max_steps=2)["step"] == 2


def test_val_size_holds_out_part_of_a_raw_file(train, tiny_embedded_data, tmp_path, capsys):
    """LLaMA-Factory's val_size on a raw data file: a share of its records is validation (val_loss, best/), the rest
    trains; a validation file besides it, or token shards as data_path, is a one-line error."""
    from mateconv.data import DataError

    source = tiny_embedded_data / "pretrain_train.jsonl"
    train(tmp_path, data_path=source, val_size=0.1, max_steps=4, eval_interval=2, eval_batches=2)
    out = capsys.readouterr().out
    records = {split: shard_info(tmp_path / "data_tokens" / split)["num_records"] for split in ("train", "val")}
    assert records["train"] + records["val"] == sum(1 for line in source.open() if line.strip())
    assert 0.05 < records["val"] / records["train"] < 0.2, records
    assert f"[pretrain] {source} (val, val_size 0.1): {records['val']:,} records" in out
    assert {2, 4} <= {row["step"] for row in read_metrics(tmp_path) if "val_loss" in row}
    assert (tmp_path / "best").is_dir()
    with pytest.raises(DataError, match=rf"^val_size holds out part of {source} for validation, and val_data_path "
                                        rf"names {source}: give one of them$"):
        train(tmp_path / "both", data_path=source, val_data_path=source, val_size=0.1, max_steps=1)
    with pytest.raises(DataError, match=r"^val_size holds out records of a raw data file; data_path .* is token "):
        train(tmp_path / "shards", val_size=0.1, max_steps=1)
    with pytest.raises(ConfigError, match=r"^val_size is the share of the records held out, in \[0, 1\): got 5.0$"):
        train(tmp_path / "share", data_path=source, val_size=5, max_steps=1)


def test_rotation_keeps_k_newest_plus_best(train, tmp_path):
    # a large learning rate makes validation loss rise after the first checkpoints, so best is an old one
    train(tmp_path, max_steps=10, save_interval_steps=1, eval_interval=1, keep_checkpoint_max=2, learning_rate=0.3,
          warmup_iters=0, grad_clip=0)
    val = {row["step"]: row["val_loss"] for row in read_metrics(tmp_path) if "val_loss" in row}
    best_step = min(val, key=val.get)
    root = tmp_path / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    expected = {f"step_{s:08d}" for s in (9, 10, best_step)}
    assert set(kept) == expected and len(kept) == len(expected)
    assert (root / "best").read_text() == f"step_{best_step:08d}"
    assert (root / "latest").read_text() == "step_00000010"
    assert not (root / ".incoming").exists() or not any((root / ".incoming").iterdir())
    state = json.loads((root / f"step_{best_step:08d}" / "trainer_state.json").read_text())
    assert state["best_val_loss"] == pytest.approx(val[best_step])
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_a_fresh_run_sets_an_earlier_runs_later_checkpoints_aside(train, tmp_path, capsys):
    """`--resume never` into an out_dir whose earlier run went further: its higher steps were taken for the newest,
    by rotation (which deleted each checkpoint the new run wrote) and when `latest` was damaged (the resume went on
    from the earlier run's step 9). They are moved to checkpoints/replaced/ with their pointers."""
    root = tmp_path / "checkpoints"
    train(tmp_path, max_steps=9, save_interval_steps=3, eval_interval=3, keep_checkpoint_max=5)
    capsys.readouterr()
    fresh = dict(save_interval_steps=2, eval_interval=100, keep_checkpoint_max=2, val_data_path="")  # no best/ kept
    train(tmp_path, max_steps=4, resume="never", **fresh)
    assert "3 checkpoint(s) of an earlier run past this run's start (step_00000003 to step_00000009)" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (root / "replaced").iterdir()) == ["best", "latest", *(f"step_0000000{s}" for s in (3, 6, 9))]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000002", "step_00000004"]
    assert (root / "latest").read_text() == "step_00000004" and not (root / "best").exists()
    state = root / "step_00000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a damaged latest: the resume goes back to this run's step 2
    train(tmp_path, max_steps=5, **fresh)
    out = capsys.readouterr().out
    assert f"resumed from {root / 'step_00000002'} at step 2" in out
    assert "earlier run" not in out  # step_00000004.damaged is not a checkpoint: nothing moved again
    assert (root / "replaced" / "step_00000009").is_dir()


def test_sft_loss_ignores_non_assistant_tokens(tiny_flags, tiny_embedded_data, tmp_path):
    """Noise on the logits at positions whose target is not an assistant token leaves the loss unchanged;
    noise on assistant targets changes it. Both assistant turns of a multi-turn chat are trained."""
    from mateconv.data.shards import SFTTokens
    from mateconv.data.tokenizing import build_shards
    from mateconv.train.models import build_model, load_tokenizer
    from mateconv.train.objectives import LMObjective

    config = parse_config(tiny_flags(tmp_path, "sft"))
    records = [json.loads(line) for line in (tiny_embedded_data / "sft_train.jsonl").read_text().splitlines()]
    chat = min((r for r in records if [m["role"] for m in r["messages"]].count("assistant") == 2
                and r["messages"][0]["role"] == "system"), key=lambda r: len(json.dumps(r)))
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    build_shards("sft", [tmp_path / "chat.jsonl"], config.data.tokenizer_path, tmp_path / "chat", workers=1,
                 progress=False)
    item = SFTTokens(tmp_path / "chat", config.model.max_seq_len)[0]
    tokenizer = load_tokenizer(config)
    trained = tokenizer.decode(item["labels"][item["labels"] != -100])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in chat["messages"] if m["role"] == "assistant")
    batch = {k: v[None] for k, v in item.items()}
    torch.manual_seed(0)
    model = build_model(config).eval()
    objective = LMObjective()
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    trained_positions = targets != -100

    def loss_with_noise(where: torch.Tensor) -> float:
        def hook(module, inputs, output):
            return output + 5 * torch.randn_like(output) * where[..., None]
        handle = model.lm_head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return objective.loss(model, batch)[0].item()
        finally:
            handle.remove()

    clean = loss_with_noise(torch.zeros_like(trained_positions))
    assert loss_with_noise(~trained_positions) == pytest.approx(clean, abs=1e-6)
    assert abs(loss_with_noise(trained_positions) - clean) > 1e-2
    # the stage itself trains on this data and writes an SFT model
    assert 0 < trained_positions.sum() < (batch["input_ids"] != tokenizer.pad_token_id).sum()


def test_sft_stage_from_pretrained(train, tiny_pretrain_model, tmp_path):
    summary = train(tmp_path / "sft", "sft", init_from=tiny_pretrain_model, max_steps=4, learning_rate=1e-3)
    assert summary["step"] == 4 and (tmp_path / "sft" / "final" / "model.safetensors").is_file()


def test_a_step_weighs_every_labelled_token_alike_however_the_batch_is_split(train, tiny_pretrain_model, tmp_path):
    """SFT rows hold very different numbers of assistant tokens: a step of 4 rows as 1 micro-batch of 4, 2 of 2 or 4
    of 1 is the same update, its loss the mean over all the step's labelled tokens (Hugging Face Trainer's
    `num_items_in_batch`). Before, each micro-batch's mean weighed alike, so a token of a short reply counted more."""
    from safetensors.torch import load_file

    splits = {"4x1": (4, 1), "2x2": (2, 2), "1x4": (1, 4)}
    for name, (batch_size, accumulation) in splits.items():
        train(tmp_path / name, "sft", init_from=tiny_pretrain_model, batch_size=batch_size,
              accumulation_steps=accumulation, max_steps=2, dropout=0.0, val_data_path="", save_interval_steps=100)
    rows = {name: [r for r in read_metrics(tmp_path / name) if "loss" in r] for name in splits}
    weights = {name: load_file(tmp_path / name / "final" / "model.safetensors") for name in splits}
    for name in ("2x2", "1x4"):
        for row, reference in zip(rows[name], rows["4x1"]):
            for key in ("loss", "lm_loss", "grad_norm"):
                assert row[key] == pytest.approx(reference[key], rel=1e-5), (name, row["step"], key)
        assert all(torch.allclose(weights[name][k], weights["4x1"][k], rtol=1e-5, atol=1e-6) for k in weights[name])


DPO_METRICS = ("dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "kl_ref", "nll/chosen")


def test_dpo_metrics_weigh_tokens_and_pairs_however_the_step_is_split(train, tiny_pretrain_model, tmp_path):
    """A DPO step of 4 pairs as 1 micro-batch of 4, 2 of 2 or 4 of 1 logs the same metrics: kl_ref and nll/chosen
    the mean over all the step's chosen-response tokens, as the one micro-batch of 4 computes it, the others over its
    pairs, as the held-out evaluation weighs them; and so does the loss, whose KL and SFT terms are those token means.
    Before, each micro-batch's mean weighed alike in both, so a token of a short response counted more (with
    sft_coef 1, as the tiny preset: loss 6.3962 as 4x1, 6.3729 as 1x4)."""
    splits = {"4x1": (4, 1), "2x2": (2, 2), "1x4": (1, 4)}
    for name, (batch_size, accumulation) in splits.items():
        train(tmp_path / name, "dpo", init_from=tiny_pretrain_model, batch_size=batch_size, kl_coef=0.5, sft_coef=1,
              accumulation_steps=accumulation, max_steps=3, dropout=0.0, val_data_path="", save_interval_steps=100)
    rows = {name: [r for r in read_metrics(tmp_path / name) if "loss" in r] for name in splits}
    assert rows["4x1"][-1]["kl_ref"] > 1e-4  # the policy has moved off the reference by step 3
    for name in ("2x2", "1x4"):
        assert len(rows[name]) == 3
        for row, reference in zip(rows[name], rows["4x1"]):
            for key in ("loss", "grad_norm", *DPO_METRICS):
                assert row[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), (name, row["step"], key)


@pytest.mark.slow
def test_dpo_metrics_over_two_ranks_weigh_their_tokens(train, tiny_flags, tiny_pretrain_model, tmp_path):
    """2 ranks (DDP) of 2 micro-batches of 1 pair log a step's metrics as 1 rank with 1 micro-batch of 4 does. The
    policy starts off its reference, so that kl_ref is not 0; one step, as DDP's sum of the gradients rounds apart
    from one process's by more than the tolerance after an update. Before, each rank's mean weighed alike."""
    from mateconv.procs import free_port

    train(tmp_path / "moved", "dpo", init_from=tiny_pretrain_model, max_steps=1, val_data_path="",
          save_interval_steps=100)
    flags = dict(init_from=tmp_path / "moved" / "final", ref_model_path=tiny_pretrain_model, max_steps=1,
                 dropout=0.0, val_data_path="", save_interval_steps=100)
    train(tmp_path / "1rank", "dpo", batch_size=4, **flags)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = tiny_flags(tmp_path / "2ranks", "dpo", batch_size=1, accumulation_steps=2, **flags)
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "9.train_dpo.py"), *args], cwd=REPO, env=single_thread_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (reference,), (row,) = ([r for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("1rank", "2ranks"))
    assert reference["kl_ref"] > 1e-4
    for key in ("loss", "grad_norm", *DPO_METRICS):
        assert row[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_a_checkpoint_of_a_run_from_a_saved_model_is_a_model_source(tiny_flags, tiny_pretrain_model, tmp_path):
    """SFT as the stages run it, from a pretrained model with no model flags: its checkpoint was refused as
    --init_from (and by export and chat), and its config.yaml as a config to run again, because the saved model
    section held the flags' defaults (dim 512, ...), which read back clashed with the model (dim 64)."""
    model_flags = {"--dim", "--n_layers", "--n_heads", "--n_kv_heads", "--vocab_size"}
    flags = tiny_flags(tmp_path / "sft", "sft", init_from=tiny_pretrain_model, max_steps=2, save_interval_steps=2,
                       eval_interval=100)
    flags = [flag for i, flag in enumerate(flags) if flag not in model_flags and flags[i - 1] not in model_flags]
    run(RECIPES["sft"], parse_config(flags))
    checkpoint = tmp_path / "sft" / "checkpoints" / "step_00000002"
    again = run(RECIPES["sft"], parse_config(tiny_flags(tmp_path / "again", "sft", init_from=checkpoint, max_steps=1)))
    assert again["step"] == 1
    rerun = parse_config([str(checkpoint / "config.yaml"), "--max_steps", "3"], RECIPES["sft"].defaults, "sft")
    assert rerun.checkpoint.init_from == str(tiny_pretrain_model) and rerun.optim.max_steps == 3
    # a checkpoint written before: its config.yaml holds the whole model section of the flags' defaults
    older = shutil.copytree(checkpoint, tmp_path / "older", ignore=shutil.ignore_patterns("model"))
    saved = yaml.safe_load((older / "config.yaml").read_text())
    saved["model"] = config_to_dict(parse_config([]))["model"]
    (older / "config.yaml").write_text(yaml.safe_dump(saved))
    sizes = json.loads((older / "manifest.json").read_text())  # as that run wrote it
    (older / "manifest.json").write_text(json.dumps({**sizes, "config.yaml": (older / "config.yaml").stat().st_size}))
    assert json.loads((model_dir(older) / "config.json").read_text())["dim"] == 64


def test_sft_packing_flag_trains_an_epoch_of_packed_rows(train, tiny_pretrain_model, tiny_tokens, tmp_path, capsys):
    """--packing reaches the stage's data: an epoch is as many steps as the packed rows fill, fewer than unpacked;
    the stage says how full the rows are."""
    from mateconv.data.shards import SFTTokens

    summaries = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        summaries[packing] = train(out, "sft", init_from=tiny_pretrain_model, max_steps=0, epochs=1, batch_size=16,
                                   accumulation_steps=1, packing=packing, eval_interval=1000, save_interval_steps=1000)
    seq = json.loads((tiny_pretrain_model / "config.json").read_text())["max_seq_len"]
    rows = {packing: len(SFTTokens(tiny_tokens / "sft" / "train", seq, packing=packing)) for packing in (False, True)}
    assert rows[True] < 0.6 * rows[False]
    for packing, summary in summaries.items():
        assert summary["step"] == rows[packing] // 16  # whole batches
    assert f"[sft] packing: {rows[False]:,} conversations in {rows[True]:,} rows" in capsys.readouterr().out
    # the log's real tokens are the non-pad positions: a packed row holds more of them
    real_share = {}
    for packing in (False, True):
        logged = [r for r in read_metrics(tmp_path / f"packing_{packing}") if "loss" in r]
        assert all(0 < r["real_tokens_per_sec"] <= r["tokens_per_sec"] for r in logged)
        real_share[packing] = statistics.mean(r["real_tokens_per_sec"] / r["tokens_per_sec"] for r in logged)
    dataset = SFTTokens(tiny_tokens / "sft" / "train", seq)
    assert real_share[False] == pytest.approx(dataset.num_real_tokens / (len(dataset) * seq), rel=0.05)
    assert real_share[True] > 1.8 * real_share[False]
    with pytest.raises(ConfigError, match="packing needs a model with document_mask"):
        train(tmp_path / "no_mask", "sft", init_from="", document_mask=False, packing=True, max_steps=1)


def test_sft_leaves_out_conversations_without_an_assistant_token_within_max_seq_len(train, tiny_pretrain_model,
                                                                                    tiny_tokenizer, tmp_path, capsys):
    from mateconv.data.tokenizing import build_shards

    rules = {"role": "system", "content": " ".join(["Answer politely and check every fact twice."] * 20)}
    long_prompts = [{"messages": [rules, {"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}."}]} for i in range(4)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(record) + "\n" for record in long_prompts))
    build_shards("sft", [tmp_path / "val.jsonl"], tiny_tokenizer, tmp_path / "val", workers=1, progress=False)
    summary = train(tmp_path / "cut", "sft", init_from=tiny_pretrain_model, max_seq_len=32, max_steps=2,
                    eval_interval=1, val_data_path=str(tmp_path / "val"))
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    said = capsys.readouterr().out
    assert re.search(r"\[sft\] [\d,]+ of [\d,]+ training conversations skipped: no assistant token in their first "
                     r"max_seq_len 32 tokens", said)
    assert "[sft] 4 of 4 validation conversations skipped" in said
    assert not any("val_loss" in row for row in read_metrics(tmp_path / "cut"))  # not a NaN one
    with pytest.raises(DataError, match="none of the .* SFT training conversations has an assistant token in its "
                       "first max_seq_len 8 tokens"):
        train(tmp_path / "none", "sft", init_from=tiny_pretrain_model, max_seq_len=8, max_steps=2)


def test_lora_sft_saves_merged_model(train, tiny_pretrain_model, tmp_path, recwarn):
    train(tmp_path / "lora", "sft", init_from=tiny_pretrain_model, max_steps=3, use_lora=True, lora_r=4,
          learning_rate=1e-2)
    assert not [str(w.message) for w in recwarn if w.category is FutureWarning]  # peft's, in every LoRA log before
    with pytest.raises(ConfigError, match=r"resume: .*step_00000003 holds another model \(lora_alpha 16 there, 32 "
                                          r"here\)"):
        train(tmp_path / "lora", "sft", init_from=tiny_pretrain_model, max_steps=4, use_lora=True, lora_r=4,
              lora_alpha=32)  # it resumed, scaling the trained adapters by 8 instead of 4
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_pretrain_model)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    assert not any("lora" in name for name in merged.state_dict())
    changed = [name for name, p in merged.named_parameters()
               if not torch.equal(p, base.get_parameter(name))]
    # every target trained (q/k/v did not: the fused projection read their raw weights past the adapters)
    assert {n.split(".")[-2] for n in changed} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    # the adapter on its own, as peft users load it onto the base model, is the merged model
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base, tmp_path / "lora" / "final" / "adapter").eval()
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_all_linear_adapts_every_linear_layer_but_the_output_head(train, tmp_path):
    """`--lora_target_modules all-linear`, as PEFT and TRL users write it, stopped: 'no module of the model is named
    all-linear'. PEFT's meaning: every linear layer except the output head (here untied, so itself linear)."""
    train(tmp_path / "base", max_steps=1, use_moe=True, n_routed_experts=2, num_experts_per_tok=1,
          tie_word_embeddings=False)
    train(tmp_path / "lora", "sft", init_from=tmp_path / "base" / "final", max_steps=2, use_lora=True,
          lora_target_modules="all-linear", learning_rate=1e-2)
    adapter = json.loads((tmp_path / "lora" / "final" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                 "up_proj", "v_proj"]  # gate: the MoE router
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base" / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    changed = {name.split(".")[-2] for name, p in merged.named_parameters()
               if not torch.equal(p, base.get_parameter(name))}
    assert changed == set(adapter["target_modules"])
    with pytest.raises(ConfigError, match="^lora_target_modules: all-linear names every linear layer; give it alone$"):
        train(tmp_path / "both", "sft", init_from=tmp_path / "base" / "final", max_steps=1, use_lora=True,
              lora_target_modules="all-linear,lm_head")


def test_lora_target_modules_given_must_all_be_there(tiny_flags, tiny_pretrain_model, tmp_path):
    """`--lora_target_modules q_proj v_porj` trained q_proj alone and said nothing of the misspelt v_proj."""
    from mateconv.train.command import main

    flags = tiny_flags(tmp_path / "lora", "sft", init_from=tiny_pretrain_model, max_steps=1, use_lora=True,
                       lora_target_modules="q_proj,v_porj")
    with pytest.raises(SystemExit) as stopped:
        main("sft", flags)
    assert str(stopped.value) == ("sft: lora_target_modules: no module of the model is named v_porj (its linear "
                                  "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")


def test_lora_target_modules_must_name_linear_layers(tiny_flags, tiny_pretrain_model, tmp_path):
    """`--lora_target_modules q_proj norm` ended in peft's traceback (RMSNorm is not supported); `embed_tokens`, and
    `lm_head` tied to it, were adapted, and the merged final/ model was not the model trained (it changed both)."""
    from mateconv.train.command import main

    linears = ("LoRA adapts these linear layers of the model: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
               "v_proj")
    for name, problem in (("norm", "is not a linear layer"), ("embed_tokens", "is not a linear layer"),
                          ("lm_head", "shares its weight with another layer (tied embeddings): merged into the saved "
                                      "model the adapter would change both")):
        flags = tiny_flags(tmp_path / name, "sft", init_from=tiny_pretrain_model, max_steps=1, use_lora=True,
                           lora_target_modules=f"q_proj,{name}")
        with pytest.raises(SystemExit) as stopped:
            main("sft", flags)
        assert str(stopped.value) == f"sft: lora_target_modules: {name} {problem} ({linears})"


def test_init_from_a_runs_output_directory_names_its_final_model(tiny_flags, tiny_pretrain_model, tmp_path):
    """`--init_from out/pretrain` (the run, not its model) failed in transformers: 'Unrecognized model ... Should have
    a `model_type` key in its config.json', which names neither the mistake nor the fix; so did a stopped run's."""
    from mateconv.train.command import main

    run_dir = tiny_pretrain_model.parent
    with pytest.raises(SystemExit) as stopped:
        main("sft", tiny_flags(tmp_path / "sft", "sft", init_from=run_dir))
    assert str(stopped.value) == (f"sft: init_from: {run_dir} is a training run's output directory; its model is "
                                  f"{run_dir / 'final'}")
    # a run stopped before its end (kill -2, the stop file) has no final/: its checkpoints are models
    stopped_run = shutil.copytree(run_dir, tmp_path / "stopped", ignore=shutil.ignore_patterns("final"))
    with pytest.raises(SystemExit) as stopped:
        main("sft", tiny_flags(tmp_path / "sft", "sft", init_from=stopped_run))
    assert str(stopped.value) == (f"sft: init_from: {stopped_run} is the output directory of a training run that has "
                                  f"not reached its end (no final/); its newest checkpoint, "
                                  f"{stopped_run / 'checkpoints' / 'step_00000006'}, is a model too")


def test_lora_needs_a_trained_model(tiny_flags, tmp_path):
    """`4.pretrain.py --use_lora` trained rank-8 adapters on a random model (its weights frozen) and said nothing."""
    from mateconv.train.command import main

    with pytest.raises(SystemExit) as stopped:
        main("pretrain", tiny_flags(tmp_path / "scratch", use_lora=True))
    assert str(stopped.value) == ("pretrain: use_lora adapts a trained model, and this run starts from a random one "
                                  "(no init_from or init_weights): name the model to adapt, or train without "
                                  "--use_lora")
    assert not (tmp_path / "scratch").exists()


def test_muon_trains(train, tmp_path):
    train(tmp_path, max_steps=8, optimizer="muon", muon_lr=0.02, eval_interval=100)
    curve = losses(tmp_path)
    assert curve[8] < curve[1] - 0.3


def test_moe_and_lora_settings_that_do_nothing_are_told(train, tmp_path, capsys):
    """Seed 001's `--use_moe --n_routed_experts 8 --num_experts_per_tok 2` without its `--use_moe` trained a dense
    model and said nothing: the settings did nothing. One note names them."""
    train(tmp_path, max_steps=1, eval_interval=100, n_routed_experts=8, num_experts_per_tok=1, lora_r=4)
    notes = [line for line in capsys.readouterr().out.splitlines() if "do nothing" in line]
    assert notes == ["[pretrain] note: the MoE settings n_routed_experts 8, num_experts_per_tok 1 do nothing: this "
                     "model is dense (use_moe false)",  # and LoRA's without --use_lora: the whole model trained
                     "[pretrain] note: the LoRA settings lora_r 4 do nothing: use_lora is false, every weight trains"
                     ], notes
    assert not any(key.startswith("moe/") for row in read_metrics(tmp_path) for key in row)


def test_grouped_experts_that_cannot_run_here_are_one_line(train, tmp_path):
    """`--moe_impl grouped` where torch._grouped_mm cannot run (fp32 rows of 34 x 4 bytes, not a multiple of 16) was
    a RuntimeError traceback from the first forward; it is a ConfigError (one line) before training."""
    with pytest.raises(ConfigError, match=r"moe_impl grouped: torch._grouped_mm does not take torch.float32 on cpu "
                                          r"for experts of shape \(128, 34\); use moe_impl auto"):
        train(tmp_path, max_steps=1, use_moe=True, moe_impl="grouped", dim=34, n_heads=1, n_kv_heads=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_resume_names_a_changed_balance_loss_weight(train, tmp_path, capsys):
    """`--aux_loss_alpha` (or `--seq_aux`, `--dropout`) changed for a resume took effect without a word, while a changed
    learning rate is named: the note names it too."""
    moe = dict(use_moe=True, eval_interval=100, save_interval_steps=2)
    train(tmp_path, max_steps=2, **moe)
    capsys.readouterr()
    train(tmp_path, max_steps=3, aux_loss_alpha=0.01, **moe)
    notes = [line for line in capsys.readouterr().out.splitlines() if "changed since the checkpoint" in line]
    assert len(notes) == 1 and "aux_loss_alpha 0.1 -> 0.01" in notes[0], notes


def test_moe_expert_load_in_wandb_offline_run(train, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train(tmp_path, max_steps=4, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, tracker="wandb",
          eval_interval=4, eval_batches=2, log_interval=2)
    import wandb
    from wandb_records import history_rows

    wandb.teardown()  # run.finish() can return before the service has written the run file's last block

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = history_rows(runs[0])
    assert [int(r["_step"]) for r in rows if "loss" in r] == [2, 4]
    last = [r for r in rows if "loss" in r][-1]
    for layer in range(2):
        fractions = [last[f"moe/layer{layer}/expert{e}"] for e in range(4)]
        assert sum(fractions) == pytest.approx(1.0, abs=1e-5) and all(0 <= f <= 1 for f in fractions)
        assert last[f"moe/layer{layer}/cv"] == pytest.approx(statistics.pstdev(fractions) / statistics.mean(fractions),
                                                             rel=1e-4)
    assert last["moe/aux_loss"] > 0
    jsonl = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert jsonl["moe/layer1/expert3"] == pytest.approx(last["moe/layer1/expert3"])
    # val_loss is the cross-entropy, as the evaluation's: the balance loss trains the router, it is not a score
    evaluation = next(r for r in read_metrics(tmp_path) if "val_loss" in r)
    assert evaluation["val_loss"] == pytest.approx(math.log(evaluation["val_ppl"]), rel=1e-6)


def test_sft_expert_load_and_balance_loss_count_the_real_tokens_only(train, tmp_path, tiny_tokenizer):
    """One SFT step of 2 micro-batches over 4 rows of 3 to 60 tokens, padded to 96: the logged moe/ load is the share
    of the real tokens' picks (each micro-batch weighted by its real tokens) and moe/aux_loss the per-row balance loss
    of the real tokens. Before, the padding (81% of these positions) was counted as load and in the balance loss."""
    from mateconv.data.tokenizing import write_sft_rows
    from model import MateConvForCausalLM

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (3, 5, 40, 60)]
    data = write_sft_rows(rows, tiny_tokenizer, tmp_path / "rows")
    train(tmp_path / "run", "sft", init_from="", data_path=data, val_data_path="", use_moe=True, n_routed_experts=4,
          num_experts_per_tok=2, batch_size=2, accumulation_steps=2, max_steps=1, learning_rate=1e-12)
    logged = next(r for r in read_metrics(tmp_path / "run") if "loss" in r)
    model = MateConvForCausalLM.from_pretrained(tmp_path / "run" / "final").train()  # lr 1e-12: the step's weights
    counts, auxes = 0, []
    with torch.no_grad():
        for row in rows:
            auxes.append(model(torch.tensor([row])).aux_loss)
            counts = counts + model.expert_load() * len(row)
    load = counts / sum(len(row) for row in rows)
    for layer in range(2):
        assert [logged[f"moe/layer{layer}/expert{e}"] for e in range(4)] == pytest.approx(load[layer].tolist(),
                                                                                         abs=1e-6)
    assert logged["moe/aux_loss"] == pytest.approx(torch.stack(auxes).mean().item(), rel=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])  # 2: `kill -2` reaches the persistent loader workers too
def test_sigint_saves_checkpoint_and_exits_zero(tiny_flags, tmp_path, num_workers):
    command = [sys.executable, str(REPO / "4.pretrain.py"),
               *tiny_flags(tmp_path, max_steps=100000, save_interval_steps=100000, eval_interval=100000,
                           num_workers=num_workers)]
    process = subprocess.Popen(command, cwd=REPO, env=single_thread_env(), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (tmp_path / "metrics.jsonl").is_file() and len(losses(tmp_path)) >= 3:
                break
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert "SIGINT received" in output
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step_"))
    assert step == max(losses(tmp_path))  # the checkpoint is the last finished step
    from model import MateConvForCausalLM

    checkpoint = tmp_path / "checkpoints" / latest
    config = parse_config([str(checkpoint / "config.yaml")])
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    model = MateConvForCausalLM(config.model)
    model.load_state_dict(state["model"])
    assert state["scheduler"]["last_epoch"] == step
    assert not (tmp_path / "final").exists()  # a stopped run is not final


def test_frozen_weights_count_no_weight_gradient_flops():
    """A LoRA run's frozen weights get no weight gradient, 4 FLOPs per parameter and token, not 6: its MFU was counted
    1.5 x too high."""
    from peft import LoraConfig, get_peft_model

    from mateconv.train.tracking import active_parameters, flops_per_token
    from model.config import MateConvConfig
    from model.modeling import MateConvForCausalLM

    model = MateConvForCausalLM(MateConvConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512))
    attention = 12 * 2 * 64 * 32
    dense = active_parameters(model)
    assert flops_per_token(model, 32) == 6 * dense + attention
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).get_base_model()
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapters == 2 * 4 * ((64 + 64) + (64 + 32))  # rank 4 on q_proj, v_proj (2 kv heads of 16) of 2 layers
    assert active_parameters(lora) == dense + adapters
    assert flops_per_token(lora, 32) == 4 * (dense + adapters) + 2 * adapters + attention


def test_the_cpu_peak_is_not_lowered_by_programs_busy_during_part_of_its_measurement():
    """A peak measured while other programs held the core (W&B's service starting, another rank's first step) was
    their mean rate, which the training later exceeded: MFU above 1 on a CPU. Here two programs spin on this process's
    one core for as long as a quiet measurement takes, a third of the disturbed one's products or so."""
    from mateconv.train.tracking import measure_cpu_flops

    cores = os.sched_getaffinity(0)
    core = min(cores)
    os.sched_setaffinity(0, {core})
    try:
        start = time.perf_counter()
        quiet = measure_cpu_flops(repeats=20)
        seconds = time.perf_counter() - start
        spin = (f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nprint(flush=True)\n"
                f"end = time.time() + {seconds}\nwhile time.time() < end: pass")
        busy = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for process in busy:
            process.stdout.readline()  # it spins from now on
        disturbed = measure_cpu_flops(repeats=20)
        for process in busy:
            process.wait()
    finally:
        os.sched_setaffinity(0, cores)
    assert disturbed > 0.8 * quiet, (disturbed, quiet)


def test_metrics_file_is_truncated_to_the_resumed_step(tmp_path):
    from mateconv.train.tracking import Tracker

    config = parse_config(["--tracker", "none"])
    first = Tracker(config, tmp_path, enabled=True)
    for step in range(5):
        first.log(step, {"loss": float(step)})
    Tracker(config, tmp_path, enabled=True, resumed_step=2)  # a resume at step 2 replays steps 3, 4
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1, 2]
    Tracker(config, tmp_path, enabled=True)  # a fresh run (resume never) starts the file over
    assert read_metrics(tmp_path) == []


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A run killed after its last checkpoint logged steps it replays on resume; TensorBoard (as metrics.jsonl) keeps
    the replayed ones only, and a fresh run in the same out_dir starts over."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mateconv.train.tracking import Tracker

    config = parse_config(["--tracker", "tensorboard"])

    def run(first: int, last: int, resumed_step: int = 0) -> None:
        tracker = Tracker(config, tmp_path, enabled=True, resumed_step=resumed_step)
        for step in range(first, last + 1):
            tracker.log(step, {"loss": float(step) + 0.5 * resumed_step})
        tracker.finish()

    def curve() -> list[tuple[int, float]]:
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(event.step, event.value) for event in events.Scalars("loss")]

    run(1, 5)
    run(3, 6, resumed_step=2)  # killed after step 5, resumed from the step-2 checkpoint
    assert curve() == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (5, 6.0), (6, 7.0)]
    run(1, 2)
    assert curve() == [(1, 1.0), (2, 2.0)]


def test_half_precision_on_a_cpu_trains_and_says_it_is_slow(train, tmp_path, capsys):
    """Seed 003's example config asks for float16; on this CPU that trained ~24x slower than float32 (173 vs 4,122
    tok/s for a 4-layer dim-256 model). It still trains, with a note; float32 (our CPU default) says nothing."""
    train(tmp_path / "half", max_steps=2, dtype="bfloat16", eval_interval=100)
    assert "note: dtype bfloat16 on a CPU trains many times slower than float32" in capsys.readouterr().out
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "half").values())
    train(tmp_path / "fp32", max_steps=1, eval_interval=100)
    assert "note: dtype" not in capsys.readouterr().out


def test_a_cpu_run_logs_only_its_own_lines(tiny_flags, tmp_path):
    """A stage's log under nohup on a CPU machine holds its own lines only: DeepSpeed, imported by transformers'
    save, printed a WARNING that it guessed the CPU accelerator into every log of the demo."""
    env = {k: v for k, v in single_thread_env().items() if k != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, str(REPO / "4.pretrain.py"), *tiny_flags(tmp_path, max_steps=2)],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and (tmp_path / "final").is_dir(), log[-2000:]
    assert "warning" not in log.lower(), log


def test_moe_validation_under_deepspeed_leaves_out_the_balance_loss(tiny_flags, tmp_path):
    """The DeepSpeed engine keeps `training` True after `eval()` (only its module turns), so the LM objective took a
    validation batch for training and subtracted the MoE balance loss from the cross-entropy: `val_ppl` was below
    exp(`val_loss`) (383 for 468 at 2 ranks). Eval mode, as on the plain engine: the cross-entropy alone."""
    command = [sys.executable, str(REPO / "4.pretrain.py"), *tiny_flags(tmp_path, max_steps=1, eval_interval=1,
                                                                         eval_batches=2, use_moe=True),
               "--engine", "deepspeed"]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(row for row in read_metrics(tmp_path) if "val_loss" in row)
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-6), row


def test_deepspeed_zero0_muon_reports_a_real_grad_norm(tiny_flags, tmp_path):
    """DeepSpeed steps a ZeRO-0 fp32 optimizer as it is, without a grad norm: with its own Muon every logged
    grad_norm was NaN. Our Muon under CheckedStep measures it (single process: the DeepSpeed engine without the
    launcher)."""
    command = [sys.executable, str(REPO / "4.pretrain.py"), *tiny_flags(tmp_path, max_steps=3, log_interval=1),
               "--engine", "deepspeed", "--zero_stage", "0", "--optimizer", "muon"]
    result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    norms = [row["grad_norm"] for row in read_metrics(tmp_path) if "grad_norm" in row]
    assert len(norms) == 3 and all(0 < norm < 1e3 for norm in norms), norms


def test_deepspeed_zero0_fp32_resume_follows_the_schedule(tiny_flags, tmp_path):
    """DeepSpeed ZeRO-0 in fp32 (CheckedStep): a resumed run gives the uninterrupted run's losses. CheckedStep kept the
    param groups of the optimizer it wrapped, which loading the checkpoint replaces: the schedule then set the rates
    of groups nobody stepped, and the resumed run trained at the checkpoint's rate from then on."""
    def pretrain(out: Path, *more: str) -> None:
        command = [sys.executable, str(REPO / "4.pretrain.py"), *tiny_flags(out, max_steps=8, eval_interval=100,
                                                                             save_interval_steps=4),
                   "--engine", "deepspeed", "--zero_stage", "0", *more]
        result = subprocess.run(command, cwd=REPO, env=single_thread_env(), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    pretrain(tmp_path / "full")
    pretrain(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_00000004"))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(abs(loss - full[step]) < 1e-5 for step, loss in resumed.items()), (full, resumed)


def test_one_rank_agrees_with_itself_without_a_collective(monkeypatch):
    """Under DeepSpeed's launcher with one GPU a process group of one rank exists; the stop check, made every step,
    must not all-reduce and wait for the device there."""
    import torch.distributed as dist

    from mateconv.procs import free_port
    from mateconv.train.distributed import any_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        calls = []
        monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: calls.append(args))
        cpu = torch.device("cpu")
        assert any_rank(True, cpu) is True and any_rank(False, cpu) is False
        assert calls == []
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_a_lone_rank_takes_no_port(engine):
    """`python 4.pretrain.py --engine deepspeed|fsdp` without a launcher is a process group of one rank: it must not
    need a TCP port, which another run can hold (here MASTER_PORT names one that is taken)."""
    import socket

    code = ("from mateconv.config import ParallelConfig; from mateconv.train.distributed import setup; "
            f"import torch.distributed as dist; setup(ParallelConfig(engine={engine!r}, device='cpu')); "
            "print('world', dist.get_world_size())")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {key: value for key, value in single_thread_env().items() if key not in ("RANK", "WORLD_SIZE")}
        env["MASTER_PORT"] = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0 and "world 1" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_expert_load_over_ranks_weighs_each_by_its_real_tokens(tmp_path):
    """Two ranks: one saw a quarter real tokens (SFT padding), the other only real ones. The logged load is the mean
    over all real tokens, not the plain mean of the two ranks' loads."""
    from mateconv.procs import free_port

    script = tmp_path / "loads.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from mateconv.train.engine import Window\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "window = Window(0.0)\n"
        "window.add_load(torch.tensor([[1.0, 0.0]]) if rank == 0 else torch.tensor([[0.0, 1.0]]), 0.25 if rank == 0"
        " else 1.0)\n"
        f"open(f'{tmp_path}/{{rank}}.txt', 'w').write(str(window.mean_load().tolist()))\n"
        "dist.destroy_process_group()\n")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
                            cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for rank in (0, 1):  # (0.25 * [1, 0] + 1.0 * [0, 1]) / 1.25; the plain mean of the two would be [0.5, 0.5]
        assert torch.tensor(json.loads((tmp_path / f"{rank}.txt").read_text())).allclose(torch.tensor([[0.2, 0.8]]))
