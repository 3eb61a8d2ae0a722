"""scripts/stop.sh's core (`mateconv.procs.stop`): it reports a stage stopped only when every process of the stage's
group has exited, as under the DeepSpeed launcher, whose front process exits at once while the ranks still save."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from mateconv.procs import group_alive, is_alive, pid_file, stop

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
    assert stop(tmp_path, "pretrain", timeout_s=1) == "pretrain: not running"


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
