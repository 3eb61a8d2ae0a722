"""The end-to-end run: embedded data -> tokenizer -> prepared data -> tokens -> pretrain -> SFT -> preference pairs ->
DPO tokens -> DPO -> evaluation, each stage a separate program reading the previous one's artifacts from `out/`.

A preset (configs/pipeline/<name>.yaml) gives each stage its arguments. A stage whose artifact exists is skipped;
a training stage that was stopped resumes from its last checkpoint when run again. Usage:

    python -m mateconv.pipeline [--preset tiny] [--only pretrain,sft] [--set pretrain.max_steps=50 ...]
    python -m mateconv.pipeline status
    python -m mateconv.pipeline stop pretrain
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mateconv.files import read_metrics, write_atomic
from mateconv.flags import render_flags
from mateconv.procs import StageRunner, is_alive, read_pid, stop

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configs" / "pipeline"


class PipelineError(RuntimeError):
    """A preset or stage that cannot run; the message says which and why."""


@dataclass
class Stage:
    name: str
    command: list[str]
    done: Path  # the artifact whose presence means the stage is complete


def load_preset(name_or_path: str) -> dict:
    is_file = name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path) if is_file else PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise PipelineError(f"unknown preset {name_or_path!r} (known: {known})")
    preset = yaml.safe_load(path.read_text()) or {}
    base = preset.pop("extends", None)
    if base is None:
        return preset
    return merge(load_preset(base), preset)


def merge(base: dict, override: dict) -> dict:
    """Nested dicts merge key by key (a preset overrides single stage flags); anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def apply_sets(preset: dict, sets: list[str]) -> None:
    """`stage.key=value` overrides; values are parsed as YAML scalars."""
    for item in sets:
        key, sep, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not sep or not dot or not flag:
            raise PipelineError(f"--set expects stage.key=value, got {item!r}")
        if stage not in preset.get("stages", {}):
            raise PipelineError(f"--set names unknown stage {stage!r} (stages: {', '.join(preset['stages'])})")
        preset["stages"][stage].setdefault("args", {})[flag] = yaml.safe_load(value)


def launcher(preset: dict, script: str) -> list[str]:
    """Training stages run under the DeepSpeed launcher when the preset asks for GPUs, else as one process."""
    gpus = int(preset.get("num_gpus", 0))
    if gpus > 0:
        return [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={gpus}", str(REPO / script)]
    return [sys.executable, str(REPO / script)]


def build_stages(preset: dict, out: Path) -> list[Stage]:
    python = sys.executable
    stages = []  # `done` paths in a preset are relative to the working directory, like every other path
    for name, spec in preset["stages"].items():
        args = render_flags(spec.get("args", {}))
        if "script" in spec:
            command = (launcher(preset, spec["script"]) if spec.get("distributed") else
                       [python, str(REPO / spec["script"])])
        else:
            command = [python, "-m", spec["module"]]
        config = [str(REPO / spec["config"])] if "config" in spec else []
        stages.append(Stage(name, command + config + args, out.parent / spec["done"]))
    return stages


def run(preset: dict, only: set[str] | None, logs: Path, out: Path) -> int:
    runner = StageRunner(logs)
    timings: dict[str, float] = {}
    for stage in build_stages(preset, out):
        if only and stage.name not in only:
            continue
        if stage.done.exists():
            print(f"[pipeline] {stage.name}: done ({stage.done.relative_to(out.parent)} exists), skipped", flush=True)
            continue
        started = time.monotonic()
        code = runner.run(stage.name, stage.command)
        timings[stage.name] = round(time.monotonic() - started, 1)
        if code != 0:
            print(f"[pipeline] {stage.name} failed with exit code {code}; see {logs / (stage.name + '.log')}")
            return code
        if not stage.done.exists():
            print(f"[pipeline] {stage.name} stopped before it finished; run the pipeline again to resume it")
            return 0
        print(f"[pipeline] {stage.name}: finished in {timings[stage.name]} s", flush=True)
        if runner.interrupted:
            print("[pipeline] interrupted; run the pipeline again to continue")
            return 0
    summary = out / "pipeline_timings.json"
    previous = json.loads(summary.read_text()) if summary.exists() else {}
    write_atomic(summary, json.dumps({**previous, **timings}, indent=2) + "\n")
    print(f"[pipeline] complete; stage timings in {summary}")
    return 0


def status(logs: Path, out: Path) -> None:
    """One line per stage that has a log: running or not, its latest logged step and loss, and the progress bar's
    last state (step/total, elapsed<ETA, rate)."""
    for log in sorted(logs.glob("*.log")):
        name = log.stem
        pid = read_pid(logs, name)
        line = f"{name:12s} {'running (pid %d)' % pid if pid and is_alive(pid) else 'not running'}"
        metrics = out / name / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.exists() else []
        last = next((row for row in reversed(rows) if "loss" in row and "step" in row), None)
        if last:
            line += f"  step={last['step']} loss={last['loss']:.4f}"
        progress = last_progress(log)
        if progress:
            line += f"  [{progress}]"
        print(line)


def last_progress(log: Path, tail_bytes: int = 4096) -> str | None:
    """The last tqdm state in a stage log, e.g. '144/200 [02:53<00:43, 1.30step/s, loss=0.62]'."""
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - tail_bytes))
        text = handle.read().decode("utf-8", "replace")
    for piece in reversed(re.split(r"[\r\n]", text)):
        if "|" in piece and "<" in piece and "step" in piece:  # the training bar, not a file-writing one
            return piece.rsplit("|", 1)[-1].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "status", "stop"))
    parser.add_argument("stage", nargs="?", help="with `stop`: the stage to stop")
    parser.add_argument("--preset", default=os.environ.get("MATECONV_PRESET", "tiny"))
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", dest="sets")
    parser.add_argument("--logs", default="logs")
    parser.add_argument("--timeout", type=float, default=300, help="with `stop`: seconds to wait for the checkpoint")
    args = parser.parse_args(argv)
    # Stage paths in the presets are relative to the working directory, whose out/ holds every artifact.
    logs, out = Path(args.logs).resolve(), Path("out").resolve()
    try:
        if args.command == "status":
            status(logs, out)
            return 0
        if args.command == "stop":
            if not args.stage:
                raise PipelineError("stop needs a stage name, e.g. `stop pretrain`")
            print(stop(logs, args.stage, args.timeout))
            return 0
        preset = load_preset(args.preset)
        apply_sets(preset, args.sets)
        only = {s for s in args.only.split(",") if s} or None
        unknown = (only or set()) - set(preset["stages"])
        if unknown:
            raise PipelineError(f"--only names unknown stages: {', '.join(sorted(unknown))}")
        return run(preset, only, logs, out)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
