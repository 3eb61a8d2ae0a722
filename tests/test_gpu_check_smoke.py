"""benchmarks/gpu_check.sh is the one prepared script a lent GPU machine runs (issue 14), with minutes to spare: its
wiring is checked here at tiny sizes on CPU (`--cpu-smoke`), every row and the summary it prints."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, SHARED_DATA

MINIMIND = Path(os.environ.get("MATECONV_MINIMIND", REPO.parent / "shared" / "peers" / "minimind"))


def test_gpu_check_cpu_smoke_runs_every_row(tmp_path, shared_data):
    if os.environ.get("CI", "").lower() == "true":
        shared_data("hiyouga__LLaMA-Factory/data/c4_demo.jsonl")  # CI has the shared data: missing is a failure
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MATECONV_SHARED_DATA": str(SHARED_DATA), "MATECONV_MINIMIND": str(MINIMIND)}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
            for line in (tmp_path / "table.md").read_text().splitlines()[2:]}
    assert list(rows) == ["engine: 0.02B dense, its HF twin, 0.1B MoE (eager/compiled)",
                          "MiniMind's trainer vs 4.pretrain.py, eager", "decode vs transformers generate",
                          "profile: 0.02B dense step", "profile: 0.1B MoE step",
                          "MateConv at half the batch, twice the steps",
                          "ablation: MateConv's trainer on MiniMind's rows, eager",
                          "ablation: MateConv without q/k RMSNorm, eager",
                          "engine: compiled, document mask as SDPA mask / FlexAttention / none"]
    minimind_rows = [rows.pop(name) for name in ("MiniMind's trainer vs 4.pretrain.py, eager",
                                                 "MateConv at half the batch, twice the steps",
                                                 "ablation: MateConv's trainer on MiniMind's rows, eager",
                                                 "ablation: MateConv without q/k RMSNorm, eager")]
    if SHARED_DATA.is_dir() and (MINIMIND / "trainer" / "train_pretrain.py").is_file():
        assert minimind_rows == ["ok"] * 4
        half = (tmp_path / "vs_minimind_half_batch" / "report.md").read_text()
        assert "Final models (the same positions: MiniMind 6 steps of 4 rows, MateConv 12 of 2)" in half
        for run, qk_norm in (("vs_minimind", True), ("vs_minimind_no_qk_norm", False)):  # each trained what it names
            assert json.loads((tmp_path / run / "mateconv/final/config.json").read_text())["qk_norm"] is qk_norm
        curve = (tmp_path / "vs_minimind" / "report.md").read_text().split("Every checkpoint")[1]
        assert curve.count("| MiniMind |") >= 2 and curve.count("| MateConv |") >= 2  # each system's checkpoints
        assert (tmp_path / "vs_minimind" / "bpb_curve.png").read_bytes()[:4] == b"\x89PNG"
    else:  # without MiniMind (or, off CI, the shared data) the rows say why, and the others still run
        assert all(row.startswith("failed") and "not found" in row for row in minimind_rows)
    assert set(rows.values()) == {"ok"}, rows
    # the summary carries each row's table, the profile's operators, and the trace is a readable Chrome trace
    for variant in ("", ", flex attention", ", no document mask"):  # the mask row ran each model each way
        assert f"| MateConv-0.1B MoE, compiled{variant} |" in done.stdout
        assert f"| MateConv-0.02B dense, compiled{variant} |" in done.stdout
    assert "### profile_dense" in done.stdout and "### profile_moe" in done.stdout and "| aten::mm |" in done.stdout
    assert "profile of MateConv-0.1B MoE, eager, on cpu" in done.stdout
    assert "MateConv-0.02B dense" in done.stdout and "same greedy tokens" in done.stdout
    # the engine table states the MoE's speed as a share of the dense model's, the figure its target is set in
    engine = {cells[0]: cells for line in done.stdout.splitlines() if line.startswith("| MateConv-0.")
              for cells in [[cell.strip() for cell in line.strip("| ").split("|")]]}
    dense, moe = (float(engine[name][3].replace(",", "")) for name in ("MateConv-0.02B dense", "MateConv-0.1B MoE"))
    # (the table shows whole tokens/s; the share is of the unrounded speeds: the last digit may differ by one)
    assert abs(float(engine["MateConv-0.1B MoE"][6].rstrip("x")) - moe / dense) <= 0.011
    assert engine["MateConv-0.02B dense"][6] == "1.00x"
    for model in ("dense", "moe"):
        trace = json.loads(gzip.decompress((tmp_path / f"profile_{model}_trace.json.gz").read_bytes()))
        assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])


def test_essentials_name_only_the_open_targets_rows(tmp_path):
    """`--essentials` (a 15-minute device budget) selects the compiled pair, the mask row and the compiled MoE profile,
    in its own table; without CUDA each of them says so instead of running."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--essentials"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in (tmp_path / "table_essentials.md").read_text().splitlines()[2:]]
    assert [row[0] for row in rows] == ["MiniMind's trainer vs 4.pretrain.py, both compiled", "profile: 0.1B MoE step",
                                        "engine: compiled, document mask as SDPA mask / FlexAttention / none"]
    assert all(row[1:] == ["not run", "no CUDA device"] for row in rows), rows
    assert not (tmp_path / "table.md").exists()
