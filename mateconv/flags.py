"""Settings rendered as command-line flags, the one way the pipeline, the sweeps and the memory presets launch stages.

`--key value`, with True as a bare switch (`--key`: argparse switches and the training config both accept it) and
False as `--key false` (how the training config turns off a setting that defaults to on); None leaves the flag out
and a list becomes `--key a b` (an empty one `--key ""`).
"""
from __future__ import annotations

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
