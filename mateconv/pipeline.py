"""The end-to-end run: embedded data -> tokenizer -> prepared data -> tokens -> pretrain -> SFT -> preference pairs ->
DPO tokens -> DPO -> evaluation, each stage a separate program reading the previous one's artifacts from `out/`.

A preset (configs/pipeline/<name>.yaml) gives each stage its arguments. A stage whose artifact exists is skipped;
a training stage that was stopped resumes from its last checkpoint when run again. With `--data DIR` (or one FILE)
the stages run on the user's files instead of the embedded demo data (`use_data`; docs/own_data.md). With
`--hostfile` the training stages run on every node it names (docs/operations.md, "Multi-node"). Usage:

    python -m mateconv.pipeline [--preset tiny] [--only pretrain,sft] [--set pretrain.max_steps=50 ...]
    python -m mateconv.pipeline run --data DIR [--tokenizer PATH] [--preset mateconv-0.02b]
    python -m mateconv.pipeline run --hostfile FILE --master_addr ADDR [--node_rank N]
    python -m mateconv.pipeline status
    python -m mateconv.pipeline stop pretrain
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from mateconv.data import DataError, read_tokenizer
from mateconv.data.dataset_info import FILE_NAME as INFO
from mateconv.data.sources import DataFile, by_kind, scan
from mateconv.files import load_yaml_mapping, read_metrics, tail_text, write_atomic, yaml_error
from mateconv.flags import ArgumentParser, render_flags, unrecognized
from mateconv.prefs.endpoints import PrefsError, health_problem, resolve_judge
from mateconv.procs import NotStopped, StageRunner, free_port, is_alive, read_pid, stop, writer_of
from mateconv.terminal import duration, run_main

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configs" / "pipeline"
PROMPTS_FRAC = 0.1  # share of the user's SFT conversations held out of SFT as stage 7 prompts (capped at n_prompts)
FOLLOWER_POLL_S = 5.0  # how often a node other than 0 (no ssh) looks for node 0's artifacts
SOURCE = "data_source.json"  # in out/: the --data directory and --tokenizer the artifacts were made from
# The programs that run after a long stage (the tokenizer's training on the whole corpus, or training), and the
# modules whose build_parser() reads their flags (and whose check_flags(parser, args), where there is one, checks what
# parsing cannot); the tokenizer's too, which runs first but whose error would otherwise be in its log only.
LATE_PARSERS = {"mateconv.data.prepare": "mateconv.data.prepare", "7.gen_prefs_openai.py": "mateconv.prefs.cli",
                "3.dataset.py": "mateconv.data.tokenizing", "mateconv.evaluate": "mateconv.evaluate.cli",
                "mateconv.tokenizer": "mateconv.tokenizer"}


class PipelineError(RuntimeError):
    """A preset or stage that cannot run; the message says which and why."""


@dataclass
class Stage:
    name: str
    command: list[str]
    done: Path  # the artifact whose presence means the stage is complete
    distributed: bool = False  # a training stage: under the DeepSpeed launcher when there are GPUs or nodes
    program: str = ""  # the script or module, and its flags (the config YAML first)
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Nodes:
    """The nodes of a multi-node run, for the DeepSpeed launcher: a hostfile (`host slots=N` per line), node 0's
    address and port, and with `node_rank` the launch without ssh, one launcher started by hand on each node."""
    hostfile: Path
    master_addr: str | None = None
    master_port: int = 29500
    node_rank: int | None = None

    def flags(self) -> list[str]:
        flags = ["--hostfile", str(self.hostfile), "--master_port", str(self.master_port)]
        flags += ["--master_addr", self.master_addr] if self.master_addr else []
        return flags + (["--no_ssh", "--node_rank", str(self.node_rank)] if self.node_rank is not None else [])

    @property
    def follower(self) -> bool:
        """A node other than 0 of a launch without ssh: it joins the training stages and waits for node 0's others."""
        return bool(self.node_rank)


def read_hostfile(path: Path) -> list[str]:
    """The hosts of a DeepSpeed hostfile, checked line by line."""
    if not path.is_file():
        raise PipelineError(f"--hostfile {path}: no such file")
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if match is None or int(match[2]) < 1 or match[1] in hosts:
            why = "a host named twice" if match and match[1] in hosts else "expected `HOST slots=N`, N >= 1"
            raise PipelineError(f"{path}:{number}: {why}: {line!r}")
        hosts.append(match[1])
    if not hosts:
        raise PipelineError(f"{path}: no hosts (one `HOST slots=N` line per node)")
    return hosts


def check_nodes(nodes: Nodes) -> None:
    hosts = read_hostfile(nodes.hostfile)
    if nodes.node_rank is not None:
        if not 0 <= nodes.node_rank < len(hosts):
            raise PipelineError(f"--node_rank {nodes.node_rank}: {nodes.hostfile} has {len(hosts)} nodes (0 to "
                                f"{len(hosts) - 1})")
        if not nodes.master_addr:
            raise PipelineError("--node_rank (a launch without ssh) needs --master_addr, the address of node 0")


def load_preset(name_or_path: str) -> dict:
    is_file = name_or_path.endswith((".yaml", ".yml"))
    path = Path(name_or_path) if is_file else PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise PipelineError(f"unknown preset {name_or_path!r} (known: {known})")
    try:
        preset = load_yaml_mapping(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(yaml_error(path, e)) from None
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


def apply_sets(preset: dict, sets: list[str], left_out: Collection[str] = ()) -> None:
    """`stage.key=value` overrides; values are parsed as YAML scalars. Those for a stage that a run on the user's data
    leaves out (`left_out`) change nothing, which is said."""
    for item in sets:
        key, sep, value = item.partition("=")
        stage, dot, flag = key.partition(".")
        if not sep or not dot or not flag:
            raise PipelineError(f"--set expects stage.key=value, got {item!r}")
        if stage in left_out:
            say([f"--set {item} changes nothing: this run on the data leaves stage {stage} out (the lines above say "
                 "why)"])
            continue
        if stage not in preset.get("stages", {}):
            raise PipelineError(f"--set names unknown stage {stage!r} (stages: {', '.join(preset['stages'])})")
        preset["stages"][stage].setdefault("args", {})[flag] = yaml.safe_load(value)


def check_left_out_sets(full: dict, sets: list[str], left_out: Collection[str], out: Path) -> None:
    """A `--set` for a stage that a run on the user's data leaves out changes nothing, but a misspelt key in it is
    still one: each such stage's flags are checked as the stage would check them, in `full`, a copy of the preset as
    it was before the data left stages out (the sets are applied to it)."""
    aimed = [item for item in sets if item.partition(".")[0] in left_out]
    if not aimed:
        return
    apply_sets(full, aimed)
    for stage in build_stages(full, out):
        if any(item.startswith(f"{stage.name}.") for item in aimed):
            check_flags(stage)


def launcher(preset: dict, script: str, nodes: Nodes | None = None) -> list[str]:
    """Training stages run under the DeepSpeed launcher when the preset asks for GPUs (`num_gpus` per node) or there
    are nodes, else as one process."""
    gpus = int(preset.get("num_gpus", 0))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    if nodes is not None:
        return [deepspeed, *nodes.flags(), *([f"--num_gpus={gpus}"] if gpus > 0 else []), str(REPO / script)]
    if gpus > 0:
        # DeepSpeed's --num_gpus takes GPUs 0 to N-1 whatever CUDA_VISIBLE_DEVICES says (GPUs 2,3 of a shared box)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "").split(",")
        if all(device.isdigit() for device in visible):
            return [deepspeed, f"--include=localhost:{','.join(visible[:gpus])}", str(REPO / script)]
        return [deepspeed, f"--num_gpus={gpus}", str(REPO / script)]
    return [sys.executable, str(REPO / script)]


def build_stages(preset: dict, out: Path, nodes: Nodes | None = None) -> list[Stage]:
    python = sys.executable
    stages = []  # `done` paths in a preset are relative to the working directory, like every other path
    for name, spec in preset["stages"].items():
        args = render_flags(spec.get("args", {}))
        if "script" in spec:
            command = (launcher(preset, spec["script"], nodes) if spec.get("distributed") else
                       [python, str(REPO / spec["script"])])
        else:
            command = [python, "-m", spec["module"]]
        flags = ([str(REPO / spec["config"])] if "config" in spec else []) + args
        stages.append(Stage(name, command + flags, out.parent / spec["done"], bool(spec.get("distributed")),
                            spec.get("script", spec.get("module")), tuple(flags)))
    return stages


def flags_problem(stage: Stage) -> str | None:
    """What a stage would say about its flags, found without running it; None if they parse (or it has no parser
    here). A typo in a late stage's `--set` then stops the pipeline before hours of training, not after them.
    The stages' own parsers are imported here only (they import torch)."""
    from mateconv.config import STAGE_PROGRAMS, ConfigError, parse_config

    training = {program: name for name, program in STAGE_PROGRAMS.items()}.get(stage.program)
    if training:
        from mateconv.train.command import STAGE_DEFAULTS

        try:
            parse_config(list(stage.flags), STAGE_DEFAULTS[training], training)
        except ConfigError as error:
            return str(error)
        return None
    if stage.program not in LATE_PARSERS:
        return None
    module = importlib.import_module(LATE_PARSERS[stage.program])
    parser, said = module.build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args, unknown = parser.parse_known_args(list(stage.flags))
            if hasattr(module, "check_flags"):
                module.check_flags(parser, args)
    except SystemExit:
        return said.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
    return unrecognized(parser, unknown) if unknown else None


def check_flags(stage: Stage) -> None:
    problem = flags_problem(stage)
    if problem:
        raise PipelineError(f"{stage.name}: {problem} (nothing was run)")


def check_gpus(preset: dict, stages: list[Stage]) -> None:
    """A preset's `num_gpus` needs that many GPUs here before a training stage is to run: the DeepSpeed launcher starts
    that many ranks whatever it finds, on a machine without a GPU (or whose CUDA is broken) CPU ranks that take days,
    with fewer GPUs ranks that fail only when the training stage starts, after the data stages.
    DS_ACCELERATOR=cpu asks for CPU ranks."""
    gpus = int(preset.get("num_gpus", 0))
    if gpus == 0 or os.environ.get("DS_ACCELERATOR") == "cpu" or \
            not any(stage.distributed and not stage.done.exists() for stage in stages):
        return
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus:
        build = "" if torch.version.cuda else (f" (torch {torch.__version__} is a CPU-only build; TORCH_SPEC="
                                               f"torch=={torch.__version__.split('+')[0]} bash scripts/setup_env.sh "
                                               "installs the CUDA one)")
        raise PipelineError(f"the preset's num_gpus is {gpus} but {visible} CUDA GPU(s) are visible here{build}: "
                            "take a preset for this machine (mateconv-0.02b runs on one GPU), or set "
                            f"DS_ACCELERATOR=cpu to train {gpus} ranks on the CPU (nothing was run)")


def fingerprint(files: list[DataFile]) -> dict[str, list[int]]:
    """Size and modification time of each file the run uses (a dataset_info.json says how to read some): what out/
    was made from, as make and rsync see it."""
    stats = {found.path: found.path.stat() for found in files if found.kind is not None or found.path.name == INFO}
    return {str(path): [stat.st_size, stat.st_mtime_ns] for path, stat in stats.items()}


def say(lines: list[str]) -> None:
    for line in lines:
        print(f"[pipeline] {line}", flush=True)


def use_data(preset: dict, data_dir: Path, tokenizer: Path | None, env: Mapping[str, str],
             outputs: tuple[Path, ...] = ()) -> tuple[list[str], dict[str, list[int]]]:
    """Points the preset's stages at the user's files in data_dir (less the run's `outputs`, where it holds them; a
    data_dir that is one file is that file alone) instead of the embedded demo data, and picks the way to preference
    pairs (stage 7) and DPO. Returns the report (which file became what, and the path taken) and the `fingerprint` of
    the files used."""
    try:
        files = scan(data_dir, outputs)
    except DataError as error:
        raise PipelineError(str(error)) from None
    report = [f"data: {found.line()}" for found in files]
    kinds = by_kind(files)
    if "pretrain" not in kinds:
        say(report)  # what each file was taken for, or why it was skipped
        raise PipelineError(f"{data_dir}: no pretraining text (.txt, .parquet, or jsonl/json records with a 'text' "
                            "field); every run starts with pretraining")
    stages = preset["stages"]
    stages.pop("data", None)  # the embedded demo data generator
    if tokenizer is not None:
        if not tokenizer.exists():
            raise PipelineError(f"--tokenizer {tokenizer}: no such file or directory")
        args = stages["tokenizer"]["args"]
        stages["tokenizer"]["args"] = {"from_pretrained": str(tokenizer), "out_dir": args["out_dir"]}
        try:
            vocab_size = read_tokenizer(tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
                                        ).get_vocab_size()
        except DataError as error:
            raise PipelineError(f"--tokenizer {tokenizer}: {error}") from None
        stages["pretrain"]["args"]["vocab_size"] = vocab_size
        report.append(f"tokenizer: {tokenizer} ({vocab_size} tokens), not trained")
    else:
        stages["tokenizer"]["args"]["corpus"] = [str(f.path) for found in kinds.values() for f in found]
    paths = {kind: [str(f.path) for f in found] for kind, found in kinds.items()}
    prepare = stages["prepare"]["args"]
    prepare.pop("raw_dir")
    prepare.update(paths)
    tokens = stages["tokens"]
    last = [kind for kind in ("pretrain", "sft", "dpo") if kind in kinds][-1]  # 3.dataset.py --all builds it last
    tokens["done"] = f"{tokens['args']['out_root']}/{last}/val/index.json"
    if "sft" not in kinds:
        path, reason = "none", "no SFT conversations in the data: pretraining only, then evaluation" + (
            "; the preference pairs are not used (DPO starts from the SFT model)" if "dpo" in kinds else "")
    else:
        path, reason = preference_path(preset, kinds, prepare["out_dir"], tokens["args"]["out_root"], env)
    report.append(f"stage 7 / DPO: {reason}")
    stage7 = ("prefs", "prefs_val", "prefs_tokens", "prefs_val_tokens")
    dropped = {"none": stage7 + ("dpo",), "pairs": stage7}.get(path, ()) + (() if "sft" in kinds else ("sft",))
    for name in dropped:
        del stages[name]
    evaluate = stages["eval"]["args"]
    evaluate["models"] = [m for m in evaluate["models"] if Path(m).parent.name in stages]
    evaluate.pop("val", None)  # the evaluator's default, skipped when a small corpus left no held-out document
    if "tasks" not in kinds:
        evaluate["tasks"] = "none"
    if "sft" not in kinds:  # no held-out conversations to look for: the samples answer the built-in prompts
        evaluate["heldout"] = "none"
    return report, fingerprint(files)


def same_normalization(preset: dict) -> None:
    """The tokenizer trains on text normalised as stage 2's `--normalization` (set in a preset or by `--set`) makes
    it: the text the model sees."""
    stages = preset["stages"]
    form = stages.get("prepare", {}).get("args", {}).get("normalization")
    if form is not None and "tokenizer" in stages and "from_pretrained" not in stages["tokenizer"].get("args", {}):
        stages["tokenizer"].setdefault("args", {})["normalization"] = form


def as_many_prompts_as_sampled(preset: dict, sets: list[str]) -> None:
    """On the judge path stage 2 holds out at most the SFT prompts stage 7 samples: `prefs.n_prompts` as `--set`
    leaves it (held_out_prompts took the preset's), unless `--set prepare.max_prompts=...` says how many."""
    stages = preset["stages"]
    prepare = stages.get("prepare", {}).get("args", {})
    if "max_prompts" in prepare and "prefs" in stages and not any(s.startswith("prepare.max_prompts=") for s in sets):
        prepare["max_prompts"] = stages["prefs"]["args"]["n_prompts"]


def set_judge_model(preset: dict, name: str) -> None:
    """One judge for stage 7 (train and validation pairs) and the evaluation's win rates."""
    for stage in ("prefs", "prefs_val", "eval"):
        if stage in preset["stages"]:
            preset["stages"][stage].setdefault("args", {})["judge_model"] = name


def judge_warning(preset: dict, env: Mapping[str, str], timeout_s: float = 10.0) -> str | None:
    """A warning where stage 7 has yet to run with a model judge that fails its health check now: stage 7 runs after
    pretraining and SFT, hours later at seed size. Not a stop: the judge's server may be started in the meantime."""
    prefs = preset["stages"].get("prefs")
    if prefs is None or prefs["args"].get("judge") != "model" or Path(prefs["done"]).exists():
        return None
    problem = health_problem(resolve_judge(None, prefs["args"].get("judge_model"), env, None), timeout_s)
    if problem is None:
        return None
    return (f"[pipeline] warning: {problem.rstrip('.')} (stage 7 needs the judge after SFT: have it up by then, or "
            "the run stops there)")


def held_out_prompts(preset: dict, data_out: str) -> str:
    """Stage 7's prompts on the judge path: stage 2 holds a share of the SFT conversations out of SFT for them (only
    on this path: elsewhere nothing would read them). Data prepared earlier without them keeps its SFT set, and stage
    7 takes the SFT training prompts instead."""
    stats = Path(data_out) / "stats.json"
    if stats.is_file() and not json.loads(stats.read_text()).get("sft", {}).get("prompts"):
        return f"{data_out}/sft_train.jsonl"
    preset["stages"]["prepare"]["args"].update(prompts_frac=PROMPTS_FRAC,
                                               max_prompts=preset["stages"]["prefs"]["args"]["n_prompts"])
    return f"{data_out}/sft_prompts.jsonl"


def preference_path(preset: dict, kinds: dict, data_out: str, tokens_out: str,
                    env: Mapping[str, str]) -> tuple[str, str]:
    """("tasks" | "judge" | "pairs" | "none", why) and the stage 7 / DPO arguments for it (docs/own_data.md):
    verifiable tasks keep the rule judge; else a judge endpoint judges replies to held-out SFT prompts; else the
    data's own preference pairs train DPO; else there is no DPO. The data's pairs join any pairs stage 7 makes."""
    stages = preset["stages"]
    try:
        judge = resolve_judge(None, stages["prefs"]["args"].get("judge_model"), env, None)
    except PrefsError as error:
        raise PipelineError(str(error)) from None
    pairs = "dpo" in kinds
    for name, split in (("prefs", "train"), ("prefs_val", "val")):
        stages[name]["args"]["generator_base_url"] = "local"  # on-policy: the SFT model writes the replies
        if pairs:
            tokens = stages[f"{name}_tokens"]["args"]
            tokens["input"] = [tokens["input"], f"{data_out}/dpo_{split}.jsonl"]
    joined = " plus the preference pairs from the data" if pairs else ""
    if "tasks" in kinds:
        return "tasks", ("the data holds verifiable tasks: stage 7 samples the SFT model on them and the rule judge "
                         f"(their known answers) picks the pairs; DPO trains on those{joined}")
    if judge is not None:
        prompts = held_out_prompts(preset, data_out)
        stages["prefs"]["args"].update(prompts_path=prompts, judge="model")
        stages["prefs_val"]["args"].update(prompts_path=f"{data_out}/sft_val.jsonl", judge="model")
        held_out = ("held-out SFT prompts (out of SFT training)" if prompts.endswith("sft_prompts.jsonl") else
                    f"the SFT training prompts ({data_out} was prepared without held-out prompts, when no judge was "
                    "set)")
        return "judge", (f"no verifiable tasks, a judge endpoint is set ({judge.describe()}; from OPENAI_BASE_URL / "
                         f"OPENAI_API_KEY / JUDGE_API_KEY): stage 7 samples the SFT model on {held_out} and the "
                         f"model judge picks the pairs; DPO trains on those{joined}")
    if pairs:
        stages["dpo"]["args"].update(data_path=f"{tokens_out}/dpo/train", val_data_path=f"{tokens_out}/dpo/val")
        return "pairs", ("no verifiable tasks and no judge endpoint (none of OPENAI_BASE_URL, OPENAI_API_KEY, "
                         "JUDGE_API_KEY, --judge_model set): DPO "
                         "trains on the preference pairs from the data; stage 7 skipped")
    return "none", ("no verifiable tasks, no preference pairs in the data and no judge endpoint: DPO skipped, the "
                    "run stops after SFT and evaluation (set OPENAI_BASE_URL/OPENAI_API_KEY to an OpenAI-compatible "
                    "server for a model judge, or add chosen/rejected pairs to the data directory)")


def check_source(out: Path, source: dict | None) -> None:
    """One out/ directory holds the artifacts of one corpus: refuses to mix a run on other data into it, or to go on
    from data prepared (stage 2) before the files changed (a tokenizer trained on them before is kept, with a note),
    and records the --data directory (and --tokenizer) and the `fingerprint` of the files the prepared data is made
    from."""
    path = out / SOURCE
    recorded = json.loads(path.read_text()) if path.exists() else None
    prepared = (out / "data" / "stats.json").exists()
    if recorded is None and source is not None and prepared:
        raise PipelineError(f"{out} holds a run on the embedded demo data: run --data in another directory, or "
                            f"remove {out}")
    flags = ("data", "tokenizer")
    if recorded is not None and (source is None or any(recorded[key] != source[key] for key in flags)):
        made = f"--data {recorded['data']}" + (f" --tokenizer {recorded['tokenizer']}" if recorded["tokenizer"] else "")
        raise PipelineError(f"{out} was made with {made}: run with the same flags, in another directory, or remove "
                            f"{out}")
    if source is None or recorded == source:
        return
    changed = changes(recorded.get("files", source["files"]), source["files"]) if recorded is not None else ""
    trained = source["tokenizer"] is None and (out / "tokenizer" / "tokenizer.json").exists()
    if changed and prepared:
        tokenizer_too = f"; {out / 'tokenizer'} too, to train the tokenizer on them" if trained else ""
        raise PipelineError(f"{source['data']} changed since {out / 'data'} was prepared from it ({changed}): "
                            f"finished stages would not see the change; remove {out} to start over, or "
                            f"{out / 'data'}, {out / 'tokens'} and the outputs of the later stages to redo (the run "
                            f"says which are older than their inputs{tokenizer_too})")
    if changed and trained:  # the tokenizer read the files before they changed: kept, but said
        print(f"[pipeline] note: {source['data']} changed since {out / 'tokenizer'} was trained on it ({changed}): "
              f"the run goes on with that tokenizer; remove {out / 'tokenizer'} to train it on the files as they "
              "are now", flush=True)
    out.mkdir(parents=True, exist_ok=True)  # a new run, or stage 2 has yet to read the files (again)
    write_atomic(path, json.dumps(source, indent=2) + "\n")


def changes(before: dict[str, list[int]], now: dict[str, list[int]]) -> str:
    """The files added, removed and changed between two fingerprints, a few of each named."""
    said = []
    for what, names in (("added", now.keys() - before.keys()), ("removed", before.keys() - now.keys()),
                        ("changed", {name for name in before.keys() & now.keys() if before[name] != now[name]})):
        if names:
            shown = sorted(names)[:3]
            said.append(f"{what}: {', '.join(shown)}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    return "; ".join(said)


def newer_inputs(stage: Stage, every: list[Stage]) -> list[str]:
    """The earlier stages whose done mark is newer than `stage`'s: a finished stage that may have run on their older
    outputs (a retrained model the evaluation has not seen)."""
    earlier = every[:[s.name for s in every].index(stage.name)]
    finished = stage.done.stat().st_mtime
    return [s.name for s in earlier if s.done.exists() and s.done.stat().st_mtime > finished]


def wandb_group(out: Path) -> str:
    """The W&B group of the pipeline's training runs, so that W&B lists its pretrain, SFT and DPO runs together (each
    run's job type is its stage): $WANDB_RUN_GROUP, else a name made on the first run and kept in out/wandb_group, so
    that a later run of the same out/ (a resume) joins it too."""
    if os.environ.get("WANDB_RUN_GROUP"):
        return os.environ["WANDB_RUN_GROUP"]
    path = out / "wandb_group"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}\n")
    return path.read_text().strip()


def run(preset: dict, only: set[str] | None, logs: Path, out: Path, nodes: Nodes | None = None,
        sets: list[str] = (), source: dict | None = None) -> int:
    """Runs the stages not done yet, in order; `sets` are the command line's `--set stage.key=value` items, `source`
    the --data run's (`check_source`). Nothing is written before every stage's flags are checked."""
    every = build_stages(preset, out, nodes)
    stages = [stage for stage in every if not only or stage.name in only]
    set_in = {stage.name: [item for item in sets if item.startswith(f"{stage.name}.")] for stage in every}
    for stage in every:  # a stage --only leaves out too where it has a --set: its typo would otherwise pass unseen
        if set_in[stage.name] or (stage in stages and not stage.done.exists()):
            check_flags(stage)
    if nodes is None:  # a hostfile's nodes have their own GPUs
        check_gpus(preset, stages)
    check_source(out, source)
    if (not only or "prefs" in only) and (nodes is None or not nodes.follower):
        warning = judge_warning(preset, os.environ)
        if warning:
            print(warning, flush=True)
    runner = StageRunner(logs)
    env = {"WANDB_RUN_GROUP": wandb_group(out)}
    timings: dict[str, float] = {}
    for stage in stages:
        if nodes is not None and nodes.follower and not stage.distributed:
            if not stage.done.exists():  # out/ is on storage all nodes share
                print(f"[pipeline] {stage.name}: node 0 runs it; waiting for {stage.done}", flush=True)
            while not stage.done.exists() and not runner.interrupted:
                time.sleep(FOLLOWER_POLL_S)
            if runner.interrupted:
                return 128 + runner.interrupted
            continue
        if stage.done.exists():
            print(f"[pipeline] {stage.name}: done ({stage.done.relative_to(out.parent)} exists), skipped", flush=True)
            newer = newer_inputs(stage, every)
            if newer:
                print(f"[pipeline] {stage.name}: note: {', '.join(newer)} finished after it; remove "
                      f"{stage.done.relative_to(out.parent)} to run it again on them", flush=True)
            if set_in[stage.name]:
                print(f"[pipeline] {stage.name}: {' '.join(set_in[stage.name])} changes nothing in a finished stage "
                      f"(done while {stage.done.relative_to(out.parent)} exists: remove it to run the stage again "
                      "with them; a training stage goes on from its last checkpoint)", flush=True)
            continue
        started = time.monotonic()
        command = stage.command
        if stage.distributed and nodes is None and int(preset.get("num_gpus", 0)) > 0:
            # a port free now: the launcher's default, 29500, may be another run's on this machine (GPUs 2,3 beside 0,1)
            command = [command[0], f"--master_port={free_port()}", *command[1:]]
        code = runner.run(stage.name, command, env)
        timings[stage.name] = round(time.monotonic() - started, 1)
        if code in (-signal.SIGINT, 128 + signal.SIGINT) and not runner.interrupted:
            # `stop STAGE`: the stage alone was told to stop and ended as stopped (130 and its one line, or the
            # `deepspeed` command killed by the SIGINT before the ranks started, procs.interrupt_group)
            if stage.done.exists():  # the evaluation's summary of the models it finished: the next run runs it again
                stage.done.unlink()
            print(f"[pipeline] {stage.name} stopped before it finished; run the pipeline again to resume it")
            return 0
        if runner.interrupted and not (code == 0 and stage.done.exists()):
            # the stage was told to stop: what it keeps (checkpoints, parts/, the pairs so far) is where it goes on
            print(f"[pipeline] interrupted during {stage.name}; run the same command again to go on", flush=True)
            code = 128 + runner.interrupted  # as a shell reports a program that a signal ended
        elif code != 0:
            print(f"[pipeline] {stage.name} failed with exit code {code}; see {logs / (stage.name + '.log')}")
        if code != 0:
            if stage.done.exists():  # written beside the failure or interrupt (the evaluation's summary of the
                stage.done.unlink()  # models it finished): the stage is not done, and the next run runs it again
                if not runner.interrupted:
                    print(f"[pipeline] {stage.name}: its {stage.done.relative_to(out.parent)} removed, so that the "
                          "next run runs it again", flush=True)
            return code
        if not stage.done.exists():
            print(f"[pipeline] {stage.name} stopped before it finished; run the pipeline again to resume it")
            return 0
        print(f"[pipeline] {stage.name}: finished in {timings[stage.name]} s", flush=True)
        if runner.interrupted:
            print(f"[pipeline] interrupted after {stage.name}; run the same command again to go on", flush=True)
            return 128 + runner.interrupted
    summary = out / "pipeline_timings.json"
    previous = json.loads(summary.read_text()) if summary.exists() else {}
    write_atomic(summary, json.dumps({**previous, **timings}, indent=2) + "\n")
    print(f"[pipeline] complete; stage timings in {summary}")
    return 0


def status(logs: Path, out: Path) -> None:
    """One line per stage that has a log: running or not, its latest logged step and loss, and its last progress
    line's state (step/total, elapsed, ETA, tokens/s), for the pipeline's log its own state (`pipeline_state`); one
    line saying so where no stage has a log."""
    found = sorted(logs.glob("*.log"))
    if not found:
        print(f"no stage has run from here: {f'no stage log in {logs}' if logs.is_dir() else f'no {logs} directory'}")
    pids = {}
    for log in found:
        pid = read_pid(logs, log.stem)
        pids[log.stem] = pid if pid and is_alive(pid) else writer_of(log)
    for log in found:
        name, pid = log.stem, pids[log.stem]
        line = f"{name:12s} {'running (pid %d)' % pid if pid else 'not running'}"
        metrics = out / name / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.exists() else []
        last = next((row for row in reversed(rows) if "loss" in row and "step" in row), None)
        if last:
            line += f"  step={last['step']} loss={last['loss']:.4f}"
        if name == "pipeline":  # its log echoes the stages': their progress is on their own rows
            progress = pipeline_state(log, pid, [stage for stage, alive in pids.items() if alive and stage != name])
        else:
            progress = last_progress(log, running=bool(pid))
        if progress:
            line += f"  [{progress}]"
        print(line)


def pipeline_state(log: Path, pid: int | None, running: list[str]) -> str | None:
    """The pipeline row's own state: while it runs, the stages running and its elapsed time; else its last line of
    its own (complete, a stage failed or stopped, interrupted)."""
    if pid:
        try:
            elapsed = duration(time.time() - psutil.Process(pid).create_time())
        except psutil.Error:  # it ended since
            return None
        return f"{', '.join(running) or 'no stage'} running, elapsed {elapsed}"
    own = [line for line in tail_text(log, 4096).splitlines() if line.startswith("[pipeline] ")]
    return own[-1].removeprefix("[pipeline] ") if own else None


# A stage's progress line in a log (stages print these, not bars, off a terminal): a training step
# (mateconv.train.tracking.Progress), or a share of stage 3's or 7's work (mateconv.terminal.PlainProgress).
PROGRESS_LINE = re.compile(r"\] step (\d+/\d+) .* tok/s (\S+) (?:mem_gb \S+ )?elapsed (\S+) eta (\S+)$")
SHARE_LINE = re.compile(r"\] ([\d.,]+/[\d.,]+ \S+ \(\d+%\)) .* elapsed (\S+) eta (\S+)$")


def last_progress(log: Path, tail_bytes: int = 4096, running: bool = True) -> str | None:
    """The last progress line's state in a stage log, e.g. '144/200 elapsed 0:02:53 eta 0:00:43, 41,250 tok/s' or
    '1,200/3,000 prompts (40%) elapsed 0:28:35 eta 0:42:52'; of a stage not `running`, without its ETA (it was
    stopped, or failed, there)."""
    for line in reversed(tail_text(log, tail_bytes).splitlines()):
        match = PROGRESS_LINE.search(line)
        if match:
            return f"{match[1]} elapsed {match[3]}{f' eta {match[4]}' if running else ''}, {match[2]} tok/s"
        match = SHARE_LINE.search(line)
        if match:
            return f"{match[1]} elapsed {match[2]}{f' eta {match[3]}' if running else ''}"
    return None


def stage_hint(name: str, preset: str, logs: Path) -> str:
    """'; did you mean ...' for a name that is no stage of the preset, none that ran from `logs`, and not `pipeline`
    (scripts/launch.sh's); "" for a known name."""
    known = {"pipeline", *load_preset(preset)["stages"], *(path.stem for path in logs.glob("*.log"))}
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"; did you mean '{close[0]}'?" if close and name not in known else ""


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m mateconv.pipeline", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "status", "stop"))
    parser.add_argument("stage", nargs="?", help="with `stop`: the stage to stop")
    parser.add_argument("--preset", default=os.environ.get("MATECONV_PRESET", "tiny"))
    parser.add_argument("--data", metavar="DIR", help="your own files instead of the embedded demo data: pretraining "
                        "text, SFT conversations, preference pairs (docs/own_data.md); or one such FILE")
    parser.add_argument("--tokenizer", metavar="PATH", help="with --data: use this tokenizer (e.g. MiniMind's "
                        "model/ directory) instead of training one on the data")
    parser.add_argument("--judge_model", help="the judge's model name at the judge endpoint, for stage 7 and the "
                        "win rates of the evaluation alike (default: gpt-4o-mini)")
    parser.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="STAGE.KEY=VALUE", dest="sets",
                        help="override stage flags: --set pretrain.max_steps=50 sft.max_steps=20 (several after one "
                        "--set, or --set repeated)")
    parser.add_argument("--hostfile", metavar="FILE", help="multi-node: the DeepSpeed hostfile (`HOST slots=N` per "
                        "node); the training stages run on all its nodes (docs/operations.md)")
    parser.add_argument("--master_addr", help="with --hostfile: the address of node 0 (the first host)")
    parser.add_argument("--master_port", type=int, default=29500, help="with --hostfile: a free port on node 0")
    parser.add_argument("--node_rank", type=int, help="with --hostfile, on clusters without ssh: this node's place "
                        "in the hostfile; start the pipeline on every node, node 0 runs the other stages")
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
            try:
                print(stop(logs, args.stage, args.timeout))
            except NotStopped as error:  # a non-zero status, as `kill` gives for no such process
                print(f"error: {error}{stage_hint(args.stage, args.preset, logs)}", file=sys.stderr)
                return 1
            return 0
        # Ctrl-C or `kill -2` while the stages are checked (seconds; more with --data) stops the run, also where it
        # started with SIGINT ignored (launch.sh's background job); once stages run, StageRunner passes it to them
        signal.signal(signal.SIGINT, signal.default_int_handler)
        preset = load_preset(args.preset)
        if args.judge_model:
            set_judge_model(preset, args.judge_model)
        if args.tokenizer and not args.data:
            raise PipelineError("--tokenizer goes with --data (the demo run trains its own)")
        training = [item for item in args.sets if item.startswith("tokenizer.")]
        if args.tokenizer and training:  # said in the pipeline's flags, not the tokenizer stage's (--from_pretrained)
            raise PipelineError(f"--set {' '.join(training)}: --tokenizer {args.tokenizer} is used as it is, not "
                                "trained (leave out --tokenizer to train one on --data with these settings)")
        source, full = None, json.loads(json.dumps(preset))  # the preset before --data leaves stages out
        if args.data:
            data, tokenizer = Path(args.data).resolve(), Path(args.tokenizer).resolve() if args.tokenizer else None
            report, files = use_data(preset, data, tokenizer, os.environ, outputs=(out, logs))
            say(report)
            source = {"data": str(data), "tokenizer": str(tokenizer) if tokenizer else None, "files": files}
        every_stage, left_out = list(full["stages"]), set(full["stages"]) - set(preset["stages"])
        check_left_out_sets(full, args.sets, left_out, out)
        apply_sets(preset, args.sets, left_out)
        same_normalization(preset)
        as_many_prompts_as_sampled(preset, args.sets)
        only = {s for s in args.only.split(",") if s} or None
        unknown = (only or set()) - set(preset["stages"])
        if unknown & set(every_stage):
            raise PipelineError(f"--only names stages that this run on {args.data} leaves out: "
                                f"{', '.join(sorted(unknown & set(every_stage)))} (the lines above say why)")
        if unknown:
            raise PipelineError(f"--only names unknown stages: {', '.join(sorted(unknown))}")
        if (args.master_addr or args.node_rank is not None) and not args.hostfile:
            raise PipelineError("--master_addr and --node_rank go with --hostfile")
        nodes = (Nodes(Path(args.hostfile).resolve(), args.master_addr, args.master_port, args.node_rank)
                 if args.hostfile else None)
        if nodes is not None:
            check_nodes(nodes)
        return run(preset, only, logs, out, nodes, args.sets, source)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "run":
            raise
        print("[pipeline] interrupted before any stage started", flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    run_main(main)
