"""MateConv vs MiniMind, side by side: the same real corpus, the same model shape and tokenizer, each trained by its own
trainer, reporting real (non-padding) tokens/s, peak memory, and held-out bits per byte at equal steps and at equal
wall time.

    python benchmarks/bench_vs_minimind.py --device cpu            # dim 256, 4 layers, seq 256, batch 16, 1 epoch
    python benchmarks/bench_vs_minimind.py --device cuda --epochs 4 --compile 1   # both trainers compiled
    python benchmarks/bench_vs_minimind.py --epochs 4 --mateconv_rows minimind   # ablation: MiniMind's rows for both

- Corpus: documents built from $MATECONV_SHARED_DATA (default ../shared/data): C4 and Wikipedia samples, Tiny
  Shakespeare in passages, Song ci poems; shuffled with a fixed seed; the first --train_docs are the training set
  (written in MiniMind's pretrain format, {"text"} per line), the next --heldout_docs the held-out set.
- MiniMind: an unmodified copy of ../shared/peers/minimind (MATECONV_MINIMIND overrides), its own
  trainer/train_pretrain.py run as a subprocess with its own flags (one document per row, truncated to seq - 2
  tokens, padded); --epochs over the training set gives its step count. Its checkpoints (written atomically every
  --save_every steps) are snapshotted as they appear and loaded into its own MiniMindForCausalLM.
- MateConv: stage 3 (3.dataset.py) packs the same documents with MiniMind's tokenizer (adopted by
  mateconv.tokenizer), then 4.pretrain.py trains for the same number of steps at the same batch shape, learning rate,
  schedule (cosine to 10%, no warmup), AdamW settings and gradient clipping.
- MateConv's model normalises each head's queries and keys as its seed presets and MiniMind's attention do;
  --qk_norm 0 leaves that out (an ablation of the norm).
- --mateconv_batch B (default --batch): MateConv trains with B rows per step and proportionally more steps (and
  checkpoints further apart in steps), so both process the same positions. MiniMind's padded rows carry about half
  real tokens, so half its batch gives MateConv about the same real tokens per step and twice the updates: the
  setting a user of packed rows would pick.
- Both eager by default (MateConv's engine would otherwise compile on CUDA); --compile 1 compiles both (MiniMind's
  --use_compile 1, MateConv's --compile 1). On CUDA both train under bf16 autocast.
- Real tokens: MiniMind's non-padding positions per step, counted from its own sampling order (torch.randperm with
  seed 42 + epoch); MateConv's packed batches have no padding. Training time is the loop's: from the end of step 1
  to each step's log line (start-up, data loading and the first step are left out for both; MateConv's stage 3 is
  timed on its own); wall time counts from process start. Both save a checkpoint every --save_every steps (inside
  the timed loop for both). Peak memory: each trainer's max RSS (and CUDA peak).
- --mateconv_rows minimind (an ablation, not a comparison of the two systems): MateConv's trainer trains on MiniMind's
  own rows instead of its packed ones: each document alone in a row, BOS + its first seq - 2 tokens + EOS, padded,
  drawn in MiniMind's order (both shuffle with seed 42 + epoch; --mateconv_seed changes ours), fed as SFT shards with
  every token trained (5.full_sft.py from scratch, the same flags). Equal data, so what is left is model and trainer.
- Bits per byte: mateconv.logprobs.bits_per_byte on the held-out documents, whole (windows of seq tokens), for both
  models; each model's documents start the way it was trained (MiniMind, and MateConv on MiniMind's rows: BOS;
  packed MateConv: the EOS of the previous one).
  Equal steps: both final models, on all held-out documents and on the Chinese and English ones apart. Equal wall
  time: each system's newest checkpoint whose step ended within the faster run's training time. Every checkpoint of
  both is scored too: a table and bpb_curve.png (held-out bpb against steps, real tokens trained and training time)
  show whether a gap is a plateau, a slower start or over-training on repeated data.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mateconv.data.tokenizing import write_sft_rows
from mateconv.files import read_metrics, save_figure, write_atomic
from mateconv.logprobs import bits_per_byte
from mateconv.tokenizer import adopt_tokenizer
from model import MateConvConfig, MateConvForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MATECONV_SHARED_DATA", REPO.parent / "shared" / "data"))
MINIMIND = Path(os.environ.get("MATECONV_MINIMIND", REPO.parent / "shared" / "peers" / "minimind"))
CJK = re.compile(r"[\u4e00-\u9fff]")  # a held-out document with Chinese characters counts as Chinese
DEVICE_FLAGS = {"cpu": ["--device", "cpu", "--dtype", "float32"], "cuda": ["--device", "cuda", "--dtype", "bfloat16"]}
MINIMIND_STEP = re.compile(r"Epoch:\[(\d+)/\d+\]\((\d+)/(\d+)\), loss: ([\d.]+)")
# Runs a trainer script as __main__ and writes its peak memory to $BENCH_PEAK_FILE at exit.
RUNNER = """
import atexit, json, os, resource, runpy, sys
def report():
    peak = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    with open(os.environ["BENCH_PEAK_FILE"], "w") as handle:
        json.dump(peak, handle)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ---------------------------------------------------------------- corpus

def chunks(pieces: list[str], min_chars: int, joiner: str) -> list[str]:
    """Consecutive pieces joined until each chunk has at least `min_chars` characters."""
    out, current = [], []
    for piece in pieces:
        current.append(piece)
        if sum(map(len, current)) >= min_chars:
            out.append(joiner.join(current))
            current = []
    return out + ([joiner.join(current)] if current else [])


def corpus_documents(shared: Path) -> list[str]:
    """Mixed English / Chinese documents from the shared sample data (README there)."""
    factory = shared / "hiyouga__LLaMA-Factory" / "data"
    docs = [json.loads(line)["text"] for line in (factory / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    for article in (factory / "wiki_demo.txt").read_text(encoding="utf-8").splitlines():
        docs += chunks(re.split(r"(?<=\. )", article), 1500, "")
    shakespeare = shared / "karpathy__char-rnn" / "data" / "tinyshakespeare" / "input.txt"
    docs += chunks(shakespeare.read_text(encoding="utf-8").split("\n\n"), 600, "\n\n")
    for name in ("ci.song.0.json", "ci.song.1000.json"):
        for poem in json.loads((shared / "chinese-poetry__chinese-poetry" / "宋词" / name).read_text(encoding="utf-8")):
            docs.append(f"{poem['rhythmic']}\n{poem['author']}\n" + "".join(poem["paragraphs"]))
    return [doc.strip() for doc in docs if doc.strip()]


def build_corpus(shared: Path, out: Path, train_docs: int, heldout_docs: int, seed: int = 0) -> dict[str, Path]:
    docs = corpus_documents(shared)
    if len(docs) < train_docs + heldout_docs:
        raise SystemExit(f"bench: the corpus has {len(docs)} documents, fewer than --train_docs + --heldout_docs")
    random.Random(seed).shuffle(docs)
    paths = {"train": out / "pretrain_train.jsonl", "heldout": out / "pretrain_heldout.jsonl"}
    for split, part in (("train", docs[:train_docs]), ("heldout", docs[train_docs: train_docs + heldout_docs])):
        write_atomic(paths[split], "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in part))
    return paths


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- running a trainer

class Snapshots(threading.Thread):
    """Hard-links every new version of an atomically replaced file (MiniMind overwrites its checkpoint)."""

    def __init__(self, path: Path, into: Path):
        super().__init__(daemon=True)
        self.path, self.into, self.stop, self.taken = path, into, threading.Event(), []
        into.mkdir(parents=True, exist_ok=True)

    def poll(self, seen: int | None) -> int | None:
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return seen
        if inode != seen:
            target = self.into / f"{len(self.taken):04d}.pth"
            os.link(self.path, target)
            self.taken.append(target)
        return inode

    def run(self) -> None:
        seen = None
        while not self.stop.is_set():
            seen = self.poll(seen)
            time.sleep(0.05)
        self.poll(seen)


def run_trainer(name: str, command: list[str], cwd: Path, env: dict, log: Path, on_line=None) -> dict:
    """Runs `python RUNNER command...`; returns launch time, wall seconds and peak memory; stdout+stderr to `log`."""
    peak_file = log.with_suffix(".peak.json")
    env = {**env, "BENCH_PEAK_FILE": str(peak_file), "PYTHONUNBUFFERED": "1"}
    print(f"[bench] {name}: {' '.join(command)}  (cwd {cwd})", flush=True)
    start = time.time()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", RUNNER, *command], cwd=cwd, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            handle.write(line)
            handle.flush()  # readable with tail -f
            if on_line is not None:
                on_line(line, time.time() - start)
        code = process.wait()
    wall = time.time() - start
    if code != 0:
        raise SystemExit(f"bench: {name} failed (exit {code}); see {log}")
    return {"start": start, "wall_s": wall, **json.loads(peak_file.read_text())}


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ---------------------------------------------------------------- MiniMind

def minimind_module(root: Path):
    """MiniMind's own model file, imported under another name (our model package is also called `model`)."""
    spec = importlib.util.spec_from_file_location("minimind_model", root / "model" / "model_minimind.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minimind_rows(texts: list[str], tokenizer, seq: int) -> list[list[int]]:
    """MiniMind's pretraining rows before padding: BOS + the document truncated to seq - 2 tokens + EOS."""
    return [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids[: seq - 2],
             tokenizer.eos_token_id] for t in texts]


def minimind_real_tokens(rows: list[list[int]], batch: int, epochs: int) -> list[int]:
    """Non-padding positions of each MiniMind step, in the order its trainer draws documents (torch.randperm after
    seeding 42 + epoch, consecutive batches)."""
    lengths = [len(row) for row in rows]
    per_step = []
    for epoch in range(epochs):
        torch.manual_seed(42 + epoch)
        order = torch.randperm(len(lengths)).tolist()
        per_step += [sum(lengths[i] for i in order[s: s + batch]) for s in range(0, len(order), batch)]
    return per_step


def run_minimind(args, work: Path, train: Path, env: dict) -> dict:
    root = work / "minimind"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(MINIMIND, root)
    snapshots = Snapshots(root / "checkpoints" / f"pretrain_{args.dim}_resume.pth", work / "minimind_snapshots")
    shutil.rmtree(snapshots.into, ignore_errors=True)
    snapshots.into.mkdir(parents=True)
    step_times: dict[int, float] = {}
    losses: dict[int, float] = {}
    steps_per_epoch = math.ceil(args.train_docs / args.batch)

    def on_line(line: str, elapsed: float) -> None:
        found = MINIMIND_STEP.search(line)
        if found:
            epoch, step = int(found.group(1)), int(found.group(2))
            global_step = (epoch - 1) * steps_per_epoch + step
            step_times[global_step], losses[global_step] = elapsed, float(found.group(4))

    flags = ["--save_dir", "../out", "--epochs", args.epochs, "--batch_size", args.batch, "--learning_rate", args.lr,
             "--device", "cuda:0" if args.device == "cuda" else "cpu", "--num_workers", args.num_workers,
             "--accumulation_steps", 1, "--grad_clip", 1.0, "--log_interval", 1, "--save_interval", args.save_every,
             "--hidden_size", args.dim, "--num_hidden_layers", args.layers, "--max_seq_len", args.seq,
             "--use_compile", args.compile, "--data_path", train.resolve()]
    snapshots.start()
    try:
        result = run_trainer("MiniMind", ["train_pretrain.py", *map(str, flags)], root / "trainer", env,
                             work / "minimind.log", on_line)
    finally:
        snapshots.stop.set()
        snapshots.join()
    checkpoints = {}
    for path in snapshots.taken:  # a save per --save_every steps within an epoch, and at each epoch's end
        saved = torch.load(path, map_location="cpu", weights_only=False)
        step = saved["epoch"] * steps_per_epoch + saved["step"]
        checkpoints[step] = path
    return {**result, "step_times": step_times, "losses": losses, "checkpoints": checkpoints,
            "steps": max(step_times)}


def minimind_model(module, args, path: Path):
    model = module.MiniMindForCausalLM(module.MiniMindConfig(hidden_size=args.dim, num_hidden_layers=args.layers))
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=False)
    return model.eval()


# ---------------------------------------------------------------- MateConv

def tokenize_for_mateconv(work: Path, train: Path, env: dict) -> dict:
    """Stage 3 on the training documents: (shard directory, seconds, tokens)."""
    tokens = work / "tokens" / "train"
    shutil.rmtree(tokens, ignore_errors=True)
    started = time.time()
    subprocess.run([sys.executable, "3.dataset.py", "--kind", "pretrain", "--input", str(train), "--out_dir",
                    str(tokens), "--tokenizer", str(work / "tokenizer"), "--workers", "1", "--no_progress"],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    index = json.loads((tokens / "index.json").read_text())
    return {"tokens_dir": tokens, "tokenize_s": time.time() - started,
            "corpus_tokens": sum(shard["num_tokens"] for shard in index["shards"])}


def minimind_rows_for_mateconv(work: Path, rows: list[list[int]]) -> dict:
    """--mateconv_rows minimind: MiniMind's rows as SFT shards with every token trained (same keys as
    tokenize_for_mateconv)."""
    started = time.time()
    tokens = write_sft_rows(rows, work / "tokenizer", work / "tokens" / "minimind_rows")
    return {"tokens_dir": tokens, "tokenize_s": time.time() - started, "corpus_tokens": sum(map(len, rows))}


def run_mateconv(args, work: Path, shards: dict, steps: int, env: dict) -> dict:
    tokenizer_dir, tokens = work / "tokenizer", shards["tokens_dir"]
    out = work / "mateconv"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--data_path", tokens, "--val_data_path", "", "--tokenizer_path", tokenizer_dir, "--out_dir", out,
             "--init_from", "", "--dim", args.dim, "--n_layers", args.layers, "--n_heads", 8, "--n_kv_heads", 4,
             "--hidden_dim", math.ceil(args.dim * math.pi / 64) * 64, "--norm_eps", 1e-6, "--vocab_size", 6400,
             "--max_seq_len", args.seq, "--batch_size", args.mateconv_batch, "--max_steps", steps,
             "--learning_rate", args.lr, "--min_lr_ratio", 0.1, "--warmup_iters", 0, "--weight_decay", 0.01,
             "--adam_beta2", 0.999, "--grad_clip", 1.0, "--log_interval", 1,
             "--save_interval_steps", args.save_every * args.batch // args.mateconv_batch,
             "--keep_checkpoint_max", 1000, "--tracker", "none", "--num_workers", args.num_workers,
             "--engine", "torch", "--compile", args.compile, "--seed", args.mateconv_seed, *DEVICE_FLAGS[args.device],
             *(["--qk_norm"] if args.qk_norm else [])]
    stage = {"packed": "4.pretrain.py", "minimind": "5.full_sft.py"}[args.mateconv_rows]
    result = run_trainer("MateConv", [stage, *map(str, flags)], REPO, env, work / "mateconv.log")
    rows = [row for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    step_times = {row["step"]: row["time"] - result["start"] for row in rows}
    checkpoints = {int(p.name.split("_")[1]): p for p in (out / "checkpoints").glob("step_*")}
    checkpoints[max(step_times)] = out / "final"
    return {**result, **shards, "step_times": step_times, "losses": {row["step"]: row["loss"] for row in rows},
            "checkpoints": checkpoints, "steps": max(step_times)}


def mateconv_model(path: Path, final: Path):
    if path == final:
        return MateConvForCausalLM.from_pretrained(final).eval()
    model = MateConvForCausalLM(MateConvConfig.from_pretrained(final))
    model.load_state_dict(torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)["model"])
    return model.eval()


# ---------------------------------------------------------------- report

def heldout_bpb(model, tokenizer, languages: dict[str, list[str]], seq: int,
                start: list[int]) -> tuple[float, dict[str, float]]:
    """Bits per byte on all held-out documents, and on each language's apart (every document scored once)."""
    parts = {language: bits_per_byte(model, tokenizer, texts, seq, batch_size=16, start_ids=start)
             for language, texts in languages.items() if texts}
    nll, nbytes = sum(part.nll for part in parts.values()), sum(part.bytes for part in parts.values())
    return nll / (math.log(2) * nbytes), {language: part.bpb for language, part in parts.items()}


def train_time(run: dict, step: int) -> float:
    """Seconds of the training loop up to the end of `step`, counted from the end of step 1."""
    return run["step_times"][step] - run["step_times"][1]


def newest_within(run: dict, budget_s: float) -> int | None:
    """The newest checkpointed step that ended within `budget_s` seconds of training, None if there is none."""
    reached = [step for step in run["checkpoints"] if train_time(run, step) <= budget_s + 1e-6]
    return max(reached) if reached else None


def plot_curves(curves: dict[str, list[dict]], path: Path) -> str:
    """Held-out bpb of every checkpoint against steps, real tokens trained and training time, one line per system;
    returns the report's note on it (a bare GPU machine may lack matplotlib: the table then stands alone)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "(no plot: matplotlib is not installed)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = ("step", "real tokens", "training time (s)")
    figure, axes = plt.subplots(1, len(axes_keys), figsize=(13, 3.8), sharey=True)
    for axis, key in zip(axes, axes_keys):
        for name, points in curves.items():
            axis.plot([p[key] for p in points], [p["held-out bpb"] for p in points], marker="o", label=name)
        axis.set_xlabel(key)
        axis.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 200k, not 200000 running into 300000
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per byte")
    axes[0].legend()
    save_figure(figure, path)
    plt.close(figure)
    return f"({path.name})"


def table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench_vs_minimind", help="working directory (rewritten)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--train_docs", type=int, default=960)
    parser.add_argument("--heldout_docs", type=int, default=100)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=1, help="MiniMind epochs over the training documents; "
                                                              "MateConv trains the same number of steps")
    parser.add_argument("--save_every", type=int, default=10, help="checkpoint interval (steps) of both trainers")
    parser.add_argument("--mateconv_batch", type=int, default=None,
                        help="MateConv's rows per step (default --batch), with proportionally more steps")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers of both trainers")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both trainers")
    parser.add_argument("--mateconv_rows", choices=["packed", "minimind"], default="packed",
                        help="minimind: an ablation, MateConv's trainer on MiniMind's own rows (one truncated, "
                             "padded document per row, same order) to separate data layout from model and trainer")
    parser.add_argument("--mateconv_seed", type=int, default=42,
                        help="MateConv's seed (initialisation and order; 42 is MiniMind's fixed one, and with it "
                             "MateConv draws MiniMind's rows in MiniMind's order): how much a result moves with it")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=0,
                        help="torch.compile in both trainers (MiniMind's --use_compile, MateConv's --compile)")
    parser.add_argument("--qk_norm", type=int, choices=[0, 1], default=1,
                        help="MateConv's per-head q/k RMSNorm (qk_norm: its seed presets' and MiniMind's attention); "
                             "0 leaves it out")
    parser.add_argument("--concurrent", action="store_true",
                        help="train both at once (on a shared CPU machine the other jobs' load then hits both alike; "
                             "use with --threads 1 on 2 cores)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available")
    for needed in (SHARED_DATA, MINIMIND / "trainer" / "train_pretrain.py"):
        if not needed.exists():
            raise SystemExit(f"bench: {needed} not found (set MATECONV_SHARED_DATA / MATECONV_MINIMIND)")
    if importlib.util.find_spec("datasets") is None:
        raise SystemExit("bench: MiniMind's trainer imports `datasets`, which this Python lacks (pip install datasets)")

    work = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_corpus(SHARED_DATA, work, args.train_docs, args.heldout_docs)
    adopt_tokenizer(MINIMIND / "model", work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(MINIMIND / "model")
    train_texts, heldout_texts = read_texts(paths["train"]), read_texts(paths["heldout"])
    # no PYTHONPATH: MiniMind's trainer imports its own top-level `model` package, which ours would shadow
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR=args.device)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    minimind_ids = minimind_rows(train_texts, tokenizer, args.seq)
    shards = (minimind_rows_for_mateconv(work, minimind_ids) if args.mateconv_rows == "minimind"
              else tokenize_for_mateconv(work, paths["train"], env))
    args.mateconv_batch = args.mateconv_batch or args.batch
    if args.batch % args.mateconv_batch or args.mateconv_rows == "minimind" and args.mateconv_batch != args.batch:
        raise SystemExit("bench: --mateconv_batch must divide --batch (and equal it with --mateconv_rows minimind)")
    # MiniMind's steps are whole epochs over the documents; MateConv's cover the same positions
    steps = args.epochs * math.ceil(args.train_docs / args.batch) * args.batch // args.mateconv_batch
    loads = {"before": load_average()}
    if args.concurrent:
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_minimind, args, work, paths["train"], env),
                    pool.submit(run_mateconv, args, work, shards, steps, env)]
            minimind, ours = (run.result() for run in runs)
        loads["after both"] = load_average()
    else:
        minimind = run_minimind(args, work, paths["train"], env)
        loads["after MiniMind"] = load_average()
        ours = run_mateconv(args, work, shards, steps, env)
        loads["after MateConv"] = load_average()

    positions = {"MiniMind": args.batch * args.seq, "MateConv": args.mateconv_batch * args.seq}  # per step
    minimind["tokens"] = minimind_real_tokens(minimind_ids, args.batch, args.epochs)
    # packed: every position is a real token; MiniMind's rows: the same rows in the same order as MiniMind
    ours["tokens"] = (minimind["tokens"] if args.mateconv_rows == "minimind"
                      else [positions["MateConv"]] * ours["steps"])
    budget = min(train_time(run, run["steps"]) for run in (minimind, ours))
    module = minimind_module(work / "minimind")
    loaders = {"MiniMind": lambda path: minimind_model(module, args, path).to(args.device),
               "MateConv": lambda path: mateconv_model(path, work / "mateconv" / "final").to(args.device)}
    lead = tokenizer.bos_token_id if args.mateconv_rows == "minimind" else tokenizer.eos_token_id
    starts = {"MiniMind": [tokenizer.bos_token_id], "MateConv": [lead]}
    languages = {"Chinese": [t for t in heldout_texts if CJK.search(t)],
                 "English": [t for t in heldout_texts if not CJK.search(t)]}
    rows, timed_rows, curves, report = [], [], {}, {"args": vars(args), "load_average": loads, "systems": {}}
    for name, run in (("MiniMind", minimind), ("MateConv", ours)):
        loop_s = train_time(run, run["steps"])
        rate = sum(run["tokens"][1: run["steps"]]) / loop_s  # steps 2..N
        scores = {}
        timed = newest_within(run, budget)
        for step in sorted(run["checkpoints"]):
            model = loaders[name](run["checkpoints"][step])
            scores[step], step_languages = heldout_bpb(model, tokenizer, languages, args.seq, starts[name])
            if step == run["steps"]:
                by_language = {language: round(value, 4) for language, value in step_languages.items()}
                params = sum(p.numel() for p in model.parameters()) / 1e6
        curves[name] = [{"system": name, "step": step, "real tokens": sum(run["tokens"][:step]),
                         "training time (s)": round(train_time(run, step), 1), "held-out bpb": round(bpb, 4)}
                        for step, bpb in sorted(scores.items())]
        timed_rows.append({"system": name, "training time (s)": round(budget, 1), "step": timed or "none saved",
                           "step ended at (s)": "" if timed is None else round(train_time(run, timed), 1),
                           "real tokens": "" if timed is None else sum(run["tokens"][:timed]),
                           "held-out bpb": "" if timed is None else round(scores[timed], 4)})
        real = sum(run["tokens"][: run["steps"]])
        rows.append({"system": name, "params (M)": round(params, 2), "steps": run["steps"], "real tokens": real,
                     "real / positions": f"{real / (positions[name] * run['steps']):.0%}",
                     "training (s)": round(loop_s, 1), "wall (s)": round(run["wall_s"], 1),
                     "real tokens/s": round(rate), "peak RSS (GB)": round(run["rss_gb"], 2),
                     **({"peak CUDA (GB)": round(run.get("cuda_gb", math.nan), 2)} if args.device == "cuda" else {}),
                     "final loss": round(run["losses"][run["steps"]], 3),
                     "held-out bpb": round(scores[run["steps"]], 4),
                     **{f"bpb {language}": value for language, value in by_language.items()}})
        report["systems"][name] = {k: v for k, v in run.items() if k not in ("checkpoints", "tokens")} | {
            "bpb_by_step": scores, "real_tokens": real}
    ratio = rows[1]["real tokens/s"] / rows[0]["real tokens/s"]
    text = "\n".join([
        f"MateConv vs MiniMind on {args.device}: {args.train_docs} training documents, {len(heldout_texts)} held-out "
        f"({sum(len(t.encode()) for t in heldout_texts)} bytes); dim {args.dim}, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch} (MateConv {args.mateconv_batch}), lr {args.lr}; MateConv's rows: {args.mateconv_rows}, "
        f"{ours['corpus_tokens']} tokens "
        f"written in {ours['tokenize_s']:.1f} s ({sum(ours['tokens']) / ours['corpus_tokens']:.2f} epochs trained).",
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, OMP threads {args.threads or 'default'}, "
        f"{'both trainers at once' if args.concurrent else 'one trainer after the other'}; load average "
        f"(1/5/15 min): {'; '.join(f'{k}: {v}' for k, v in loads.items())}.", "",
        "Equal steps:" if args.mateconv_batch == args.batch else
        f"Final models (the same positions: MiniMind {minimind['steps']} steps of {args.batch} rows, MateConv "
        f"{ours['steps']} of {args.mateconv_batch}):", "", table(rows), "",
        f"MateConv / MiniMind real tokens/s: {ratio:.2f}x", "",
        "Equal training time (each system's newest checkpoint within the faster run's training time):", "",
        table(timed_rows), "",
        f"Every checkpoint {plot_curves(curves, work / 'bpb_curve.png')}:", "",
        table([point for points in curves.values() for point in points]),
        ""])
    write_atomic(work / "report.md", text)
    write_atomic(work / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
