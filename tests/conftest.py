"""Shared test fixtures (generic, reusable by every area's tests)."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _tiny_llama(seed: int = 0, vocab_size: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory: `tiny_llama(seed, vocab_size=50)` -> a randomly initialised 2-layer Hugging Face LlamaForCausalLM."""
    return _tiny_llama


def _random_dpo_pairs(n: int, seq_len: int, vocab_size: int = 50, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Items shaped like `mateconv.data.shards.DPOTokens`: a shared prompt, responses of random length, right padding,
    labels -100 on prompt and padding."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        prompt_len = int(torch.randint(2, seq_len // 3, (1,), generator=generator))
        prompt = torch.randint(3, vocab_size, (prompt_len,), generator=generator)
        item = {}
        for side in ("chosen", "rejected"):
            total = int(torch.randint(prompt_len + 1, seq_len + 1, (1,), generator=generator))
            ids = torch.zeros(seq_len, dtype=torch.long)
            ids[:prompt_len] = prompt
            ids[prompt_len:total] = torch.randint(3, vocab_size, (total - prompt_len,), generator=generator)
            labels = torch.full((seq_len,), -100)
            labels[prompt_len:total] = ids[prompt_len:total]
            item[f"{side}_input_ids"] = ids
            item[f"{side}_labels"] = labels
            item[f"{side}_attention_mask"] = (torch.arange(seq_len) < total).long()
        items.append(item)
    return items


@pytest.fixture(scope="session")
def random_dpo_pairs() -> Callable[..., list[dict[str, torch.Tensor]]]:
    """Factory: `random_dpo_pairs(n, seq_len, vocab_size=50, seed=0)` -> list of DPOTokens-shaped items."""
    return _random_dpo_pairs


# ---------------------------------------------------------------------------------------------------------------
# A tiny end-to-end pipeline on the embedded verifiable data set: raw data -> tokenizer -> shards -> SFT model.
# Each fixture is session-scoped and builds on the previous one; all live under one temporary directory.

def _split_by_field(raw: Path, out: Path) -> None:
    """Stage-2 layout from the generator's raw files: `{kind}_{train,val}.jsonl` by each record's `split`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    for kind in ("pretrain", "sft", "dpo", "tasks"):
        rows = {"train": [], "val": []}
        for line in (raw / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rows[record["split"]].append(line)
        for split, lines in rows.items():
            (out / f"{kind}_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_embedded_data(tmp_path_factory):
    """`out/data`-style directory (pretrain/sft/dpo/tasks _train/_val .jsonl) from a small embedded data set."""
    from mateconv.data.embedded import generate

    root = tmp_path_factory.mktemp("embedded")
    generate(root / "raw", seed=0, pretrain_chars=60_000, sft_conversations=1200, dpo_pairs=600,
             train_tasks=60, val_tasks=60)
    _split_by_field(root / "raw", root / "data")
    return root / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_embedded_data):
    """A 512-token byte-level BPE tokenizer directory (ChatML) trained on the tiny embedded data."""
    from mateconv.tokenizer import train_tokenizer

    files = [tiny_embedded_data / f"{kind}_train.jsonl" for kind in ("pretrain", "sft")]
    return train_tokenizer(files, tiny_embedded_data.parent / "tokenizer", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokens(tiny_embedded_data, tiny_tokenizer):
    """Token shards `<root>/tokens/{pretrain,sft,dpo}/{train,val}` of the tiny embedded data."""
    from mateconv.data.shards import build_all

    out = tiny_embedded_data.parent / "tokens"
    build_all(tiny_embedded_data, tiny_tokenizer, out, workers=1, progress=False)
    return out


TINY_MODEL_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "96",
                    "--vocab_size", "512", "--tracker", "none", "--num_workers", "0", "--device", "cpu",
                    "--dtype", "float32", "--engine", "torch"]


def _train_tiny_sft(tokens: Path, tokenizer: Path, out: Path, *extra_flags: str) -> Path:
    """SFT from scratch on the embedded conversations with the real engine; returns the `final/` directory."""
    from mateconv.config import parse_config
    from mateconv.train.stages import STAGE_DEFAULTS, run

    config = parse_config(TINY_MODEL_FLAGS + [
        "--data_path", str(tokens / "sft" / "train"), "--val_data_path", "", "--tokenizer_path",
        str(tokenizer), "--out_dir", str(out), "--init_from", "", "--batch_size", "16", "--learning_rate",
        "3e-3", "--max_steps", "150", "--warmup_iters", "10", "--save_interval_steps", "1000", "--log_interval", "50",
        *extra_flags], STAGE_DEFAULTS["sft"])
    run("sft", config)
    return out / "final"


@pytest.fixture(scope="session")
def tiny_sft_model(tiny_tokens, tiny_tokenizer):
    """A tiny dense MateConv model trained by the real engine with SFT on the embedded conversations (from
    scratch); returns its `final/` directory (Hugging Face format with the tokenizer)."""
    return _train_tiny_sft(tiny_tokens, tiny_tokenizer, tiny_tokens.parent / "sft")


@pytest.fixture(scope="session")
def tiny_moe_sft_model(tiny_tokens, tiny_tokenizer):
    """The MoE twin of `tiny_sft_model` (4 routed experts, top 2, 1 shared)."""
    return _train_tiny_sft(tiny_tokens, tiny_tokenizer, tiny_tokens.parent / "sft_moe", "--use_moe", "true",
                           "--n_routed_experts", "4", "--num_experts_per_tok", "2", "--n_shared_experts", "1")


# ---------------------------------------------------------------------------------------------------------------
# The README's main command (scripts/run_pipeline.sh, preset tiny) run once per session in a temporary directory.

REPO = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`bash scripts/<name> args...` in `cwd` with W&B offline; output captured."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(working directory, completed process) of the whole tiny pipeline; its artifacts are under `<dir>/out`."""
    root = tmp_path_factory.mktemp("pipeline")
    return root, run_script("run_pipeline.sh", cwd=root, timeout=1500)
