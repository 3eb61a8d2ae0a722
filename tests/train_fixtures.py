"""Real data for the training tests: a 512-token BPE trained on tinyshakespeare, pretrain and SFT token shards.

Built once per test session with the stage 1 and 3 functions (mateconv.tokenizer, mateconv.data.shards), in a
temporary directory; `tiny_flags` are the model/loop flags of a dim-64, 2-layer model on 64-token sequences.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mateconv import files
from mateconv.flags import render_flags

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")
SHAKESPEARE = DATA / "karpathy__char-rnn/data/tinyshakespeare/input.first2000lines.txt"
ALPACA = DATA / "hiyouga__LLaMA-Factory/data/alpaca_en_demo.json"
# Multi-turn conversations: the loss must cover both assistant turns and nothing else.
MULTI_TURN = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": f"Count to {n}."},
                  {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))},
                  {"role": "user", "content": "Now backwards."},
                  {"role": "assistant", "content": " ".join(str(i) for i in range(n, 0, -1))}]}
    for n in range(2, 9)
]


def require_data() -> None:
    if not SHAKESPEARE.is_file() or not ALPACA.is_file():
        pytest.skip(f"shared sample data not found under {DATA}")


@functools.lru_cache(maxsize=1)
def token_data() -> dict[str, Path]:
    """{"tokenizer", "pretrain_train", "pretrain_val", "sft_train", "sft_val"} directories."""
    from mateconv.data.shards import build_shards
    from mateconv.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="mateconv_train_data_"))
    atexit.register(shutil.rmtree, root, True)
    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    (root / "train.txt").write_text("".join(lines[:1700]))
    (root / "val.txt").write_text("".join(lines[1700:]))
    alpaca = json.loads(ALPACA.read_text())
    (root / "sft_train.json").write_text(json.dumps(alpaca[:100]))
    (root / "sft_val.json").write_text(json.dumps(alpaca[100:140]))
    (root / "multi_turn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MULTI_TURN))
    paths = {"tokenizer": root / "tokenizer"}
    train_tokenizer([root / "train.txt", root / "sft_train.json"], paths["tokenizer"], vocab_size=512)
    inputs = {"pretrain_train": ("pretrain", ["train.txt"]), "pretrain_val": ("pretrain", ["val.txt"]),
              "sft_train": ("sft", ["sft_train.json", "multi_turn.jsonl"]), "sft_val": ("sft", ["sft_val.json"]),
              "sft_multi_turn": ("sft", ["multi_turn.jsonl"])}
    for name, (kind, files) in inputs.items():
        paths[name] = root / name
        build_shards(kind, [root / f for f in files], paths["tokenizer"], paths[name], workers=1, progress=False)
    return paths


TINY_MODEL = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64",
              "--vocab_size", "512"]


def tiny_flags(out_dir: Path, stage: str = "pretrain", **overrides) -> list[str]:
    """Command-line flags for a tiny, fast, fp32 run on the fixture data."""
    data = token_data()
    values = {"data_path": data[f"{stage}_train"], "val_data_path": data[f"{stage}_val"],
              "tokenizer_path": data["tokenizer"], "out_dir": out_dir, "batch_size": 4, "max_steps": 6,
              "learning_rate": 3e-3, "dtype": "float32", "tracker": "none", "num_workers": 0, "log_interval": 1,
              "eval_interval": 3, "eval_batches": 4, "save_interval_steps": 3, "warmup_iters": 2, **overrides}
    return TINY_MODEL + render_flags(values)


def single_thread_env() -> dict[str, str]:
    """Subprocess environment: one thread per process (2 shared cores), CPU DeepSpeed, offline W&B."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def read_metrics(out_dir: Path) -> list[dict]:
    return files.read_metrics(Path(out_dir) / "metrics.jsonl")


def losses(out_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(out_dir) if "loss" in row}
