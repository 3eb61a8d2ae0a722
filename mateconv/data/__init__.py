"""Data stages: raw corpus reading, cleaning, dedup, format conversion, the embedded demo data, token shards."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or data settings; the message names the file (and line) and the problem."""


def json_type(value: object) -> str:
    """A value's type as an error message names it: JSON's 'null' for None, else the Python type."""
    return "null" if value is None else type(value).__name__
