"""`evaluate`: every model evaluated, win rates judged, summaries written; an interruption keeps finished work."""
from __future__ import annotations

import json
import math
from pathlib import Path

from mateconv.chat import ChatError, resolve_device
from mateconv.config import is_training_checkpoint
from mateconv.data.readers import path_list
from mateconv.evaluate.data import EvalError, read_prompts, read_tasks, read_texts, val_records
from mateconv.evaluate.kept import PARTS, file_stats, inputs_key, judged_win_rate, keep_report, kept_report
from mateconv.evaluate.models import (ModelReport, comparisons_for, evaluate_model, file_label, model_labels,
                                      ships_own_code)
from mateconv.evaluate.report import plot_summary, win_rate_line, write_summary
from mateconv.files import OutputDirError, writable_dir
from mateconv.lm_eval_tasks import unknown_tasks
from mateconv.prefs.endpoints import Endpoint, PrefsError
from mateconv.winrate import check_endpoint


DEFAULT_VAL = "out/tokens/pretrain/val"
DEFAULT_TASKS = "out/data/tasks_val.jsonl"
SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "请用一句话介绍你自己。",
    "What is 12 + 7?",
]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the evaluation; its message says what was kept."""


def is_model(path: str | Path) -> bool:
    """Whether `path` holds something to evaluate: a save_pretrained directory or a training checkpoint."""
    return (Path(path) / "config.json").is_file() or is_training_checkpoint(path)


def evaluate(models: str | Path | list[str | Path], out_dir: str | Path, val: str | Path | None = DEFAULT_VAL,
             tasks: str | Path | None = DEFAULT_TASKS, prompts: list[str] | None = None, seq_len: int | None = None,
             batch_size: int = 8, max_batches: int | None = 50, max_tasks: int | None = 200,
             max_new_tokens: int = 48, device: str = "auto", lm_eval_tasks: list[str] | None = None,
             bpb_texts: str | Path | None = None, max_bpb_docs: int | None = 200, heldout: str | Path | None = None,
             n_samples: int = 4, judge: Endpoint | None = None, judge_prompts: int = 50,
             compare: list[str] | None = None, judge_retries: int = 2, judge_concurrency: int = 8,
             seed: int = 0, trust_remote_code: bool = False, bpb_start: str = "auto") -> list[ModelReport]:
    """Evaluates every model and writes the plots and summaries into `out_dir`. Returns the reports.

    Samples answer `prompts`, else the first `n_samples` conversations of `heldout`, else SAMPLE_PROMPTS. With a
    `judge` endpoint and `heldout`, each (model, baseline) of `compare` is judged on `judge_prompts` prompts.

    Each model's results and each judged prompt are kept under `out_dir`/parts as they finish; a rerun with the same
    checkpoints, data files and settings reuses them. However the run ends (Ctrl-C included), the summaries hold the
    models finished so far."""
    if not models:
        raise EvalError("no models to evaluate")
    if seq_len is not None and seq_len < 2:  # a row needs a token to predict from and one to score
        raise EvalError(f"--seq_len must be at least 2, got {seq_len}")
    counts = [("--batch_size", batch_size, 1, ""), ("--max_new_tokens", max_new_tokens, 1, ""),
              ("--n_samples", n_samples, 0, ""), ("--judge_prompts", judge_prompts, 1, ""),
              ("--judge_retries", judge_retries, 0, ""), ("--judge_concurrency", judge_concurrency, 1, ""),
              *((flag, limit, 1, " (0 = all)") for flag, limit in
                (("--max_batches", max_batches), ("--max_tasks", max_tasks), ("--max_bpb_docs", max_bpb_docs))
                if limit is not None)]
    for flag, value, least, note in counts:
        if value < least:  # a negative limit would silently drop the last items ([:-1])
            raise EvalError(f"{flag} must be at least {least}{note}, got {value}")
    paths = [Path(m) for m in path_list(models)]  # one path as a str (a notebook's MODELS) is one model
    for path in paths:
        if not is_model(path):
            raise EvalError(f"no model at {path} (expected a save_pretrained directory or a training checkpoint)")
        # a training checkpoint is loaded as its consolidated model (mateconv.train.models.model_dir)
        if not is_training_checkpoint(path) and not trust_remote_code and ships_own_code(path):
            raise EvalError(f"{path} ships its own model code (auto_map in config.json); pass --trust_remote_code "
                            "to run it")
    resolve_device(device)  # a device that is not there fails every model the same way: said once, here
    unknown = unknown_tasks(lm_eval_tasks) if lm_eval_tasks else []
    if unknown:
        raise EvalError(f"--lm_eval_tasks: lm-eval has no task {', '.join(unknown)} ('lm-eval ls tasks' lists them)")
    val_path = Path(val) if val else None
    if val_path is not None and not val_path.exists():
        raise EvalError(f"validation data not found: {val_path}")
    if val_path is not None and val_path.is_file():
        val_records(val_path)  # a broken or empty file stops the run before any model is loaded
    task_records = read_tasks(Path(tasks), max_tasks) if tasks else None
    texts = read_texts(Path(bpb_texts), max_bpb_docs) if bpb_texts else None
    held_out = read_prompts(Path(heldout)) if heldout else None
    if prompts is not None:
        samples = [[{"role": "user", "content": p}] for p in prompts]
    else:
        samples = held_out[:n_samples] if held_out else [[{"role": "user", "content": p}] for p in SAMPLE_PROMPTS]
    if compare and judge is None:
        raise EvalError("--compare needs a judge endpoint: --judge_base_url URL or $OPENAI_BASE_URL")
    labels = model_labels(paths)
    comparisons = comparisons_for(labels, compare) if judge else []
    if comparisons and not held_out:
        raise EvalError("win rates need held-out prompts: pass --heldout (stage 2's sft_val.jsonl)")
    if comparisons:
        try:
            check_endpoint(judge)
        except PrefsError as error:
            raise EvalError(str(error)) from None
        print(f"[evaluate] win rates of {', '.join(f'{m} vs {b}' for m, b in comparisons)} on "
              f"{min(judge_prompts, len(held_out))} held-out prompts, {judge.describe()}", flush=True)
    judged = held_out[:judge_prompts] if comparisons else None
    try:
        out = writable_dir(out_dir, "--out_dir")
        parts = writable_dir(out / PARTS, "--out_dir")
    except OutputDirError as error:
        raise EvalError(str(error)) from None
    # what a model's results depend on besides its checkpoint: a change to any recomputes them
    inputs = [[file_stats(Path(data) if data else None) for data in (val_path, tasks, bpb_texts, heldout)],
              samples, seq_len, batch_size, max_batches, max_tasks, max_new_tokens, device, lm_eval_tasks,
              max_bpb_docs, bpb_start, len(judged or []), trust_remote_code]
    reports, finished_rates = [], 0
    try:
        for path, label in zip(paths, labels):
            kept_at, key = parts / f"model_{file_label(label)}.json", inputs_key(file_stats(path), inputs)
            report = kept_report(kept_at, key)
            if report:
                print(f"[evaluate] {path}: reused the results an earlier run kept for the same checkpoint, data and "
                      f"settings ({kept_at})", flush=True)
            else:
                print(f"[evaluate] {path}", flush=True)
                try:
                    report = evaluate_model(path, label, val_path, task_records, samples, seq_len, batch_size,
                                            max_batches, max_new_tokens, device, lm_eval_tasks,
                                            Path(tasks) if tasks else None, max_tasks, texts, judged,
                                            trust_remote_code, bpb_start)
                    keep_report(kept_at, key, report)
                except (EvalError, ChatError) as error:  # this model's own problem: the others are still evaluated
                    report = ModelReport(label, str(path), "failed", math.nan, error=str(error))
            reports.append(report)
            print(f"[evaluate] {json.dumps(report.row())}", flush=True)
        failed = {report.label for report in reports if report.error}
        for model, baseline in comparisons:
            if {model, baseline} & failed:
                print(f"[evaluate] no win rate of {model} vs {baseline}: "
                      f"{' and '.join(sorted({model, baseline} & failed))} failed", flush=True)
        comparisons = [pair for pair in comparisons if not set(pair) & failed]
        by_label = {report.label: report for report in reports}
        replies = {report.label: report.judge_replies for report in reports}
        for pair in comparisons:
            result = judged_win_rate(judge, pair, judged, replies, parts, seed, judge_retries, judge_concurrency)
            by_label[result.model].win_rates.append(result)
            finished_rates += 1
            print(win_rate_line(result), flush=True)
    except KeyboardInterrupt:
        rates = f" and {finished_rates} of {len(comparisons)} win rates" if comparisons else ""
        summaries = f", summarized in {out}" if reports else ""
        raise Interrupted(f"interrupted: {len(reports)} of {len(paths)} models{rates} finished{summaries}; {parts} "
                          "keeps every finished model and judged prompt, and the same command goes on from them"
                          ) from None
    finally:  # what is done is summarized, however the run ends
        if reports:
            plot_summary(reports, out)
            write_summary(reports, out, labels[len(reports):])
    return reports
