"""Lazy reading of raw corpora: jsonl (optionally .gz), json arrays, plain text, parquet, directories, hub data sets.

`iter_records(path)` yields `(source, line, record)` one at a time, `line` being where the record starts in the file
(JSON arrays and parquet row groups are read a piece at a time rather than a line at a time; a malformed array
element is a BadLine, as a malformed JSON line is). A `.json` file holds an
array of records, one record, or JSON Lines (HF's `to_json` writes those under a `.json` name). Plain text becomes
`{"text": ...}` records: one per line, or one per blank-line-separated paragraph when blank lines separate paragraphs
of short lines (tinyshakespeare) - see `txt_records`.
"""
from __future__ import annotations

import codecs
import gzip
import io
import itertools
import json
import os
import re
import socket
import statistics
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import psutil

from mateconv.data import DataError, json_type
from mateconv.data.dataset_info import entry_for

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".txt", ".txt.gz", ".parquet")
HUB_PREFIXES = ("hf:", "ms:")
TEXT_KEYS = ("text", "content", "paragraphs")
SAMPLE_CHARS = 1 << 20  # how much of a .txt file decides its mode
PARAGRAPH_MIN_SHARE = 0.05  # paragraph starts per non-empty line: paragraphs of at most ~20 lines on average
PARAGRAPH_MAX_LINE = 200  # median characters of a non-empty line in wrapped prose or verse; longer ones are documents
JSON_READ_BYTES = 1 << 20
NON_SPACE = re.compile(r"\S")
JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[][{},]')  # a string (to its end or its line's), or structure
OPENER = {"]": "[", "}": "{"}
JSON_DECODER = json.JSONDecoder()
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
ENDS_IN_A_CHARACTER = "unexpected end of data"  # UnicodeDecodeError's reason for a multi-byte character cut off
NOT_UTF8 = "not UTF-8 text; save the file as UTF-8 (from GBK: `iconv -f GBK -t UTF-8 FILE > NEW`)"
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-32's little-endian mark starts with UTF-16's
NOT_TEXT = {  # a text file's first bytes that say it is something else, and what to do
    b"\x1f\x8b": ("gzip-compressed data", "decompress it (`gunzip`) or end its name with .gz"),
    b"PK\x03\x04": ("a zip archive", "unzip it"),
    b"PAR1\x15": ("a parquet file", "end its name with .parquet"),  # its first page header: text may start "PAR1"
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def files_under(root: Path) -> list[Path]:
    """Every file under root, recursively and sorted. Links to directories are followed (a data directory made of
    links to data sets; rglob would pass them by), but no directory is entered twice (a link cycle)."""
    files, seen = [], set()
    for folder, directories, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            directories.clear()
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names]
    return sorted(path for path in files if path.is_file())


# A model's or tokenizer's own files (a tokenizer directory kept beside the data): merges.txt read as text would be
# trained on, the JSON files are not records
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "merges.txt", "config.json", "generation_config.json")


def path_list(paths: str | Path | Iterable[str | Path]) -> list[str | Path]:
    """The paths as a list; one str or Path is one path (a notebook's `corpus = "poems.txt"`), not its characters."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def list_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files of the given paths; directories are searched recursively (sorted) for the known suffixes, leaving out
    a model's or tokenizer's own files."""
    files: list[Path] = []
    for raw in path_list(paths):
        path = Path(raw)
        if path.is_dir():
            found = [p for p in files_under(path) if _suffix(p) and p.name not in MODEL_FILES]
            if not found:
                raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this directory")
            files += found
        elif path.is_file():
            if not _suffix(path):
                raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


class CutShort(Exception):
    """A compressed file ends inside its data (an interrupted download), at `line`."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


class _GzipToTheCut(io.RawIOBase):
    """A .gz file's data up to where the file is cut short, if it is: there the data ends and `cut` is set. gzip's
    EOFError instead would lose the whole lines the buffers above still hold."""

    def __init__(self, path: Path):
        self.gzip, self.cut = gzip.open(path, "rb"), False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.gzip.read1(len(buffer))  # one decompression step: an EOFError there loses nothing decompressed
        except EOFError:
            self.cut = True
            return 0
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.gzip.close()
        super().close()


def _open_binary(path: Path) -> io.BufferedIOBase:
    return io.BufferedReader(_GzipToTheCut(path)) if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_cut(f: io.IOBase) -> bool:
    """Whether the file `_open_binary` opened ended at a cut, not at the end of its data."""
    return getattr(getattr(f, "raw", None), "cut", False)


def text_lines(path: Path) -> Iterator[tuple[int, str | BadLine]]:
    """(number, line without its line break) of each line; one that is not UTF-8 is a BadLine, so that a stray byte
    costs its line and a GBK file says what it is, instead of training on replacement characters."""
    number = 0
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n") and _is_cut(f):
                raise CutShort(number)  # the line the cut broke off
            try:
                yield number, raw.decode("utf-8-sig").rstrip("\r\n")  # -sig: also a mark inside (files joined)
            except UnicodeDecodeError as error:
                cut = error.reason == ENDS_IN_A_CHARACTER and not raw.endswith(b"\n")
                yield number, BadLine("the file ends inside a character here (cut short?)" if cut else
                                      f"{error.reason} at byte {error.start + 1}: {NOT_UTF8}")
        if _is_cut(f):
            raise CutShort(number + 1)


def _paragraph_mode(path: Path) -> bool:
    """Whether the first MB's blank lines separate paragraphs of short lines (tinyshakespeare's speeches), rather
    than straying between documents of a line each, which paragraph mode would glue into a few huge ones."""
    with _open_binary(path) as f:
        lines = f.read(SAMPLE_CHARS).decode("utf-8", "replace").split("\n")  # only the text's shape counts here
    lengths = [len(line) for line in lines if line.strip()]
    starts = sum(1 for before, line in zip(lines, lines[1:]) if not before.strip() and line.strip())
    return (bool(lengths) and starts >= PARAGRAPH_MIN_SHARE * len(lengths)
            and statistics.median(lengths) <= PARAGRAPH_MAX_LINE)


def txt_records(path: Path) -> Iterator[tuple[int, dict | BadLine]]:
    """One document per blank-line-separated paragraph in paragraph mode (`_paragraph_mode`), else one per line;
    a line that is not UTF-8 is passed on as a BadLine."""
    paragraphs = _paragraph_mode(path)
    block: list[str] = []
    start = 1
    for number, line in text_lines(path):
        if isinstance(line, BadLine):
            yield number, line
        elif not paragraphs:
            if line.strip():
                yield number, {"text": line}
        elif line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, {"text": "\n".join(block)}
            block = []
    if block:
        yield start, {"text": "\n".join(block)}


class BadLine:
    """A line that is not valid JSON or not UTF-8; passed on so the caller can count it with its position."""

    def __init__(self, error: str):
        self.error = error


class _JsonText:
    """A JSON text read a piece at a time, with the line number of the read position."""

    def __init__(self, f: io.BufferedIOBase, path: Path):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: the byte order mark Windows editors write
        self.text, self.pos, self.line, self.eof = "", 0, 1, False

    def _read_more(self) -> None:
        # at least as much as is left, so that a value longer than one read is parsed again only a few times
        data = self.f.read(max(JSON_READ_BYTES, len(self.text) - self.pos))
        if not data and _is_cut(self.f):
            raise CutShort(self.line + self.text.count("\n", self.pos))
        try:
            chunk = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as error:
            if error.reason != ENDS_IN_A_CHARACTER:
                raise
            chunk = ""  # a download cut inside a character: the text ends before it, as at any other cut
        self.text, self.pos, self.eof = self.text[self.pos:] + chunk, 0, not data

    def move_to(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def next_char(self) -> str:
        """The next non-whitespace character, moved to ('' at the end of the file)."""
        while not (match := NON_SPACE.search(self.text, self.pos)):
            self.move_to(len(self.text))
            self._read_more()
            if self.eof:
                return ""
        self.move_to(match.start())
        return match.group()

    def value(self) -> Any:
        """The JSON value at the read position, moved past."""
        while True:
            try:
                value, end = JSON_DECODER.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:  # a number at the end of what was read may go on
                    self.move_to(end)
                    return value
            except json.JSONDecodeError as error:
                if self.eof:
                    self.fail(error.msg, error.pos)
            self._read_more()

    def element(self, index: int) -> tuple[int, Any]:
        """(line, value) of the array element at the read position, moved to the ',' or ']' after it (or to the end
        of the file); a malformed element is a BadLine at the line of its error, so that the others still count."""
        try:
            value, end = JSON_DECODER.raw_decode(self.text, self.pos)
            after = NON_SPACE.search(self.text, end)
            if after and after.group() in ",]":  # else the element goes on, or its end is not read yet
                line = self.line
                self.move_to(after.start())
                return line, value
        except json.JSONDecodeError:
            pass
        while (end := _element_end(self.text, self.pos)) is None and not self.eof:
            self._read_more()
        end = len(self.text) if end is None else end
        line = self.line
        try:
            value = json.loads(self.text[self.pos:end])
        except json.JSONDecodeError as error:
            line += self.text.count("\n", self.pos, self.pos + error.pos)
            value = BadLine(f"array element {index}: malformed JSON: {error.msg}")
        self.move_to(end)
        return line, value

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        line = self.line + self.text.count("\n", self.pos, self.pos if pos is None else pos)
        raise DataError(f"{self.path}:{line}: malformed JSON: {message}")


def _element_end(text: str, pos: int) -> int | None:
    """Where the array element starting at `pos` ends: the ',' or ']' after it outside strings and brackets; None
    when `text` ends first. Made to resynchronise after a malformed element: a string also ends at a line break
    (JSON has none in strings), and a closing bracket closes every bracket opened since its match."""
    opened: list[str] = []
    for match in JSON_TOKEN.finditer(text, pos):
        token = match.group()
        if token in "[{":
            opened.append(token)
        elif token in "]}" and OPENER[token] in opened:
            del opened[len(opened) - 1 - opened[::-1].index(OPENER[token]):]
        elif token == "]" or (token == "," and not opened):  # a ']' that closes nothing closes the array
            return match.start()
    return None


def _json_array(text: _JsonText) -> Iterator[tuple[int, Any]]:
    """(line, element or BadLine) for each element of the array whose '[' is the next character; a file cut short
    keeps the elements before the cut and reports the cut as a BadLine."""
    text.move_to(text.pos + 1)
    if text.next_char() == "]":
        text.move_to(text.pos + 1)
        return
    for index in itertools.count(1):
        text.next_char()
        line, element = text.element(index)
        delimiter = text.next_char()
        if not delimiter:  # a download cut short: one bad line, also where the cut broke an element off
            if isinstance(element, BadLine):
                yield line, BadLine(f"the file ends inside array element {index}, before the array's closing ']' "
                                    "(cut short?)")
            else:
                yield line, element
                yield text.line, BadLine("the file ends before the array's closing ']' (cut short?)")
            return
        yield line, element
        text.move_to(text.pos + 1)
        if delimiter == "]":
            return


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) of a .json file: an array's elements, its one record, or its lines when it is JSON Lines."""
    with _open_binary(path) as f:
        text = _JsonText(f, path)
        if text.next_char() == "[":
            yield from _json_array(text)
            if text.next_char():
                yield text.line, BadLine("malformed JSON: Extra data after the array")
            return
        start = text.line
        record = text.value()
        end = text.line
        if not text.next_char():
            if not isinstance(record, dict):
                raise DataError(f"{path}: a .json file must hold an array of records, one record or JSON Lines")
            yield start, record
            return
        if not (isinstance(record, dict) and start == end < text.line):
            text.fail("Extra data")
    yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record or BadLine) for each non-empty line."""
    for number, line in text_lines(path):
        if isinstance(line, BadLine):
            yield number, line
        elif line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, BadLine(f"malformed JSON: {error.msg}")


def opens_array(path: Path) -> bool:
    """Whether the file's text opens with '[': under a .jsonl name, a JSON array (a LLaMA-Factory file renamed)."""
    with _open_binary(path) as f:
        return f.read(64).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """JSON Lines, or a JSON array under a .jsonl name, read as a .json file is (not as lines of malformed JSON)."""
    yield from _json_records(path) if opens_array(path) else _json_lines(path)


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except pa.ArrowException as error:
        raise DataError(f"{path}: not a readable parquet file: {error}") from None


def refuse_not_text(path: Path) -> None:
    """A file that opens with a UTF-16 byte order mark (Windows PowerShell's `>`, Notepad's "Unicode") is refused
    whole: read as UTF-8, its ASCII would pass between NUL bytes and its other lines fail at misplaced numbers. So is
    a compressed file or a table under a text file's name (a download saved without its .gz), whose bytes would be
    reported as GBK or as records of no known shape."""
    with _open_binary(path) as f:
        head = f.read(max(map(len, NOT_TEXT)))
    if head[:2] in UTF16_BOMS:
        raise DataError(f"{path}: UTF-16 text, not UTF-8; save the file as UTF-8 "
                        "(`iconv -f UTF-16 -t UTF-8 FILE > NEW`)")
    for magic, (what, fix) in NOT_TEXT.items():
        if head.startswith(magic):
            raise DataError(f"{path}: {what}, not text: {fix}")


def iter_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(source, line where the record starts, record) for every record of one file; bad JSON lines -> BadLine.
    Parquet rows are numbered from 1 instead. A file that a LLaMA-Factory dataset_info.json beside or above it names
    has its records' columns renamed as its entry says (mateconv.data.dataset_info). A .gz cut short keeps the
    records before the cut, and the cut is a BadLine saying how many; a file that cannot be read (a damaged .gz, one
    cut before its first record) is a DataError."""
    suffix = _suffix(path)
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) == LFS_POINTER:  # a data set cloned without git-lfs
            raise DataError(f"{path}: a Git LFS pointer, not the data: fetch the file (`git lfs pull` in its clone)")
    if suffix in (".jsonl", ".jsonl.gz"):
        records = _jsonl_records(path)
    elif suffix in (".json", ".json.gz"):
        records = _json_records(path)
    elif suffix in (".txt", ".txt.gz"):
        records = txt_records(path)
    elif suffix == ".parquet":
        records = _parquet_records(path)
    else:
        raise DataError(f"{path}: unsupported file type")
    entry = entry_for(path)
    kept = 0
    try:
        if suffix != ".parquet":
            refuse_not_text(path)
        for number, record in records:
            kept += not isinstance(record, BadLine)
            if entry and not isinstance(record, BadLine):
                record = entry.record(record)
            yield str(path), number, record
    except CutShort as cut:
        if not kept:
            raise DataError(f"{path}: cannot read the file: it is cut short before its first record (an interrupted "
                            "download?)") from None
        yield str(path), cut.line, BadLine(f"the compressed file is cut short here (an interrupted download?); the "
                                           f"{kept:,} records before it are kept")
    except (OSError, zlib.error) as error:  # gzip's errors: not gzip, damaged
        raise DataError(f"{path}: cannot read the file: {error}") from None
    except UnicodeDecodeError as error:  # a .json file, which is parsed as a whole
        raise DataError(f"{path}: {error.reason}: {NOT_UTF8}") from None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def iter_hub(name: str, split: str = "train") -> Iterator[tuple[str, int, Any]]:
    """Records of a Hugging Face (`hf:owner/name`) or ModelScope (`ms:owner/name`) data set, streamed."""
    hub, dataset_name = name[:2], name[3:]
    if hub == "hf" and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "") and not _reachable(
            os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        # load_dataset would retry for about half a minute before failing
        raise DataError(f"{name}: the Hugging Face hub is unreachable (no network?); set HF_HUB_OFFLINE=1 to use "
                        "a cached copy, or pass local files")
    try:
        if hub == "hf":
            from datasets import load_dataset

            rows = load_dataset(dataset_name, split=split, streaming=True)
        else:
            try:
                from modelscope.msdatasets import MsDataset
            except ImportError:
                raise DataError(f"{name}: ModelScope data sets need `pip install modelscope`") from None
            rows = MsDataset.load(dataset_name, split=split)
        for number, record in enumerate(rows, 1):
            yield name, number, dict(record)
    except DataError:
        raise
    except Exception as error:  # network or hub failures come in many exception types
        raise DataError(f"{name}: could not load the data set from the hub (no network, or a wrong name?): "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


class ReadProgress:
    """How much of the local input files the run has read, in bytes: the files finished, and where it reads the one
    open now (Linux; elsewhere a file counts when it is finished). Hub data sets have no size and do not count."""

    def __init__(self, sources: str | Path | Iterable[str | Path]):
        local = [raw for raw in path_list(sources) if not str(raw).startswith(HUB_PREFIXES)]
        self.sizes = {str(path): path.stat().st_size for path in list_files(local)}
        self.total = sum(self.sizes.values())
        self.finished, self.current, self.last = 0, None, 0

    def reading(self, source: str) -> None:
        if source != self.current:
            self.finished += self.sizes.get(self.current, 0)
            self.current = source

    def done(self) -> int:
        """Bytes read, never fewer than before (the file read to its end is closed before its last records come)."""
        path = os.path.realpath(self.current) if self.current in self.sizes else None
        position = next((getattr(f, "position", 0) for f in psutil.Process().open_files() if f.path == path), 0)
        self.last = max(self.last, self.finished + min(position, self.sizes.get(self.current, 0)))
        return self.last


def iter_sources(paths: str | Path | Iterable[str | Path], split: str = "train") -> Iterator[tuple[str, int, Any]]:
    """Records of local files/directories and hub names (prefixed hf: or ms:), in the order given."""
    for raw in path_list(paths):
        if str(raw).startswith(HUB_PREFIXES):
            yield from iter_hub(str(raw), split)
        else:
            for path in list_files([raw]):
                yield from iter_records(path)


def record_text(record: Any) -> str:
    """All the natural-language text of a record: a text field, poem lines, or the turns of a conversation."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object or string, got {json_type(record)}")
    for key in TEXT_KEYS:
        value = record.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    parts = []
    for key in ("system", "instruction", "input", "output", "prompt", "question", "completion", "messages",
                "conversations", "chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            value = [value]
        if isinstance(value, list):
            parts += [str(t.get("content", t.get("value", ""))) for t in value if isinstance(t, dict)]
    if not parts:
        present = next((key for key in TEXT_KEYS if key in record), None)
        if present:
            raise DataError(f"'{present}' must be a string or a list of strings, got {json_type(record[present])}")
        raise DataError(f"no text field in record with keys {sorted(record)}")
    return "\n".join(p for p in parts if p)
