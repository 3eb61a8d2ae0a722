"""Shared test fixtures (generic, reusable by every area's tests)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The shared sample data (third-party corpora): $MATECONV_SHARED_DATA, by default `shared/data` beside the repository.
SHARED_DATA = Path(os.environ.get("MATECONV_SHARED_DATA", REPO.parent / "shared" / "data"))


# The test command runs the suite on several cores with pytest-xdist (--dist loadscope): each module on one worker,
# its module-scoped fixtures built once (launchers take free ports, so modules run side by side), and the session's
# tiny models built once for all workers (`built_once`). Modules go out in the order of the collected tests: the long
# ones first, so that none of them starts last and runs on one core while the others wait.
LONG_MODULES = ["test_pipeline", "test_train_deepspeed", "test_gpu_check_smoke", "test_seed_commands", "test_export",
                "test_train_world_size", "test_train_engine", "test_pipeline_data", "test_dpo_deepspeed",
                "test_train_fsdp"]


def pytest_collection_modifyitems(items):
    first = {module: rank for rank, module in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: first.get(item.module.__name__, len(first)))


def pytest_configure(config):
    """Under xdist each worker (and what it starts) takes its share of the cores, not all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


LONE_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_process_group_left_behind() -> Iterator[None]:
    """An in-process DeepSpeed or FSDP run (a lone rank) sets up a process group and its variables (RANK,
    MASTER_PORT, ...) and keeps them, as a stage's own process would until it exits: the next test in this worker,
    and the launchers it starts, begin without them."""
    before = {key: os.environ.get(key) for key in LONE_RANK_ENV}
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`<the run's temporary directory>/name`, made by `build(path)` once per test run: under xdist the first worker
    that needs it builds it while the others wait for it (a lock file), then all of them read it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: a basetemp per worker under it
    path, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            build(path)
            done.touch()
    return path


def _shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared data {path} is missing (set MATECONV_SHARED_DATA to the shared data directory)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Callable[[str], Path]:
    """Factory: `shared_data("owner__repo/relative/path")` -> that path under SHARED_DATA. When it is missing the
    test fails under CI=true and is skipped (with the path as the reason) otherwise."""
    return _shared_file


@pytest.fixture
def single_thread():
    """Tiny models on shared CPU cores run fastest on one thread (`pytest.mark.usefixtures("single_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_thread_env() -> dict[str, str]:
    """Subprocess environment: one thread per process (2 shared cores), CPU DeepSpeed, offline W&B."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def read_metrics(out_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    from mateconv import files

    return files.read_metrics(Path(out_dir) / "metrics.jsonl")


def shards_of_another_vocabulary(shards: Path, copy: Path) -> tuple[int, int]:
    """Copies token shards to `copy` with an index that says another tokenizer made them (its vocabulary 4096
    larger): what an earlier run's out/tokens looks like beside another model -> (their vocab_size, the copy's)."""
    import shutil

    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**index, "vocab_size": index["vocab_size"] + 4096}))
    return index["vocab_size"], index["vocab_size"] + 4096


def losses(out_dir: Path) -> dict[int, float]:
    """{step: training loss} of a run."""
    return {row["step"]: row["loss"] for row in read_metrics(out_dir) if "loss" in row}


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

    def build(root: Path) -> None:
        generate(root / "raw", seed=0, pretrain_chars=60_000, sft_conversations=1200, dpo_pairs=600,
                 train_tasks=60, val_tasks=60)
        _split_by_field(root / "raw", root / "data")
    return built_once(tmp_path_factory, "embedded", build) / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_embedded_data, tmp_path_factory):
    """A 512-token byte-level BPE tokenizer directory (ChatML) trained on the tiny embedded data."""
    from mateconv.tokenizer import train_tokenizer

    files = [tiny_embedded_data / f"{kind}_train.jsonl" for kind in ("pretrain", "sft")]
    return built_once(tmp_path_factory, "embedded/tokenizer", lambda out: train_tokenizer(files, out, vocab_size=512))


@pytest.fixture(scope="session")
def tiny_tokens(tiny_embedded_data, tiny_tokenizer, tmp_path_factory):
    """Token shards `<root>/tokens/{pretrain,sft,dpo}/{train,val}` of the tiny embedded data."""
    from mateconv.data.tokenizing import build_all

    return built_once(tmp_path_factory, "embedded/tokens",
                      lambda out: build_all(tiny_embedded_data, tiny_tokenizer, out, workers=1, progress=False))


TINY_MODEL_FLAGS = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "96",
                    "--vocab_size", "512", "--tracker", "none", "--num_workers", "0", "--device", "cpu",
                    "--dtype", "float32", "--engine", "torch"]


def _tiny_flags(tokens: Path, tokenizer: Path, out_dir: Path, stage: str = "pretrain", **overrides) -> list[str]:
    from mateconv.flags import render_flags

    values = {"data_path": tokens / stage / "train", "val_data_path": tokens / stage / "val",
              "tokenizer_path": tokenizer, "out_dir": out_dir, "batch_size": 4, "max_steps": 6, "learning_rate": 3e-3,
              "log_interval": 1, "eval_interval": 3, "eval_batches": 4, "save_interval_steps": 3, "warmup_iters": 2,
              # DPO's forgetting sets default to ./out/tokens/...: none unless a test names them, whatever the cwd holds
              **({"forget_data_paths": ""} if stage == "dpo" else {}), **overrides}
    return TINY_MODEL_FLAGS + render_flags(values)


@pytest.fixture(scope="session")
def tiny_flags(tiny_tokens, tiny_tokenizer) -> Callable[..., list[str]]:
    """Factory: `tiny_flags(out_dir, stage="pretrain", **overrides)` -> flat command-line flags of a short fp32 run of
    the tiny model on the embedded token shards of `stage` (pretrain, sft or dpo); overrides are flag values
    (True/False for switches, "" for an empty path) and win over the defaults, TINY_MODEL_FLAGS included."""
    def flags(out_dir: Path, stage: str = "pretrain", **overrides) -> list[str]:
        return _tiny_flags(tiny_tokens, tiny_tokenizer, out_dir, stage, **overrides)
    return flags


def _train_tiny(tokens: Path, tokenizer: Path, out: Path, stage: str, **overrides) -> Path:
    """A tiny model trained from scratch with the real engine; returns the `final/` directory."""
    from mateconv.config import parse_config
    from mateconv.train.stages import RECIPES, run

    run(RECIPES[stage], parse_config(_tiny_flags(tokens, tokenizer, out, stage, init_from="", **overrides),
                                     RECIPES[stage].defaults))
    return out / "final"


def _tiny_sft_once(tmp_path_factory, tokens: Path, tokenizer: Path, name: str, **moe) -> Path:
    """SFT from scratch on the embedded conversations (300 steps of 16 sequences, no validation), once per run."""
    return built_once(tmp_path_factory, f"embedded/{name}", lambda out: _train_tiny(
        tokens, tokenizer, out, "sft", val_data_path="", batch_size=16, max_steps=300, warmup_iters=10,
        save_interval_steps=1000, log_interval=50, **moe)) / "final"


@pytest.fixture(scope="session")
def tiny_pretrain_model(tiny_tokens, tiny_tokenizer, tmp_path_factory):
    """A tiny dense model pretrained for 6 steps from scratch on the embedded prose; its `final/` directory."""
    return built_once(tmp_path_factory, "embedded/pretrain", lambda out: _train_tiny(
        tiny_tokens, tiny_tokenizer, out, "pretrain", eval_interval=100, save_interval_steps=100)) / "final"


@pytest.fixture(scope="session")
def tiny_sft_model(tiny_tokens, tiny_tokenizer, tmp_path_factory):
    """A tiny dense MateConv model trained by the real engine with SFT on the embedded conversations (from
    scratch); returns its `final/` directory (Hugging Face format with the tokenizer). Its replies have the data
    set's answer form ("The answer is 12.")."""
    return _tiny_sft_once(tmp_path_factory, tiny_tokens, tiny_tokenizer, "sft")


@pytest.fixture(scope="session")
def tiny_moe_sft_model(tiny_tokens, tiny_tokenizer, tmp_path_factory):
    """The MoE twin of `tiny_sft_model` (4 routed experts, top 2, 1 shared)."""
    return _tiny_sft_once(tmp_path_factory, tiny_tokens, tiny_tokenizer, "sft_moe", use_moe=True,
                          n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


@pytest.fixture(scope="session")
def tiny_moe_qk_norm_sft_model(tiny_tokens, tiny_tokenizer, tmp_path_factory):
    """An MoE twin with per-head q/k norms and no shared experts (4 routed experts, top 2): it exports as Qwen3-MoE,
    also to GGUF."""
    return _tiny_sft_once(tmp_path_factory, tiny_tokens, tiny_tokenizer, "sft_moe_qk_norm", use_moe=True,
                          n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0, qk_norm=True)


@pytest.fixture(scope="session")
def tiny_qk_norm_sft_model(tiny_tokens, tiny_tokenizer, tmp_path_factory):
    """`tiny_sft_model` with per-head q/k RMSNorm (`qk_norm`): it exports as Qwen3, not Llama."""
    return _tiny_sft_once(tmp_path_factory, tiny_tokens, tiny_tokenizer, "sft_qk_norm", qk_norm=True)


@pytest.fixture(scope="session")
def tiny_untrained_model(tiny_tokenizer, tmp_path_factory):
    """A randomly initialised MateConv model (dim 256, 4 layers, 1024-token context) saved with the tiny tokenizer:
    near-uniform predictions, replies that rarely end and take a while (interrupt, disconnect and queue tests)."""
    from transformers import AutoTokenizer

    from model import MateConvConfig, MateConvForCausalLM

    out = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    config = MateConvConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=1024)
    MateConvForCausalLM(config).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def greedy_reply() -> Callable[..., tuple[str, int, bool]]:
    """Factory: `greedy_reply(model_dir, question, max_new_tokens=24)` -> (text, tokens, ended): the model's greedy
    reply to one user message, computed in process with `generate_tokens` (the reference that serving, chat and
    evaluation must reproduce); `tokens` counts the generated tokens before EOS, `ended` is whether EOS came."""
    from mateconv.chat import load_model
    from model.generation import generate_tokens

    models = {}

    def reply(model_dir: Path, question: str, max_new_tokens: int = 24) -> tuple[str, int, bool]:
        if model_dir not in models:
            models[model_dir] = load_model(model_dir, device="cpu")
        model, tokenizer = models[model_dir]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        with torch.no_grad():
            ids = generate_tokens(model, torch.tensor([prompt]), max_new_tokens, temperature=0,
                                  eos_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
        ended = tokenizer.eos_token_id in ids
        ids = ids[:ids.index(tokenizer.eos_token_id)] if ended else ids
        return tokenizer.decode(ids), len(ids), ended
    return reply


@contextlib.contextmanager
def served(model: Path, name: str | None,
           extra_args: list[str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m mateconv.serve` of `model` as `name` (None: its default names) on a free loopback port, one thread
    (a tiny model on 2 shared cores runs fastest so): (its /v1 URL, the process), stopped on exit."""
    from mateconv.procs import start_background, stop_background

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        url, process = start_background(model, served_model_name=name, extra_args=extra_args)
    try:
        yield url, process
    finally:
        stop_background(process)


# ---------------------------------------------------------------------------------------------------------------
# The README's main command (scripts/run_pipeline.sh, preset tiny) run once per session in a temporary directory.


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
