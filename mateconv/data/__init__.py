"""Data stages: raw corpus reading, cleaning, dedup, format conversion, the embedded demo data, token shards."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data or data settings; the message names the file (and line) and the problem."""
