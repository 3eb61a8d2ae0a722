"""Ctrl-C (or `kill -2`, `kill`) of the pipeline while a stage runs: the stage is told, the pipeline says it was
interrupted (not that the stage failed) and exits 128 + the signal's number, and the same command runs the stage again
from what it kept, not taking the mark an interrupted stage leaves as done."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO


# Acts as the evaluation does on SIGINT: it writes its summary (the stage's done mark) from the finished work, keeps
# parts/ to go on from, and exits 1; a run that finds parts/ finishes.
EVALUATION = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[-1])
parts = out / "parts"
if parts.is_dir():
    (out / "summary.json").write_text("complete")
    print("went on from parts/", flush=True)
    sys.exit(0)
def stop(*_):
    (out / "summary.json").write_text("partial")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
parts.mkdir(parents=True)
print("evaluating", flush=True)
while True:
    time.sleep(0.05)
"""


def interrupted_run(tmp_path: Path, sent: signal.Signals) -> tuple[list[str], subprocess.CompletedProcess]:
    """The pipeline's command and its run, sent `sent` while the stage evaluates."""
    program = tmp_path / "evaluation.py"
    program.write_text(EVALUATION)
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"stages:\n  eval:\n    script: {program}\n    args: {{out_dir: out/eval}}\n"
                      "    done: out/eval/summary.json\n")
    command = [sys.executable, "-m", "mateconv.pipeline", "run", "--preset", str(preset)]
    pipeline = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in pipeline.stdout:
        if line.strip() == "evaluating":
            break
    pipeline.send_signal(sent)
    printed = pipeline.communicate(timeout=60)[0]
    return command, subprocess.CompletedProcess(command, pipeline.returncode, printed)


def test_an_interrupted_stage_is_not_a_failure_and_runs_again(tmp_path):
    command, interrupted = interrupted_run(tmp_path, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stdout
    assert interrupted.stdout.strip().splitlines()[-1] == (
        "[pipeline] interrupted during eval; run the same command again to go on")
    assert "failed" not in interrupted.stdout, interrupted.stdout
    summary = tmp_path / "out/eval/summary.json"
    assert (tmp_path / "out/eval/parts").is_dir() and not summary.exists()  # not done; parts/ kept to go on from

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "went on from parts/" in again.stdout and "skipped" not in again.stdout, again.stdout
    assert summary.read_text() == "complete"


def test_kill_of_the_pipeline_is_an_interrupt_too(tmp_path):
    _, interrupted = interrupted_run(tmp_path, signal.SIGTERM)
    assert interrupted.returncode == 143, interrupted.stdout
    assert interrupted.stdout.strip().splitlines()[-1] == (
        "[pipeline] interrupted during eval; run the same command again to go on")


def catches(pid: int, sent: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sent` (the SigCgt mask in /proc)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) >> (sent - 1) & 1)


def test_kill_2_while_the_pipeline_checks_its_stages_stops_it(tmp_path):
    """`kill -2` of a pipeline started in a script's background (launch.sh: SIGINT comes ignored) while it checks the
    stages' flags, before any stage runs: it was lost, and the stages ran on."""
    program = tmp_path / "evaluation.py"
    program.write_text(EVALUATION)
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"stages:\n  eval:\n    script: {program}\n    done: out/eval/summary.json\n")
    pipeline = subprocess.Popen([sys.executable, "-m", "mateconv.pipeline", "run", "--preset", str(preset)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 30
    while not catches(pipeline.pid, signal.SIGINT) and time.monotonic() < deadline:
        time.sleep(0.01)
    pipeline.send_signal(signal.SIGINT)
    try:
        printed = pipeline.communicate(timeout=30)[0]
    finally:
        pipeline.kill()
    assert pipeline.returncode == 130, printed
    assert printed.strip() == "[pipeline] interrupted before any stage started"


# A stage that writes the W&B group its training runs would join into its done mark (sys.argv[-1]: its out_dir)
GROUP_STAGE = """
import os, pathlib, sys
out = pathlib.Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
(out / "done").write_text(os.environ.get("WANDB_RUN_GROUP", ""))
"""


def test_a_pipelines_stages_share_one_wandb_group(tmp_path):
    """The pipeline's stages get one W&B group (W&B lists its pretrain, SFT and DPO runs together), kept in
    out/wandb_group for a later run of the same out/ (a resume). Before, each stage's run stood alone."""
    program = tmp_path / "stage.py"
    program.write_text(GROUP_STAGE)
    preset = tmp_path / "preset.yaml"
    preset.write_text("stages:\n" + "".join(f"  {name}:\n    script: {program}\n    args: {{out_dir: out/{name}}}\n"
                                            f"    done: out/{name}/done\n" for name in ("pretrain", "sft")))
    command = [sys.executable, "-m", "mateconv.pipeline", "run", "--preset", str(preset)]
    env = {key: value for key, value in os.environ.items() if key != "WANDB_RUN_GROUP"}
    assert subprocess.run(command, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    groups = {(tmp_path / f"out/{name}/done").read_text() for name in ("pretrain", "sft")}
    assert groups == {(tmp_path / "out/wandb_group").read_text().strip()} and groups != {""}


@pytest.mark.parametrize("started_as", ["4.pretrain.py", "mateconv_stage"])
def test_ctrl_c_while_a_program_imports_is_one_line(tmp_path, started_as):
    """`kill -2` of a stage that is still importing torch and transformers (seconds; a pipeline stopped right after it
    started a stage) ends it with one line, as it does once the program runs, not a traceback through the library.
    A program started as `python -m PACKAGE` is named so, not `__main__.py`."""
    imports = "import mateconv.terminal\nimport time\nprint('importing', flush=True)\ntime.sleep(60)\n"
    if started_as.endswith(".py"):  # its imports, mateconv's first, then a library that takes its time
        (tmp_path / started_as).write_text(imports)
        command = [sys.executable, started_as]
    else:
        (tmp_path / started_as).mkdir()
        (tmp_path / started_as / "__main__.py").write_text(imports)
        command = [sys.executable, "-m", started_as]
    stage = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])})
    assert stage.stdout.readline() == "importing\n"
    stage.send_signal(signal.SIGINT)
    printed = stage.communicate(timeout=30)[1]
    assert printed == f"{started_as}: interrupted\n"
    assert stage.returncode == -signal.SIGINT  # as a shell reports it: 130


# A stage other than training told to stop alone (`stop STAGE`): as stage 2/3/7 and the evaluation do, it keeps its
# work (here a partial summary, the done mark) and ends with its one line and 130 (mateconv.terminal.exit_interrupted)
STOPPED_ALONE = """
import pathlib, signal, sys, time
from mateconv.terminal import exit_interrupted
out = pathlib.Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
def stop(*_):
    (out / "summary.json").write_text("partial")
    exit_interrupted("eval: interrupted")
signal.signal(signal.SIGINT, stop)
print("evaluating", flush=True)
while True:
    time.sleep(0.05)
"""


def test_stop_of_one_stage_that_is_not_training_is_a_stop_not_a_failure(tmp_path):
    """`stop.sh prepare` (tokens, prefs, eval) said '[pipeline] prepare failed with exit code 1': those stages exited 1
    when told to stop, as for an error. Now 130, and the pipeline says the stage stopped; its partial done mark goes,
    so the next run runs it again."""
    from mateconv.procs import stop

    program = tmp_path / "evaluation.py"
    program.write_text(STOPPED_ALONE)
    (tmp_path / "preset.yaml").write_text(f"stages:\n  eval:\n    script: {program}\n    args: {{out_dir: out/eval}}\n"
                                          "    done: out/eval/summary.json\n")
    pipeline = subprocess.Popen([sys.executable, "-m", "mateconv.pipeline", "run", "--preset", "preset.yaml"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in pipeline.stdout:
        if line.strip() == "evaluating":
            break
    stop(tmp_path / "logs", "eval", 30)
    printed = pipeline.communicate(timeout=60)[0]
    assert pipeline.returncode == 0, printed
    assert printed.strip().splitlines()[-1] == (
        "[pipeline] eval stopped before it finished; run the pipeline again to resume it"), printed
    assert "failed" not in printed and not (tmp_path / "out/eval/summary.json").exists()
    assert (tmp_path / "logs/eval.log").read_text().strip().splitlines()[-1] == "eval: interrupted"
