"""`python -m mateconv.evaluate` and the seed's `pretrain_sft_lora.py --mode test`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mateconv.chat import ChatError, SEED_MODEL_MODES, add_seed_shape_flags, check_seed_shape
from mateconv.config import under_root
from mateconv.data.shards import shard_info
from mateconv.evaluate.data import EvalError
from mateconv.evaluate.models import BPB_STARTS
from mateconv.evaluate.run import DEFAULT_TASKS, DEFAULT_VAL, Interrupted, evaluate
from mateconv.flags import ArgumentParser
from mateconv.memory import out_of_memory_figures
from mateconv.prefs.endpoints import Endpoint, PrefsError, resolve_judge
from mateconv.terminal import bars_only_on_a_terminal, exit_interrupted, signals_interrupt


DEFAULT_BPB_TEXTS = "out/data/pretrain_val.jsonl"
DEFAULT_HELDOUT = "out/data/sft_val.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mateconv.evaluate",
                            description="Evaluate saved checkpoints: perplexity, task accuracy, samples, "
                                        "MoE expert load. Writes plots and summaries to --out_dir.")
    parser.add_argument("--models", nargs="+", required=True, help="save_pretrained directories, e.g. out/sft/final")
    parser.add_argument("--out_dir", default="out/eval")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the model code a checkpoint ships (auto_map for a model type transformers lacks, "
                             "e.g. MiniMind's converted models)")
    data = parser.add_argument_group("data")
    data.add_argument("--val", default=None,
                      help=f"token shard dir or file of texts or conversations (.jsonl, .json, .txt, ...) for "
                           f"perplexity (default {DEFAULT_VAL} if it exists; 'none' skips; a model whose tokenizer is "
                           "not the shards' gets none)")
    data.add_argument("--tasks", default=None,
                      help=f"verifiable tasks .jsonl (default {DEFAULT_TASKS} if it exists; 'none' skips)")
    data.add_argument("--bpb_texts", default=None,
                      help=f"held-out documents for bits per byte, any file stage 2 reads, each record's text as "
                           f"pretraining takes it (default {DEFAULT_BPB_TEXTS} if it exists; 'none' skips)")
    data.add_argument("--heldout", default=None,
                      help=f"held-out conversations (any SFT shape and file stage 2 reads) whose prompts are sampled "
                           f"and judged (default {DEFAULT_HELDOUT} if it exists; 'none' skips)")
    data.add_argument("--prompts", nargs="*", default=None,
                      help="sample prompts (default: the first --n_samples held-out prompts, else a built-in few)")
    data.add_argument("--n_samples", type=int, default=4)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--seq_len", type=int, default=None, help="sequence length for perplexity (default: model's)")
    limits.add_argument("--batch_size", type=int, default=8)
    limits.add_argument("--max_batches", type=int, default=50, help="0 = all")
    limits.add_argument("--max_tasks", type=int, default=200, help="0 = all")
    limits.add_argument("--max_new_tokens", type=int, default=48)
    limits.add_argument("--max_bpb_docs", type=int, default=200, help="0 = all")
    limits.add_argument("--bpb_start", choices=BPB_STARTS, default="auto",
                        help="the token each bits-per-byte document follows: auto = how the model was pretrained "
                             "(bos for MiniMind's models, which put BOS first; eos for MateConv's, which pack each "
                             "document after the previous one's EOS)")
    judge = parser.add_argument_group("win rates (a model judge at an OpenAI-compatible endpoint)")
    judge.add_argument("--judge_base_url", default=None,
                       help="URL, 'openai' or 'none' (default: $OPENAI_BASE_URL, else OpenAI when --judge_model or "
                            "$OPENAI_API_KEY is given, else no win rates)")
    judge.add_argument("--judge_model", default=None, help="default: gpt-4o-mini")
    judge.add_argument("--judge_prompts", type=int, default=50, help="held-out prompts judged per comparison")
    judge.add_argument("--compare", nargs="*", default=None, metavar="MODEL:BASELINE",
                       help="model labels or stages (default: sft:pretrain dpo:sft, those present)")
    judge.add_argument("--judge_retries", type=int, default=2, help="retries of a failed judge request")
    judge.add_argument("--judge_concurrency", type=int, default=8, help="judge requests in flight")
    judge.add_argument("--seed", type=int, default=0, help="the order in which each pair is shown")
    parser.add_argument("--lm_eval_tasks", nargs="*", default=None,
                        help="lm-evaluation-harness tasks to run on every model: ours (mateconv_tasks_gen, "
                             "mateconv_tasks_mc, on --tasks) or any lm-eval task name; results join the summaries")
    return parser


def is_empty_shards(path: Path) -> bool:
    """Finished token shards without a record: the validation split of a corpus too small to put a document there."""
    return (path / "index.json").is_file() and shard_info(path)["num_records"] == 0


def optional_path(value: str | None, default: str) -> str | None:
    """An explicit path must exist and hold data (checked later); the default is used only when present and not
    empty; 'none' disables."""
    if value is None:
        path = Path(default)
        if path.is_dir() and not is_empty_shards(path) or path.is_file() and path.stat().st_size:
            return default
        print(f"[evaluate] {default} not found or empty; skipping it", flush=True)
        return None
    return None if value.lower() == "none" else value


def judge_endpoint(base_url: str | None, model: str | None) -> Endpoint | None:
    """The judge from the flags and the environment (as stage 7 finds it), None for no win rates."""
    if base_url == "none":
        return None
    if base_url == "generator":
        raise EvalError("--judge_base_url generator: stage 6 has no generator endpoint; give the judge's URL")
    try:
        return resolve_judge(base_url, model, os.environ, generator=None)
    except PrefsError as error:
        raise EvalError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    bars_only_on_a_terminal()
    try:
        with signals_interrupt():  # the run stops with what is finished kept and summarized
            reports = evaluate(
                args.models, args.out_dir, optional_path(args.val, DEFAULT_VAL),
                optional_path(args.tasks, DEFAULT_TASKS), args.prompts, args.seq_len, args.batch_size,
                args.max_batches or None, args.max_tasks or None, args.max_new_tokens, args.device,
                args.lm_eval_tasks, optional_path(args.bpb_texts, DEFAULT_BPB_TEXTS), args.max_bpb_docs or None,
                optional_path(args.heldout, DEFAULT_HELDOUT), args.n_samples,
                judge_endpoint(args.judge_base_url, args.judge_model), args.judge_prompts, args.compare,
                args.judge_retries, args.judge_concurrency, args.seed, args.trust_remote_code, args.bpb_start)
    except (EvalError, ChatError) as error:
        raise SystemExit(f"evaluate: {error}") from None
    except Interrupted as interrupted:
        exit_interrupted(f"evaluate: {interrupted}")
    except KeyboardInterrupt:
        exit_interrupted("evaluate: interrupted before any model was evaluated")
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"evaluate: out of GPU memory ({out_of_memory_figures(error)}) at --batch_size "
                         f"{args.batch_size}: lower it, or use --device cpu; the models are not changed") from None
    print(f"[evaluate] wrote {args.out_dir}/summary.md, summary.csv, summary.json and plots", flush=True)
    failed = [f"{report.label}: {report.error}" for report in reports if report.error]
    if failed:
        raise SystemExit(f"evaluate: not evaluated: {'; '.join(failed)} (the summaries hold the other models)")


def seed_test_main(argv: list[str]) -> None:
    """Seed 000's `pretrain_sft_lora.py --mode test [flags]`, the fourth mode of its flags table: this evaluation of
    the final models its runs wrote under --out_dir (pretrain/, sft/, dpo/), into <out_dir>/eval, on the held-out data
    under it. --batch_size, --device and --max_seq_len (the perplexity length) carry over; --dim, --n_layers and
    --use_moe must be each model's; training flags are named as unused."""
    parser = ArgumentParser(prog="pretrain_sft_lora.py --mode test", description=seed_test_main.__doc__)
    parser.add_argument("--mode", choices=["test"], default="test")
    parser.add_argument("--out_dir", default="out", help="the layout root holding pretrain/, sft/ and dpo/")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max_seq_len", type=int, default=None)
    add_seed_shape_flags(parser)
    args, unused = parser.parse_known_args(argv)
    root = Path(args.out_dir)
    models = [root / stage / "final" for stage in SEED_MODEL_MODES.values()
              if (root / stage / "final" / "config.json").is_file()]
    if not models:
        raise SystemExit(f"pretrain_sft_lora: --mode test found no trained model under {root} (pretrain/final, "
                         "sft/final or dpo/final); train one first, or name the layout root with --out_dir")
    for model in models:
        check_seed_shape(model, args, "pretrain_sft_lora")
    if unused:
        print(f"[evaluate] --mode test does not use {' '.join(t for t in unused if t.startswith('-'))}", flush=True)
    # the held-out data under the layout root, each skipped (as main skips its defaults) when missing or empty
    data = [(flag, optional_path(None, under_root(default, root)) or "none") for flag, default in
            (("--val", DEFAULT_VAL), ("--tasks", DEFAULT_TASKS), ("--bpb_texts", DEFAULT_BPB_TEXTS),
             ("--heldout", DEFAULT_HELDOUT))]
    length = ["--seq_len", str(args.max_seq_len)] if args.max_seq_len else []
    main(["--models", *map(str, models), "--out_dir", str(root / "eval"), "--batch_size", str(args.batch_size),
          "--device", args.device, *length, *(part for flag, path in data for part in (flag, path))])
