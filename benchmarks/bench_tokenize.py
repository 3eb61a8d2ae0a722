"""Stage 3 tokenization throughput and peak memory: one process vs all cores, on the same >= 200 MB corpus.

    .venv/bin/python benchmarks/bench_tokenize.py --size_mb 200

The corpus repeats the shared pretraining texts (English + Chinese) as jsonl into a temp dir. Each run is the real
CLI (`3.dataset.py --kind pretrain`) in its own process. Peak memory of the process tree (main + workers), sampled
every 0.2 s: the sum of PSS (shared pages split between the processes sharing them: the real footprint) and the sum
of RSS (counts pages shared after fork once per process: an upper bound).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MATECONV_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOURCES = [SHARED / "karpathy__char-rnn/data/tinyshakespeare/input.txt",
           SHARED / "hiyouga__LLaMA-Factory/data/wiki_demo.txt",
           SHARED / "hiyouga__LLaMA-Factory/data/c4_demo.jsonl",
           SHARED / "chinese-poetry__chinese-poetry/宋词",
           SHARED / "hiyouga__LLaMA-Factory/data/alpaca_zh_demo.json"]


def make_corpus(path: Path, size_mb: int) -> int:
    from mateconv.tokenizer import corpus_texts

    present = [p for p in SOURCES if p.exists()]
    if present:
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus_texts(present)]
    else:  # no shared data: the embedded generator's prose
        import random

        from mateconv.data.embedded import all_tasks, pretrain_docs

        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n"
                 for t in pretrain_docs(all_tasks(), 20_000_000, random.Random(0))]
    block = "".join(lines).encode("utf-8")
    target = size_mb * 1_000_000
    with open(path, "wb") as f:
        written = 0
        while written < target:
            f.write(block)
            written += len(block)
    return written


def run(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak PSS and peak RSS (bytes) of the process tree."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak_pss, peak_rss = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        try:
            memory = [p.memory_full_info() for p in [root] + root.children(recursive=True)]
            peak_pss = max(peak_pss, sum(m.pss for m in memory))
            peak_rss = max(peak_rss, sum(m.rss for m in memory))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"run failed: {' '.join(command)}\n{output}")
    return time.perf_counter() - start, peak_pss, peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=int, default=200)
    parser.add_argument("--tokenizer", default="out/tokenizer", help="trained here (vocab 6400) when missing")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = ROOT / args.tokenizer
        if not (tokenizer / "tokenizer.json").is_file():
            from mateconv.tokenizer import train_tokenizer

            present = [p for p in SOURCES if p.exists()]
            tokenizer = train_tokenizer(present, tmp / "tokenizer", 6400, max_chars=5_000_000) if present else None
            if tokenizer is None:
                raise SystemExit("no tokenizer: run stage 1 first or provide the shared data")
        corpus = tmp / "corpus.jsonl"
        nbytes = make_corpus(corpus, args.size_mb)
        print(f"corpus {nbytes / 1e6:.0f} MB, tokenizer {tokenizer}, {os.cpu_count()} cores")
        results = {}
        for workers in (1, args.workers):
            out = tmp / f"tokens_w{workers}"
            seconds, pss, rss = run([sys.executable, "3.dataset.py", "--kind", "pretrain", "--input", str(corpus),
                                 "--tokenizer", str(tokenizer), "--out_dir", str(out), "--workers", str(workers),
                                 "--no_progress"])
            index = json.loads((out / "index.json").read_text())
            tokens = sum(s["num_tokens"] for s in index["shards"])
            results[workers] = (seconds, pss, tokens)
            print(f"workers={workers}: {seconds:.1f} s, {nbytes / 1e6 / seconds:.2f} MB/s, "
                  f"{tokens / seconds / 1e6:.2f} M tokens/s, peak PSS {pss / 2**20:.0f} MiB "
                  f"(RSS sum {rss / 2**20:.0f} MiB), {tokens:,} tokens")
        (t1, _, n1), (tn, _, nn) = results[1], results[args.workers]
        if n1 != nn:
            raise SystemExit(f"token counts differ: {n1} vs {nn}")
        print(f"speed-up {args.workers} workers vs 1: {t1 / tn:.2f}x; "
              f"max peak PSS {max(r[1] for r in results.values()) / 2**20:.0f} MiB (limit 2048)")


if __name__ == "__main__":
    main()
