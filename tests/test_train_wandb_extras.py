"""W&B extras of the engine, on a real offline run: gradient histograms (wandb.watch), the final model and the code
as artifacts, GPU utilisation (absent on CPU), and the one-line errors for a bad watch setting."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import wandb

from mateconv.config import parse_config
from mateconv.train import tracking
from mateconv.train.command import main
from mateconv.train.stages import RECIPES, run
from conftest import REPO, read_metrics
from wandb_records import history_rows, records


@pytest.fixture(scope="module")
def offline_run(tiny_flags, tmp_path_factory) -> Path:
    """One tiny pretraining run (4 steps, 2 micro-batches each) with every W&B extra on; returns its out_dir."""
    out_dir = tmp_path_factory.mktemp("wandb_extras")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("WANDB_DATA_DIR", str(out_dir / "wandb_data"))  # artifact staging, not ~/.local/share/wandb
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            flags = tiny_flags(out_dir, max_steps=4, accumulation_steps=2, eval_interval=100, save_interval_steps=100,
                               tracker="wandb", wandb_watch="gradients", wandb_watch_freq=1)
            run(RECIPES["pretrain"], parse_config(flags + ["--wandb_log_model", "--wandb_log_code"]))
            wandb.teardown()  # run.finish() can return before the service has written the run file's last block
        finally:
            torch.set_num_threads(threads)
    return out_dir


def run_file(out_dir: Path) -> Path:
    (path,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return path


def artifacts(out_dir: Path) -> dict[str, object]:
    """The artifact records of the run, by type."""
    found = {}
    for record in records(run_file(out_dir)):
        if record.WhichOneof("record_type") == "artifact":
            found[record.artifact.type] = record.artifact
    return found


def test_gradient_histograms_are_logged_on_their_step(offline_run):
    from transformers import AutoModelForCausalLM

    rows = history_rows(run_file(offline_run))
    with_gradients = [row for row in rows if any(key.startswith("gradients/") for key in row)]
    # log_freq 1: every step's histograms, on that step's row (not on the previous one, as W&B would by default)
    assert [int(row["_step"]) for row in with_gradients] == [1, 2, 3, 4]
    assert [int(row["_step"]) for row in rows if "loss" in row] == [1, 2, 3, 4]
    parameters = dict(AutoModelForCausalLM.from_pretrained(offline_run / "final").named_parameters())
    for row in with_gradients:
        names = {key.removeprefix("gradients/").rsplit("/", 1)[0] for key in row if key.startswith("gradients/")}
        assert names == set(parameters)
        for name, parameter in parameters.items():
            assert row[f"gradients/{name}/_type"] == "histogram"
            assert sum(row[f"gradients/{name}/values"]) == parameter.numel()  # every element counted once
            assert len(row[f"gradients/{name}/bins"]) == len(row[f"gradients/{name}/values"]) + 1
    first, last = (row["gradients/model.layers.1.mlp.down_proj.weight/bins"] for row in (with_gradients[0],
                                                                                      with_gradients[-1]))
    assert first != last  # each step's own gradients


def test_final_model_is_a_model_artifact(offline_run):
    model = artifacts(offline_run)["model"]
    assert model.name.startswith(f"{offline_run.name}-")
    files = {entry.path: entry for entry in model.manifest.contents}
    final = offline_run / "final"
    assert set(files) == {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    staged = Path(files["model.safetensors"].local_path)  # the copy W&B uploads on `wandb sync`
    assert staged.read_bytes() == (final / "model.safetensors").read_bytes()
    assert {"final", "step-4"} <= set(model.aliases)


def test_code_artifact_holds_the_project_sources(offline_run):
    code = artifacts(offline_run)["code"]
    files = {entry.path: entry for entry in code.manifest.contents}
    assert {"4.pretrain.py", "mateconv/train/engine.py", "mateconv/train/tracking.py", "model/__init__.py"} <= set(files)
    assert code.name == f"source-mateconv-{offline_run.name}"
    assert all(path.endswith(".py") and (path.split("/")[0] in ("model", "mateconv") or "/" not in path and path[0].isdigit())
               for path in files)
    assert not any(path.startswith(("tests/", ".venv/", "out/", "wandb/", "benchmarks/")) for path in files)
    staged = Path(files["mateconv/train/tracking.py"].local_path)
    assert staged.read_bytes() == (REPO / "mateconv/train/tracking.py").read_bytes()


def test_no_gpu_utilization_on_cpu(offline_run):
    rows = [row for row in read_metrics(offline_run) if "loss" in row]
    assert rows and all("memory/rss_gb" in row and "gpu/utilization" not in row for row in rows)
    assert tracking.gpu_utilization_metrics(torch.device("cpu")) == {}


def test_gpu_utilization_without_nvml_is_skipped_quietly(monkeypatch):
    if torch.cuda.is_available():
        value = tracking.gpu_utilization_metrics(torch.device("cuda"))
        assert not value or 0 <= value["gpu/utilization"] <= 100
        return
    monkeypatch.setattr(tracking, "_nvml_unavailable", False)
    assert tracking.gpu_utilization_metrics(torch.device("cuda")) == {}  # no GPU/NVML here: no key, no exception
    assert tracking._nvml_unavailable  # and it is not tried again


@pytest.mark.parametrize("flags, message", [
    (["--wandb_watch", "gradient"], "wandb_watch: 'gradient' is not one of \"\", gradients, parameters, all"),
    (["--wandb_watch", "all", "--zero_stage", "3"], "wandb_watch is not supported with zero_stage 3"),
    (["--wandb_watch_freq", "0"], "wandb_watch_freq must be positive, got 0"),
])
def test_bad_watch_settings_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as error:
        main("pretrain", flags)
    text = str(error.value)
    assert text.startswith(f"pretrain: {message}") and "\n" not in text


def test_unreachable_wandb_server_falls_back_to_offline(tiny_flags, tmp_path, monkeypatch, capsys):
    """An API key set but the W&B server unreachable (a loopback port nothing listens on): the real client gives up
    after its init timeout, the stage says so in one line, logs offline and trains to the end."""
    import socket

    with socket.socket() as probe:  # a free port, closed again: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    flags = tiny_flags(tmp_path, max_steps=3, eval_interval=100, save_interval_steps=100, tracker="wandb")
    summary = run(RECIPES["pretrain"], parse_config(flags))
    wandb.teardown()
    assert summary["step"] == 3 and not summary["stopped"]
    out = capsys.readouterr().out
    assert "[train] W&B: CommError: " in out and f"logging offline to {tmp_path}/wandb instead" in out
    assert [int(row["_step"]) for row in history_rows(run_file(tmp_path)) if "loss" in row] == [1, 2, 3]


def test_a_login_to_a_self_hosted_server_counts_as_a_key(tmp_path, monkeypatch):
    """`wandb login --host URL` stores the key in netrc under that server's host: with WANDB_BASE_URL naming it, the
    stage has a key and logs online (before, only api.wandb.ai's entry counted: the run went offline without trying
    its server). A key for another server is none."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8443")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for host, logged_in in (("wandb.example.com:8443", True), ("api.wandb.ai", False)):
        (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'a' * 40}\n")
        wandb.teardown()  # W&B reads its settings (WANDB_BASE_URL) once per setup
        assert tracking.wandb_logged_in() is logged_in, host
    wandb.teardown()


@pytest.fixture(scope="module")
def moe_stage_runs(tiny_flags, tmp_path_factory) -> dict[str, Path]:
    """A tiny MoE model's SFT from scratch (4 steps, a checkpoint and an evaluation every 2, each checkpoint's model
    logged: `--wandb_log_model checkpoint`) and its DPO (4 steps, evaluations at 0, 2 and 4); their out_dirs."""
    root = tmp_path_factory.mktemp("moe_stages")
    common = dict(max_steps=4, log_interval=2, eval_interval=2, eval_batches=2, save_interval_steps=2,
                  tracker="wandb")
    stages = {"sft": dict(init_from="", use_moe=True, n_routed_experts=4, num_experts_per_tok=2,
                          wandb_log_model="checkpoint"),
              "dpo": dict(init_from=root / "sft" / "final")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("WANDB_DATA_DIR", str(root / "wandb_data"))
        patch.setenv("WANDB_RUN_GROUP", "moe-pipeline")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for stage, settings in stages.items():
                flags = tiny_flags(root / stage, stage, **common, **settings)
                run(RECIPES[stage], parse_config(flags, RECIPES[stage].defaults))
                wandb.teardown()
        finally:
            torch.set_num_threads(threads)
    return {stage: root / stage for stage in stages}


def run_record(out_dir: Path):
    return next(r.run for r in records(run_file(out_dir)) if r.WhichOneof("record_type") == "run")


def test_a_pipeline_is_one_group_of_runs_by_stage(moe_stage_runs):
    """$WANDB_RUN_GROUP groups the stages' runs; each run's job type is its stage (before: no job type, so the
    group's SFT and DPO runs told apart only by their random names)."""
    assert [(run_record(moe_stage_runs[stage]).run_group, run_record(moe_stage_runs[stage]).job_type)
            for stage in ("sft", "dpo")] == [("moe-pipeline", "sft"), ("moe-pipeline", "dpo")]


def run_config(out_dir: Path) -> dict:
    """The W&B config of a run: the one at init and the updates after it."""
    config = {}
    for record in records(run_file(out_dir)):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update})
    return config


TRAINING_CHARTS = {"loss", "lr", "grad_norm", "tokens_per_sec", "real_tokens_per_sec", "mfu", "epoch",
                   "nonfinite_steps", "memory/rss_gb", "moe/aux_loss", "moe/cv_mean", "moe/layer0/cv",
                   "moe/layer1/cv"} | {f"moe/layer{layer}/expert{e}" for layer in range(2) for e in range(4)}


def test_sft_charts_and_config_in_wandb(moe_stage_runs):
    """What a user sees of an SFT run: the training charts with the cross-entropy beside the loss (a MoE run's loss
    adds the balance loss, so MoE and dense runs compare on lm_loss), the evaluations, and the run's parameter
    counts beside its flags."""
    rows = history_rows(run_file(moe_stage_runs["sft"]))
    trained = [row for row in rows if "loss" in row]
    assert [int(row["_step"]) for row in trained] == [2, 4]
    for row in trained:
        assert TRAINING_CHARTS | {"lm_loss", "ppl", "val_loss", "val_ppl"} <= set(row)
        assert row["loss"] > row["lm_loss"] and row["ppl"] == pytest.approx(math.exp(row["lm_loss"]), rel=1e-5)
    config = run_config(moe_stage_runs["sft"])
    assert config["model"]["use_moe"] is True and config["track"]["wandb_log_model"] == "checkpoint"
    facts = config["run"]
    assert facts["parameters"] > facts["active_parameters"] > 0 and facts["world_size"] == 1
    assert facts["global_batch_size"] == 4 and facts["trainable_parameters"] == facts["parameters"]


def test_dpo_evaluations_are_in_eval_mode(moe_stage_runs):
    """DPO's held-out pairs are scored in eval mode at every evaluation: val_loss is the preference loss alone, as at
    step 0. Before, the evaluations during training ran in train mode, so from step 2 on val_loss (which picks best/)
    added the MoE balance loss, logged as eval/aux_loss, and dropout was on; eval/loss repeated val_loss."""
    rows = history_rows(run_file(moe_stage_runs["dpo"]))
    evaluations = [row for row in rows if "val_loss" in row]
    assert [int(row["_step"]) for row in evaluations] == [0, 2, 4]
    for row in evaluations:
        assert row["val_loss"] == pytest.approx(row["eval/dpo_loss"], rel=1e-6)
        assert {"eval/rewards/accuracies", "eval/rewards/margins", "eval/kl_ref"} <= set(row)
        assert "eval/aux_loss" not in row and "eval/loss" not in row
    for row in (row for row in rows if "loss" in row):
        assert TRAINING_CHARTS | {"dpo_loss", "rewards/accuracies", "rewards/margins", "kl_ref"} <= set(row)
        assert "lm_loss" not in row and "ppl" not in row
    # the model section is the SFT model's (the model flags are ignored with init_from: they showed use_moe false)
    model = run_config(moe_stage_runs["dpo"])["model"]
    assert model["use_moe"] is True and model["n_routed_experts"] == 4
    assert model["architecture"] == "MateConvForCausalLM"


def test_each_checkpoint_model_is_a_version_of_the_model_artifact(moe_stage_runs, tmp_path):
    """`--wandb_log_model checkpoint`: at each save the model in Hugging Face format (loadable as it is) becomes a
    version of the run's model artifact, `step-<n>`; the final model one more, `final`. The export W&B copied is
    gone from out_dir."""
    from transformers import AutoModelForCausalLM

    out_dir = moe_stage_runs["sft"]
    models = [record.artifact for record in records(run_file(out_dir))
              if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model"]
    assert [sorted(a.aliases) for a in models] == [["latest", "step-2"], ["latest", "step-4"],
                                                  ["final", "latest", "step-4"]]
    assert len({a.name for a in models}) == 1 and models[0].name.startswith("sft-")
    staged = [{entry.path: Path(entry.local_path) for entry in a.manifest.contents} for a in models]
    assert all({"config.json", "model.safetensors", "tokenizer.json"} <= set(files) for files in staged)
    assert staged[1]["model.safetensors"].read_bytes() == (out_dir / "final" / "model.safetensors").read_bytes()
    assert staged[0]["model.safetensors"].read_bytes() != staged[1]["model.safetensors"].read_bytes()
    for name, staged_file in staged[0].items():  # what `wandb artifact get` would download for step-2
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(staged_file.read_bytes())
    step_2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert step_2.config.use_moe and not (out_dir / ".wandb_model").exists()


@pytest.mark.parametrize("flags, value", [([], ""), (["--wandb_log_model"], "end"), (["--wandb_log_model", "1"], "end"),
                                          (["--wandb_log_model", "false"], ""),
                                          (["--wandb_log_model", "checkpoint"], "checkpoint")])
def test_wandb_log_model_is_a_switch_or_a_mode(flags, value):
    assert parse_config(flags).track.wandb_log_model == value


def test_an_unknown_wandb_log_model_is_a_one_line_error():
    with pytest.raises(SystemExit) as error:
        main("pretrain", ["--wandb_log_model", "every"])
    assert str(error.value) == 'pretrain: wandb_log_model: \'every\' is not one of "", end, checkpoint'


def exit_codes(out_dir: Path) -> list[int]:
    return [r.exit.exit_code for r in records(run_file(out_dir)) if r.WhichOneof("record_type") == "exit"]


def test_a_stage_that_fails_in_its_first_evaluation_is_a_failed_run(tiny_flags, tmp_path, monkeypatch):
    """An error in the evaluation of the starting model (out of memory, say), before the first step: the W&B run ends
    with exit code 1, like a failure during training. Before, that part of the setup was outside the run's finish:
    W&B's teardown closed it as a finished run (exit code 0)."""
    from mateconv.train.engine import Trainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("Tried to allocate 2 GiB")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(Trainer, "evaluate", out_of_memory)
    flags = tiny_flags(tmp_path, max_steps=2, tracker="wandb", eval_at_start=True)
    with pytest.raises(torch.OutOfMemoryError):
        run(RECIPES["pretrain"], parse_config(flags))
    wandb.teardown()
    assert exit_codes(tmp_path) == [1]


def test_no_wandb_key_is_offline_with_one_line_on_how_to_sync(tiny_flags, tmp_path, monkeypatch, capsys):
    """WANDB_MODE unset and no key anywhere: the stage says in one line of its own that it logs offline and why, and
    the command that uploads the run later (before: only W&B's banner, which suggested `wandb online`, a key prompt)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    flags = tiny_flags(tmp_path, max_steps=1, eval_interval=100, save_interval_steps=100, tracker="wandb")
    run(RECIPES["pretrain"], parse_config(flags))
    wandb.teardown()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] W&B")]
    run_id = run_file(tmp_path).stem[4:]
    assert lines == [f"[train] W&B: no API key ($WANDB_API_KEY or `wandb login`): logging offline; upload the run "
                     f"later with `wandb sync --id {run_id} {tmp_path}/wandb/offline-run-*-{run_id}`"]
    assert exit_codes(tmp_path) == [0]


def test_a_launcher_stop_that_ends_the_wandb_service_keeps_the_checkpoint(tiny_flags, tmp_path, monkeypatch,
                                                                            capsys):
    """Ctrl-C or `kill` to a DeepSpeed launcher: it sends SIGTERM to each rank's whole process tree, W&B's service
    process (rank 0's child) included. The rank stops at the end of its step with a checkpoint; W&B's loss is one
    line. Before, the next W&B call raised ConnectionResetError: a traceback, and no checkpoint was saved."""
    import os
    import signal

    import psutil

    monkeypatch.setenv("WANDB_MODE", "offline")
    log = tracking.Tracker.log

    def log_then_stop_like_the_launcher(self, step, metrics, at=None):
        log(self, step, metrics, at)
        if step == 2:
            for child in psutil.Process().children(recursive=True):
                child.terminate()
            psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Tracker, "log", log_then_stop_like_the_launcher)
    flags = tiny_flags(tmp_path, max_steps=6, eval_interval=100, save_interval_steps=100, tracker="wandb")
    summary = run(RECIPES["pretrain"], parse_config(flags))
    wandb.teardown()
    assert summary["stopped"] and (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
    out = capsys.readouterr().out
    assert out.count("[train] W&B: its service stopped") == 1
    assert [row["step"] for row in read_metrics(tmp_path) if "loss" in row] == [1, 2, 3]


def test_a_resume_from_another_runs_checkpoint_is_a_new_wandb_run(tiny_flags, tmp_path, monkeypatch):
    """`--resume OTHER/checkpoints/step_N --out_dir NEW` branches off another run: NEW is a W&B run of its own. It
    took the other run's id, so both directories logged into one W&B run, the branch's steps over the original's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    original, branch = tmp_path / "original", tmp_path / "branch"
    for out_dir, more in ((original, {}), (original, {"max_steps": 3}),  # the same run resumed: its own id kept
                          (branch, {"max_steps": 3, "resume": str(original / "checkpoints" / "step_00000002")})):
        flags = tiny_flags(out_dir, **{"max_steps": 2, "eval_interval": 100, "save_interval_steps": 2,
                                       "tracker": "wandb", **more})
        run(RECIPES["pretrain"], parse_config(flags))
        wandb.teardown()
    ids = {out_dir.name: {path.stem[4:] for path in (out_dir / "wandb").glob("offline-run-*/run-*.wandb")}
           for out_dir in (original, branch)}
    assert len(ids["original"]) == 1 and len(ids["branch"]) == 1 and ids["original"] != ids["branch"]
