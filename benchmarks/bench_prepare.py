"""Stage 2 (`python -m mateconv.data.prepare`) wall time, MB/s and peak memory on MiniMind-shaped corpora.

    .venv/bin/python benchmarks/bench_prepare.py --size_mb 20 100 --kind pretrain sft

The corpus is built in a temp dir from the shared data sets ($MATECONV_SHARED_DATA, default ../shared/data): the
shape of MiniMind's pretrain_hq.jsonl (`{"text"}`, documents of ~0.3-1.5 KB) and sft_mini_512.jsonl
(`{"conversations": [{"role", "content"}]}`). Every document is a seeded random draw of paragraphs from the shared
texts, so documents differ enough that dedup keeps them; 2% are exact copies of an earlier one and 2% an earlier one
with a few characters changed (near duplicates). Each run is the real CLI in its own process. CPU seconds, of all its
processes and of the main one alone, do not depend on other work on the machine as the wall time does. Peak memory: the
PSS of its process tree (pages shared between the main process and its forked workers counted once), and the
RSS summed over it (an upper bound), sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MATECONV_SHARED_DATA", ROOT.parent / "shared" / "data"))
TEXT_SOURCES = ["karpathy__char-rnn/data/tinyshakespeare/input.txt", "hiyouga__LLaMA-Factory/data/wiki_demo.txt",
                "hiyouga__LLaMA-Factory/data/c4_demo.jsonl", "chinese-poetry__chinese-poetry/宋词",
                "hiyouga__LLaMA-Factory/data/alpaca_zh_demo.json", "hiyouga__LLaMA-Factory/data/alpaca_en_demo.json"]
CHAT_SOURCES = ["hiyouga__LLaMA-Factory/data/alpaca_zh_demo.json", "hiyouga__LLaMA-Factory/data/alpaca_en_demo.json"]


def paragraphs(paths: list[Path]) -> list[str]:
    """The shared texts cut into paragraphs of 40-400 characters."""
    from mateconv.tokenizer import corpus_texts

    pieces = []
    for text in corpus_texts(paths):
        for part in text.split("\n"):
            part = part.strip()
            while len(part) >= 40:
                pieces.append(part[:400])
                part = part[400:]
    return pieces


def documents(pool: list[str], rng: random.Random, min_chars: int, max_chars: int):
    """Endless documents of random paragraphs, with 2% exact and 2% near duplicates of earlier ones."""
    recent: list[str] = []
    while True:
        roll = rng.random()
        if recent and roll < 0.02:
            yield rng.choice(recent)
            continue
        if recent and roll < 0.04:
            doc = rng.choice(recent)
            at = rng.randrange(len(doc))
            yield doc[:at] + "~" + doc[at + 1:]
            continue
        target, doc = rng.randint(min_chars, max_chars), []
        while sum(map(len, doc)) < target:
            doc.append(rng.choice(pool))
        doc = "\n".join(doc)
        recent = (recent + [doc])[-1000:]
        yield doc


def check_shared_data() -> None:
    missing = [p for p in TEXT_SOURCES + CHAT_SOURCES if not (SHARED / p).exists()]
    if missing:
        raise SystemExit(f"shared data not found: {SHARED / missing[0]} (set MATECONV_SHARED_DATA to the directory "
                         "that holds the shared data sets, ../shared/data beside the repository by default)")


def write_corpus(path: Path, kind: str, size_mb: float, seed: int = 0) -> int:
    check_shared_data()
    rng = random.Random(seed)
    pool = paragraphs([SHARED / p for p in TEXT_SOURCES])
    if kind == "pretrain":
        lines = (json.dumps({"text": doc}, ensure_ascii=False) for doc in documents(pool, rng, 300, 1500))
    else:
        questions = paragraphs([SHARED / p for p in CHAT_SOURCES])
        answers = documents(pool, rng, 100, 900)
        lines = (json.dumps({"conversations": [{"role": "user", "content": rng.choice(questions)},
                                               {"role": "assistant", "content": next(answers)}]}, ensure_ascii=False)
                 for _ in iter(int, 1))
    target, written = size_mb * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            written += f.write(line + "\n")  # characters, about the bytes for this mix
            if written >= target:
                break
    return path.stat().st_size


def run(command: list[str]) -> dict[str, float]:
    """Wall seconds; CPU seconds of the process tree and of its main process (the part no worker can take: on a
    machine with N free cores the run takes about max(main, tree / N)); peak PSS and RSS sum (bytes) of the tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak_pss, peak_rss, main_cpu = psutil.Process(process.pid), 0, 0, 0.0
    while process.poll() is None:
        try:
            memory = [p.memory_full_info() for p in [root] + root.children(recursive=True)]
            peak_pss = max(peak_pss, sum(m.pss for m in memory))
            peak_rss = max(peak_rss, sum(m.rss for m in memory))
            main_cpu = sum(root.cpu_times()[:2])
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"run failed: {' '.join(command)}\n{output}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the main process and the workers it waited for
    tree_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall": wall, "tree_cpu": tree_cpu, "main_cpu": main_cpu, "pss": peak_pss, "rss": peak_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=float, nargs="+", default=[20, 100])
    parser.add_argument("--kind", nargs="+", default=["pretrain", "sft"], choices=["pretrain", "sft"])
    parser.add_argument("--extra", default="", help="more flags for the prepare command, e.g. '--workers 1'")
    args = parser.parse_args()
    check_shared_data()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| kind | corpus MB | records | wall (s) | MB/s | CPU s, all processes | CPU s, main process | "
          "peak PSS (MiB) | peak RSS sum (MiB) | kept | near_dup | exact_dup |")
    print("| --- " * 12 + "|")
    for kind in args.kind:
        for size in args.size_mb:
            with tempfile.TemporaryDirectory() as tmp:
                corpus = Path(tmp) / f"{kind}.jsonl"
                nbytes = write_corpus(corpus, kind, size)
                out = Path(tmp) / "out"
                m = run([sys.executable, "-m", "mateconv.data.prepare", f"--{kind}", str(corpus), "--out_dir", str(out),
                         "--no_progress", *args.extra.split()])
                stats = json.loads((out / "stats.json").read_text())[kind]
                removed = stats["removed"]
                print(f"| {kind} | {nbytes / 1e6:.0f} | {stats['read']:,} | {m['wall']:.1f} | "
                      f"{nbytes / 1e6 / m['wall']:.2f} | {m['tree_cpu']:.1f} | {m['main_cpu']:.1f} | "
                      f"{m['pss'] / 2**20:.0f} | {m['rss'] / 2**20:.0f} | {stats['kept']:,} | "
                      f"{removed.get('near_dup', 0):,} | {removed.get('exact_dup', 0):,} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
