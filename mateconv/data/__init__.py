"""Data stages: raw corpus reading, cleaning, dedup, format conversion, the embedded demo data, token shards."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mateconv.errors import InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class DataError(InputError, ValueError):
    """Bad data or data settings; the message names the file (and line) and the problem."""


def json_type(value: object) -> str:
    """A value's type as an error message names it: JSON's 'null' for None, else the Python type."""
    return "null" if value is None else type(value).__name__


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file as a `tokenizers.Tokenizer`; one that is missing or not a tokenizer (a download cut
    short) is a DataError naming it, not the bare Exception tokenizers raises."""
    from tokenizers import Tokenizer  # here: most that read data need no tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise DataError(f"{path}: not a readable tokenizer.json: {error}") from None
