"""Command-line flags: settings rendered as flags (the one way the pipeline, the sweeps and the memory presets launch
stages), and the argparse parser of every program, which names the closest flag to one it does not know.

`--key value`, with True as a bare switch (`--key`: argparse switches and the training config both accept it) and
False as `--key false` (how the training config turns off a setting that defaults to on); None leaves the flag out
and a list becomes `--key a b` (an empty one `--key ""`).
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from typing import Any


def format_value(value: Any) -> str:
    """A flag value as text: booleans lower-case, floats in their shortest round-trip form (0.0003, 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_flags(values: Mapping[str, Any]) -> list[str]:
    """`{"lr": 3e-4, "use_moe": True, "flash_attn": False}` -> `["--lr", "0.0003", "--use_moe", "--flash_attn",
    "false"]`."""
    flags: list[str] = []
    for key, value in values.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(format_value, value)] if value else [f"--{key}", ""]  # empty: the value ""
        elif value is not None:
            flags += [f"--{key}", format_value(value)]
    return flags


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """What is wrong with `extras`, the arguments `parser` does not know: the first unknown flag with the closest of
    the parser's (`unrecognized argument --num_pair; did you mean --num_pairs?`), else argparse's own words."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    for extra in extras:
        flag = extra.partition("=")[0]
        close = difflib.get_close_matches(flag, known, n=1) if flag.startswith("-") else []
        if close:
            return f"unrecognized argument {flag}; did you mean {close[0]}?"
    return f"unrecognized arguments: {' '.join(extras)}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, answering an unknown flag with the closest known one (`unrecognized`), as the training
    config answers an unknown key."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(self, extras))
        return parsed


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each flag's default, but none for a flag whose default is None: argparse's `(default: None)`
    says nothing (the flag's help tells what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
