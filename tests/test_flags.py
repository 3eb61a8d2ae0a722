"""Settings rendered as command-line flags: one convention for booleans, None left out, lists spread."""
from __future__ import annotations

import argparse

from mateconv.flags import render_flags


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
