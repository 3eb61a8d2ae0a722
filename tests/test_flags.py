"""Settings rendered as command-line flags: one convention for booleans, None left out, lists spread."""
from __future__ import annotations

import argparse
import importlib

import pytest

from conftest import REPO
from mateconv.flags import ArgumentParser, render_flags, unrecognized


def test_booleans_floats_lists_and_none():
    flags = render_flags({"learning_rate": 3e-4, "min_lr": 1e-05, "use_moe": True, "flash_attn": False,
                          "n_layers": 8, "name": "a b", "models": ["a", 2], "skip": None})
    assert flags == ["--learning_rate", "0.0003", "--min_lr", "1e-05", "--use_moe", "--flash_attn", "false",
                     "--n_layers", "8", "--name", "a b", "--models", "a", "2"]


def test_true_is_a_switch_argparse_accepts():
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args(render_flags({"all": True, "models": ["a", "b"]}))
    assert args.all is True and args.models == ["a", "b"]


def test_an_empty_list_is_an_empty_value_the_training_config_reads():
    """A pipeline preset's `forget_data_paths: []` became a bare `--forget_data_paths`: 'needs a value'."""
    from mateconv.config import parse_config

    flags = render_flags({"forget_data_paths": [], "use_moe": True})
    assert flags == ["--forget_data_paths", "", "--use_moe"]
    assert parse_config(flags).dpo.forget_data_paths == []


@pytest.mark.parametrize("module, argv, typo, flag", [
    ("mateconv.prefs.cli", [], "--n_promts", "--n_prompts"),
    ("mateconv.evaluate.cli", ["--models", "m"], "--max_taks", "--max_tasks"),
    ("mateconv.serve.cli", [], "--model_pth", "--model_path"),
    ("mateconv.export", ["m", "--to", "gguf", "--out", "o"], "--dtpye", "--dtype"),
    ("mateconv.pipeline", ["run"], "--presett", "--preset"),
    ("mateconv.data.tokenizing", [], "--out_dri", "--out_dir"),
    ("mateconv.data.prepare", [], "--val_fracs", "--val_frac"),
    ("mateconv.tokenizer", ["--corpus", "c"], "--vocab_szie", "--vocab_size")])
def test_an_unknown_flag_is_answered_with_the_closest_one(module, argv, typo, flag, capsys):
    """`7.gen_prefs_openai.py --n_promts 3` said only `unrecognized arguments: --n_promts 3`, while the training
    stages say which key was meant."""
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main([*argv, typo, "3"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: unrecognized argument {typo}; did you mean {flag}?")


@pytest.mark.parametrize("module", ["mateconv.tokenizer", "mateconv.data.tokenizing", "mateconv.data.prepare"])
def test_help_shows_no_default_for_a_flag_without_one(module, capsys):
    """`3.dataset.py --help` said `--input ... (default: None)`, `--corpus ... (default: None)`: None is no default."""
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: " in text  # the other defaults are still shown


def test_a_flag_nothing_is_close_to_is_named_as_argparse_names_it():
    parser = ArgumentParser(prog="p")
    parser.add_argument("--num_pairs", type=int)
    assert unrecognized(parser, ["--zzz", "3", "extra"]) == "unrecognized arguments: --zzz 3 extra"
    assert unrecognized(parser, ["--num_pair=3"]) == "unrecognized argument --num_pair; did you mean --num_pairs?"


def test_every_program_parses_its_flags_with_the_parser_that_names_the_closest_flag():
    """One parser for every command line: a program built on argparse's own would answer a typo without a hint."""
    sources = [*REPO.glob("*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("mateconv/**/*.py")]
    direct = [str(path.relative_to(REPO)) for path in sources if "argparse.ArgumentParser(" in path.read_text()]
    assert not direct
