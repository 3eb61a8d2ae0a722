"""The training programs' command lines (4.pretrain.py, 5.full_sft.py, 9.train_dpo.py, and the seeds' train.py and
pretrain_sft_lora.py): `--help` and the config are read here, before the trainer (mateconv.train.stages: data,
engine, checkpoints, trackers) is imported. The config itself still imports the `model` package (its `model` section
is MateConvConfig, and importing `model` registers it with transformers' Auto classes), which imports transformers
and torch: that is most of a misspelt flag's seconds.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from mateconv.config import (SECTIONS, STAGE_KEYS, STAGE_PROGRAMS, ConfigError, DataConfig, help_text, parse_args,
                             parse_config)
from mateconv.data import DataError
from mateconv.terminal import bars_only_on_a_terminal

LM_SECTIONS = tuple(section for section in SECTIONS if section != "dpo")
# Each stage's defaults (flat keys; YAML files and flags override them) and the config sections it uses (its --help).
STAGE_DEFAULTS = {
    "pretrain": {"out_dir": "out/pretrain", "data_path": "out/tokens/pretrain/train",
                 "val_data_path": "out/tokens/pretrain/val"},
    "sft": {"out_dir": "out/sft", "data_path": "out/tokens/sft/train", "val_data_path": "out/tokens/sft/val",
            "init_from": "out/pretrain/final", "learning_rate": 1e-4, "warmup_iters": 20},
    "dpo": {"out_dir": "out/dpo", "data_path": "out/tokens/dpo/train", "val_data_path": "out/tokens/dpo/val",
            "init_from": "out/sft/final", "learning_rate": 5e-6, "weight_decay": 0.0, "batch_size": 8,
            "warmup_iters": 10, "eval_interval": 100, "save_interval_steps": 200, "eval_batches": 20},
}
STAGE_SECTIONS = {"pretrain": LM_SECTIONS, "sft": LM_SECTIONS, "dpo": tuple(SECTIONS)}


class StageExit(SystemExit):
    """Exit status 1 with a one-line message that is already written; str() is the message."""

    def __init__(self, message: str):
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_with(message: str) -> NoReturn:
    """Write `message` (if any) as one line in one write, then exit 1: under a launcher the ranks share one stream,
    and sys.exit writes a message and its newline separately, so two ranks' lines ran into one."""
    if message:
        sys.stderr.write(f"{message}\n")
        sys.stderr.flush()
    raise StageExit(message)


def main(stage: str, argv: list[str] | None = None, program_defaults: dict | None = None,
         program: str = "") -> int:
    """The stage's program; `program_defaults` (a seed program's own) win over the stage's defaults. `program` is how
    its usage line names the command (default: the stage's own program)."""
    defaults = {**STAGE_DEFAULTS[stage], **(program_defaults or {})}
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(f"usage: {program or STAGE_PROGRAMS[stage]} [CONFIG.yaml] [--key value ...] [--overrides key=value ...]\n"
              f"{help_text(STAGE_SECTIONS[stage], defaults)}")
        return 0
    bars_only_on_a_terminal()
    rank = os.environ.get("RANK", "0")
    label = f"{stage} (rank {rank})" if rank != "0" else stage
    try:
        config = parse_config(argv, defaults, stage)
    except (ConfigError, DataError) as e:  # each rank says its own (a launcher may stop rank 0 before it speaks)
        exit_with(f"{label}: {e}")
    from mateconv.train.stages import train  # the trainer: once the command line is read
    return train(stage, config, argv, label)


# Seed 000/001's files, where their users keep them: the corpus, and the tokenizer (seed 000's, then seed 001's).
SEED_CORPUS = Path("dataset/pretrain_hq.jsonl")
SEED_TOKENIZERS = (Path("tokenizer"), Path("model/zer02llm_tokenizer"))


def seed_program_defaults(stage: str) -> dict:
    """Seed 000/001's `pretrain_sft_lora.py` defaults: its flags tables' accumulation_steps 8, and its files where the
    out/ layout has none (`./dataset/pretrain_hq.jsonl` for pretraining, `./tokenizer/` or
    `./model/zer02llm_tokenizer/`)."""
    defaults: dict = {"accumulation_steps": 8}
    if stage == "pretrain" and SEED_CORPUS.is_file() and not Path(STAGE_DEFAULTS[stage]["data_path"]).exists():
        defaults["data_path"] = str(SEED_CORPUS)
    found = [path for path in SEED_TOKENIZERS if (path / "tokenizer.json").is_file()]
    if found and not Path(DataConfig.tokenizer_path).is_dir():
        defaults["tokenizer_path"] = str(found[0])
    return defaults
def main_one_program(program: str, argv: list[str] | None = None) -> int:
    """The seeds' one training program (seed 000/001's `pretrain_sft_lora.py --mode pretrain|sft|dpo [flags]`, seed
    003's `train.py CONFIG.yml [--overrides ...]` whose loss.name is sft, dpo or ipo): the stage those name, with the
    same flags (LoRA is `--use_lora` of any stage)."""
    argv = sys.argv[1:] if argv is None else argv
    asks_help = "-h" in argv or "--help" in argv
    try:
        named = [(key, value) for key, value in parse_args([t for t in argv if t not in ("-h", "--help")])
                 if key in STAGE_KEYS]
    except ConfigError as e:
        exit_with(f"{program}: {e}")
    key, value = named[-1] if named else ("", "")
    if program == "pretrain_sft_lora" and not named and not asks_help:
        key, value = "mode", "pretrain"  # seed 000's flags table: --mode defaults to pretrain
        if os.environ.get("RANK", "0") == "0":
            print(f"[{program}] no --mode: pretrain (seed 000's default)", flush=True)
    if program == "pretrain_sft_lora" and (key, value) == ("mode", "test"):
        from mateconv.evaluate.cli import seed_test_main
        seed_test_main(argv)
        return 0
    stage = STAGE_KEYS[key].get(value) if key and isinstance(value, str) else None
    if stage is not None:
        seed_defaults = seed_program_defaults(stage) if program == "pretrain_sft_lora" else None
        return main(stage, argv, seed_defaults, f"{program}.py --mode {stage}" if key == "mode" else f"{program}.py")
    stages = ", ".join(f"{mode} ({script})" for mode, script in STAGE_PROGRAMS.items())
    if program == "pretrain_sft_lora":
        stages += ", test (evaluates the final models under --out_dir)"
    usage = (f"--mode names the stage to run, with that stage's flags: {stages} (or a config's loss.name: sft, dpo "
             "or ipo, seed 003); `--mode NAME --help` lists them")
    if not named and asks_help:
        print(f"usage: {program}.py [CONFIG.yaml] --mode pretrain|sft|dpo [flags] [--overrides key=value ...]\n{usage}")
        return 0
    problem = f"{'--mode' if key == 'mode' else key} {value!r} is not a stage" if named else "no stage named"
    exit_with(f"{program}: {problem}; {usage}")
