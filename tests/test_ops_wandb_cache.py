"""scripts/wandb_cache_clean.sh on real temp directories: age and size pruning, dry run, unsafe paths, the loop."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wandb_cache_clean.sh"
DAY = 86400
MIB = 1 << 20


def _run(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60,
                          env=env, **kwargs)


def _env(tmp_path: Path, with_wandb: bool = False, **extra) -> dict:
    path = "/usr/bin:/bin" if not with_wandb else f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return {"PATH": path, "HOME": str(tmp_path / "home"), **extra}


def _file(path: Path, age_days: float, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path):
    """A cache with old, recent and outside files, plus symlinks that point outside it."""
    (tmp_path / "home").mkdir()
    root = tmp_path / "wandb" / "artifacts"
    files = {
        "old": _file(root / "obj" / "md5" / "ab" / "old1", 10),
        "old_nested": _file(root / "obj" / "md5" / "cd" / "old2", 8),
        "recent": _file(root / "obj" / "md5" / "ab" / "recent", 1),
        "new": _file(root / "new", 0),
        "outside": _file(tmp_path / "outside" / "keep.bin", 30),
        "outside_in_dir": _file(tmp_path / "outside_dir" / "keep2.bin", 30),
    }
    (root / "link_to_file").symlink_to(files["outside"])
    (root / "link_to_dir").symlink_to(tmp_path / "outside_dir")
    return root, files


def test_dry_run_lists_old_files_and_deletes_nothing(tmp_path, cache):
    root, files = cache
    result = _run("--dir", root, "--max_age_days", 5, "--dry_run", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    listed = sorted(line.split()[2] for line in result.stderr.splitlines() if line.startswith("would delete"))
    assert listed == sorted([str(files["old"]), str(files["old_nested"])])
    assert "would delete 2 files" in result.stdout
    assert all(p.exists() for p in files.values())


def test_age_pruning_deletes_exactly_the_old_files(tmp_path, cache):
    root, files = cache
    result = _run("--dir", root, "--max_age_days", 5, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "deleted 2 files" in result.stdout
    assert not files["old"].exists() and not files["old_nested"].exists()
    assert all(files[k].exists() for k in ("recent", "new", "outside", "outside_in_dir"))
    assert (root / "link_to_file").is_symlink() and (root / "link_to_dir").is_symlink()
    assert not (root / "obj" / "md5" / "cd").exists()  # emptied directory removed
    assert root.is_dir()


def test_fractional_age(tmp_path, cache):
    root, files = cache
    assert _run("--dir", root, "--max_age_days", 0.5, env=_env(tmp_path)).returncode == 0
    assert [k for k, p in files.items() if p.exists()] == ["new", "outside", "outside_in_dir"]


def test_size_pruning_deletes_oldest_first(tmp_path):
    (tmp_path / "home").mkdir()
    root = tmp_path / "cache"
    files = [_file(root / f"f{i}", age_days=4 - i, size=MIB) for i in range(4)]  # f0 oldest
    limit_gb = 2.5 / 1024  # 2.5 MiB
    dry = _run("--dir", root, "--max_size_gb", limit_gb, "--dry_run", env=_env(tmp_path))
    assert dry.returncode == 0 and all(f.exists() for f in files)
    assert [line.split()[2] for line in dry.stderr.splitlines()] == [str(files[0]), str(files[1])]
    result = _run("--dir", root, "--max_size_gb", limit_gb, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [f.exists() for f in files] == [False, False, True, True]
    assert "2 MiB left" in result.stdout


def test_default_dir_and_wandb_cli_cleanup(tmp_path):
    (tmp_path / "home").mkdir()
    root = tmp_path / "wandbcache" / "artifacts"
    old = _file(root / "obj" / "md5" / "aa" / "bbbb", age_days=3, size=MIB)
    new = _file(root / "obj" / "md5" / "cc" / "dddd", age_days=0, size=MIB)
    env = _env(tmp_path, with_wandb=True, WANDB_CACHE_DIR=str(tmp_path / "wandbcache"))
    result = _run("--max_size_gb", 1.5 / 1024, env=env)
    assert result.returncode == 0, result.stderr
    assert "Reclaimed" in result.stdout + result.stderr  # the wandb CLI ran on the same cache
    assert not old.exists() and new.exists()


@pytest.mark.parametrize("make_dir, message", [
    (lambda t: Path("/"), "too close to /"),
    (lambda t: Path("/tmp"), "too close to /"),
    (lambda t: t / "home", "is $HOME or contains it"),
    (lambda t: t, "is $HOME or contains it"),
    (lambda t: t / "missing", "does not exist"),
    (lambda t: "", "empty cache directory"),
])
def test_refuses_unsafe_directories(tmp_path, make_dir, message):
    (tmp_path / "home").mkdir()
    marker = _file(tmp_path / "home" / "precious", 100)
    result = _run("--dir", make_dir(tmp_path), "--max_age_days", 0, env=_env(tmp_path))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert marker.exists()


def test_refuses_a_symlink_that_resolves_to_home(tmp_path):
    (tmp_path / "home").mkdir()
    marker = _file(tmp_path / "home" / "precious", 100)
    (tmp_path / "sneaky").symlink_to(tmp_path / "home")
    result = _run("--dir", tmp_path / "sneaky", "--max_age_days", 0, env=_env(tmp_path))
    assert result.returncode == 2 and "contains it" in result.stderr and marker.exists()


@pytest.mark.parametrize("args, message", [
    (["--max_age_days", "-1"], "--max_age_days must be a non-negative number"),
    (["--max_age_days", "1", "--interval", "1h"], "--interval must be a whole number"),
    (["--max_age_day", "1"], "unknown argument '--max_age_day'"),
    ([], "give --max_age_days and/or --max_size_gb"),
    (["--max_size_gb"], "--max_size_gb needs a value"),
])
def test_bad_arguments(tmp_path, args, message):
    result = _run("--dir", tmp_path, *args, env=_env(tmp_path))
    assert result.returncode == 2 and message in result.stderr


def test_help():
    result = _run("--help")
    assert result.returncode == 0 and "--max_size_gb" in result.stdout and "--interval" in result.stdout


def _start_loop(tmp_path: Path, root: Path, interval: int, sigint) -> subprocess.Popen:
    """The cleaner every `interval` s over files older than 5 days in `root`, started with SIGINT's handler `sigint`."""
    return subprocess.Popen(["bash", str(SCRIPT), "--dir", str(root), "--max_age_days", "5", "--interval",
                             str(interval)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def test_periodic_loop_repeats_and_stops_on_sigint(tmp_path):
    (tmp_path / "home").mkdir()
    root = tmp_path / "cache"
    _file(root / "a", age_days=10)
    # SIGINT as a terminal's shell leaves it: a suite started in the background of a script inherits it ignored, and
    # bash cannot trap a signal ignored on entry
    process = _start_loop(tmp_path, root, 1, signal.SIG_DFL)
    time.sleep(1.0)
    late = _file(root / "b", age_days=10)  # appears after the first pass; the second pass removes it
    deadline = time.time() + 20
    while late.exists() and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert not late.exists()
    assert process.returncode == 0 and out.count("older than 5 days") >= 2 and "stopped" in out, err


def test_a_background_job_of_a_script_stops_on_sigint(tmp_path):
    (tmp_path / "home").mkdir()
    root = tmp_path / "cache"
    _file(root / "a", age_days=10)
    # started as `nohup scripts/wandb_cache_clean.sh ... &` from a script: SIGINT ignored on entry; the sleep between
    # passes goes with the script (it held the output pipe open until its end)
    process = _start_loop(tmp_path, root, 30, signal.SIG_IGN)
    deadline = time.time() + 20
    while (root / "a").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"10 s after SIGINT it still ran or its sleep held the output open: {process.communicate()}")
    assert process.returncode == 0 and "stopped" in out, (process.returncode, out, err)
