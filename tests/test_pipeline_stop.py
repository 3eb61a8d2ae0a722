"""scripts/stop.sh's core (`mateconv.procs.stop`): it reports a stage stopped only when every process of the stage's
group has exited, as under the DeepSpeed launcher, whose front process exits at once while the ranks still save."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from mateconv.pipeline import main, status
from mateconv.procs import NotStopped, group_alive, is_alive, pid_file, stop
from mateconv.train.stages import RUN_LOCK

STAGE = """
import signal, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c",
    "import signal, time, pathlib, sys\\n"
    "def save(*_):\\n"
    "    time.sleep(2); pathlib.Path(sys.argv[1]).write_text('saved'); sys.exit(0)\\n"
    "signal.signal(signal.SIGINT, save)\\n"
    "print('ready', flush=True)\\n"
    "while True: time.sleep(0.1)\\n", sys.argv[1]], stdout=subprocess.PIPE, text=True)
rank.stdout.readline()
print('ready', flush=True)
while True:
    time.sleep(0.1)  # the front process: SIGINT kills it at once (KeyboardInterrupt)
"""


def test_stop_waits_for_the_whole_process_group(tmp_path):
    marker = tmp_path / "checkpoint"
    front = subprocess.Popen([sys.executable, "-c", STAGE, str(marker)], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert front.stdout.readline().strip() == "ready"
    pid_file(tmp_path, "pretrain").write_text(f"{front.pid}\n")
    assert group_alive(front.pid)

    started = time.monotonic()
    outcome = stop(tmp_path, "pretrain", timeout_s=30)
    assert outcome.startswith("pretrain: stopped"), outcome
    assert time.monotonic() - started >= 1.5 and marker.read_text() == "saved"  # waited for the rank's save
    assert not group_alive(front.pid) and front.wait(timeout=5) != 0
    with pytest.raises(NotStopped, match=f"^pretrain: not running \\(process group {front.pid} of .* has exited\\)$"):
        stop(tmp_path, "pretrain", timeout_s=1)


@pytest.mark.parametrize("name, hint", [("pretrain", ""), ("pretrian", "; did you mean 'pretrain'?"),
                                        ("pipline", "; did you mean 'pipeline'?")])
def test_stop_where_nothing_runs_says_where_it_looked_and_fails(name, hint, tmp_path, capsys):
    """`pipeline stop pretrain` with no such stage running said `pretrain: not running` and exited 0, a typo'd name
    alike: a script's `stop.sh pretrain && ...` went on as if it had stopped something. Now it fails, as `kill` does."""
    assert main(["stop", name, "--logs", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {name}: not running (no {tmp_path / name}.pid){hint}\n"


def test_a_process_that_exited_is_not_running_before_it_is_reaped():
    """`pipeline status` right after a stop: the stage's process has exited but its parent has not reaped it yet (a
    zombie). Before, that read as running."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while psutil.Process(quick.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert is_alive(sleeper.pid) and not is_alive(quick.pid)
    sleeper.kill()
    for process in (sleeper, quick):
        process.wait()
    assert not is_alive(quick.pid)


def test_status_finds_a_run_started_by_hand_under_nohup(tmp_path, capsys):
    """`nohup deepspeed ... > logs/pretrain.log 2>&1 &` (the seeds' way) leaves no pid file: status said "not running"
    while it ran. The run is the family writing the log; the first of it (the launcher, not its rank) is named."""
    logs = tmp_path / "logs"
    logs.mkdir()
    family = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('ready', flush=True); time.sleep(60)"
    with open(logs / "pretrain.log", "w") as log:
        front = subprocess.Popen([sys.executable, "-c", family], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while "ready" not in (logs / "pretrain.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    rank = psutil.Process(front.pid).children()[0]
    status(logs, tmp_path / "out")
    assert capsys.readouterr().out.split() == ["pretrain", "running", "(pid", f"{front.pid})"]
    hint = f"not started by the pipeline .* pid {front.pid} writes .*`kill -2 {front.pid}`"
    with pytest.raises(NotStopped, match=hint):
        stop(logs, "pretrain", timeout_s=1)  # its process group may be the shell's: not signalled
    for process in (rank, front):
        process.kill()
    front.wait()
    psutil.wait_procs([rank], timeout=10)
    status(logs, tmp_path / "out")
    assert capsys.readouterr().out.split() == ["pretrain", "not", "running"]


def test_status_pipeline_row_says_what_the_pipeline_does(tmp_path, capsys):
    """The pipeline row repeated the last stage progress line of its log (which echoes the stages'), the stage's own
    row beside it; it now says which stage runs and for how long the pipeline has run, or, ended, its own last line."""
    logs = tmp_path / "logs"
    logs.mkdir()
    progress = "[sft] step 10/300 loss 2.1 lr 1e-03 grad_norm 0.5 tok/s 1,000 mem_gb 0.4 elapsed 0:00:10 eta 0:04:50\n"
    (logs / "sft.log").write_text(progress)
    (logs / "pipeline.log").write_text("[pipeline] sft: python 5.full_sft.py\n" + progress)
    sleepers = {name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                for name in ("pipeline", "sft")}
    for name, process in sleepers.items():
        pid_file(logs, name).write_text(f"{process.pid}\n")
    try:
        status(logs, tmp_path / "out")
    finally:
        for process in sleepers.values():
            process.kill()
            process.wait()
    rows = capsys.readouterr().out.splitlines()
    pid = sleepers["pipeline"].pid
    assert re.fullmatch(rf"pipeline +running \(pid {pid}\)  \[sft running, elapsed 0:00:0\d\]", rows[0]), rows
    assert rows[1].endswith("[10/300 elapsed 0:00:10 eta 0:04:50, 1,000 tok/s]")
    with open(logs / "pipeline.log", "a") as log:
        log.write("[pipeline] sft failed with exit code 1; see logs/sft.log\n")
    status(logs, tmp_path / "out")
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split(None, 3)[3] == "[sft failed with exit code 1; see logs/sft.log]", rows


def test_stop_sh_on_a_directory_no_run_writes_says_so_at_once(tmp_path):
    """`scripts/stop.sh OUT_DIR` where the run has ended (its lock file is there, held by none) says so at once and
    leaves no STOP behind (it waited 300 s, and the STOP file then stopped the next run in its first step); while a
    process holds the lock, it asks that run to stop and waits."""
    script = [str(REPO / "scripts" / "stop.sh"), str(tmp_path)]
    (tmp_path / RUN_LOCK).write_text("12345\n")
    started = time.time()
    ended = subprocess.run(["bash", *script, "30"], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 1 and time.time() - started < 20 and "no run is writing" in ended.stderr
    assert not (tmp_path / "STOP").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mateconv.files import locked; "
                               "lock = locked(__import__('pathlib').Path(sys.argv[1])); print('ready', flush=True); "
                               "time.sleep(60)", str(tmp_path / RUN_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        waited = subprocess.run(["bash", *script, "1"], capture_output=True, text=True, timeout=60)
        assert waited.returncode == 1 and "still there after 1 s" in waited.stderr
        assert (tmp_path / "STOP").exists()
    finally:
        holder.kill()
        holder.wait()


def test_status_where_nothing_ran_says_so(tmp_path, capsys):
    """`scripts/status.sh` in a directory with no logs/ (or none of a stage) printed nothing at all."""
    logs = tmp_path / "logs"
    status(logs, tmp_path / "out")
    assert capsys.readouterr().out == f"no stage has run from here: no {logs} directory\n"
    logs.mkdir()
    status(logs, tmp_path / "out")
    assert capsys.readouterr().out == f"no stage has run from here: no stage log in {logs}\n"


def test_launch_sh_after_a_pipeline_that_ended_unreaped(tmp_path):
    """In a container whose first process reaps no orphans, the pipeline that launch.sh started stays a zombie after
    it ends; launch.sh took that for a pipeline still running and refused ('a pipeline is already running')."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "launch.sh").write_text((REPO / "scripts" / "launch.sh").read_text())
    (tmp_path / "scripts" / "run_pipeline.sh").write_text("echo the pipeline ran\n")
    ended = subprocess.Popen([sys.executable, "-c", ""])
    while psutil.Process(ended.pid).status() != psutil.STATUS_ZOMBIE:  # not reaped: no wait() yet
        time.sleep(0.01)
    (tmp_path / "logs").mkdir()
    pid_file(tmp_path / "logs", "pipeline").write_text(f"{ended.pid}\n")
    launched = subprocess.run(["bash", "scripts/launch.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    ended.wait()
    assert launched.returncode == 0 and launched.stdout.startswith("pipeline started"), launched.stderr
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        pid_file(tmp_path / "logs", "pipeline").write_text(f"{live.pid}\n")
        refused = subprocess.run(["bash", "scripts/launch.sh"], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=30)
        live.kill()
    assert refused.returncode == 1 and f"a pipeline is already running (pid {live.pid})" in refused.stderr


PIPELINE = """
import subprocess, sys, time
stage = subprocess.Popen([sys.executable, "-c", "import time\\nprint('ready', flush=True)\\ntime.sleep(60)"],
                         start_new_session=True, stdout=subprocess.PIPE, text=True)
stage.stdout.readline()
print(stage.pid, flush=True)
stage.wait()
time.sleep(1)  # what the pipeline does after its stage: its last lines, Python's exit
"""


def test_stop_of_a_stage_waits_for_the_pipeline_that_ran_it(tmp_path):
    """`stop.sh dpo` then `launch.sh ...` at once said 'a pipeline is already running': the pipeline was still
    ending after its stopped stage."""
    pipeline = subprocess.Popen([sys.executable, "-c", PIPELINE], stdout=subprocess.PIPE, text=True)
    pid_file(tmp_path, "pretrain").write_text(pipeline.stdout.readline())
    pid_file(tmp_path, "pipeline").write_text(f"{pipeline.pid}\n")
    assert "stopped" in stop(tmp_path, "pretrain", 30)
    assert pipeline.poll() == 0
