"""scripts/jupyter.sh: argument errors, and a real JupyterLab start / status / stop on a free port."""
import json
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "jupyter.sh"


def _run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_help():
    result = _run("--help")
    assert result.returncode == 0 and "--port" in result.stdout and "--ip" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--port", "http"], "--port must be an integer in 1..65535, got 'http'"),
    (["--port", "70000"], "--port must be an integer in 1..65535, got '70000'"),
    (["--port"], "--port needs a value"),
    (["--prot", "8888"], "unknown argument '--prot'"),
])
def test_bad_arguments(args, message):
    result = _run(*args)
    assert result.returncode == 2 and result.stderr.startswith(f"jupyter.sh: {message}")
    assert result.stderr.count("\n") == 1


def test_port_in_use_is_refused(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = _run("--port", busy.getsockname()[1], "--log_dir", tmp_path)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr
    assert result.stderr.count("\n") == 1 and "Address already in use" in result.stderr  # one line, with the reason
    assert not (tmp_path / "jupyter.pid").exists()


def test_starts_serves_and_stops(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = _run("--port", port, "--log_dir", tmp_path)
    try:
        assert started.returncode == 0, started.stderr + (tmp_path / "jupyter.log").read_text()
        url = started.stdout.strip().splitlines()[-1]
        assert url.startswith(f"http://127.0.0.1:{port}/lab?token=")
        token = url.split("token=")[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=10) as reply:
            names = {item["name"] for item in json.load(reply)["content"]}
        assert {"scripts", "mateconv", "pyproject.toml"} <= names  # served from the repo root
        assert (tmp_path / "jupyter.url").read_text().strip() == url
        again = _run("--port", port, "--log_dir", tmp_path)
        assert again.returncode == 0 and "already running" in again.stdout and url in again.stdout
    finally:
        stopped = _run("--stop", "--log_dir", tmp_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (tmp_path / "jupyter.pid").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
