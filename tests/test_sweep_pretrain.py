"""A real 2-trial offline sweep of 4.pretrain.py (MoE on/off) on a tiny model and synthetic token shards."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mateconv.sweep.config import load_sweep_config
from mateconv.sweep.optuna_backend import run_optuna
from mateconv.sweep.trials import read_metric

REPO = Path(__file__).resolve().parents[1]


def _write_pretrain_shards(directory: Path, num_tokens: int) -> None:
    """Token shards in the layout of docs/design.md: a repeating pattern the tiny model can learn."""
    directory.mkdir(parents=True)
    np.tile(np.arange(3, 67, dtype=np.uint16), num_tokens // 64 + 1)[:num_tokens].tofile(
        directory / "shard_00000.tokens.bin")
    np.asarray([0, num_tokens], dtype=np.int64).tofile(directory / "shard_00000.offsets.bin")  # one record
    (directory / "index.json").write_text(json.dumps({
        "kind": "pretrain", "dtype": "uint16", "vocab_size": 128, "eos_id": 2, "pad_id": 0, "format_version": 2,
        "shards": [{"name": "shard_00000", "num_tokens": num_tokens, "num_records": 1}], "complete": True}))


@pytest.mark.slow
def test_two_trial_sweep_of_the_real_pretrain_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _write_pretrain_shards(tmp_path / "tokens" / "train", 8192)
    _write_pretrain_shards(tmp_path / "tokens" / "val", 1024)
    constants = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "max_seq_len": 32,
                 "batch_size": 8, "max_steps": 3, "log_interval": 1, "eval_batches": 2, "num_workers": 0,
                 "tracker": "none", "device": "cpu", "data_path": str(tmp_path / "tokens" / "train"),
                 "val_data_path": str(tmp_path / "tokens" / "val")}
    path = tmp_path / "pretrain_tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "pretrain_tiny", "program": str(REPO / "4.pretrain.py"), "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": {"use_moe": {"values": [False, True]}, "learning_rate": {"values": [1e-3]},
                       **{k: {"value": v} for k, v in constants.items()}}}))

    sweep_dir = run_optuna(load_sweep_config(path), count=None, out_root=tmp_path / "sweeps")

    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], (sweep_dir / "trial_0000.log").read_text()[-2000:]
    for row in rows:
        trial_dir = sweep_dir / f"trial_{int(row['trial']):04d}"
        assert (trial_dir / "final" / "config.json").is_file()
        metrics = (trial_dir / "metrics.jsonl").read_text()
        assert float(row["val_loss"]) == pytest.approx(read_metric(trial_dir / "metrics.jsonl", "val_loss"))
        # the boolean flag reached the stage: only the MoE trial logs expert loads
        assert ("moe/cv_mean" in metrics) == (row["use_moe"] == "true")
    assert {r["use_moe"] for r in rows} == {"true", "false"}
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert json.loads((sweep_dir / "best.json").read_text())["params"]["use_moe"] == (best["use_moe"] == "true")
