"""Reading the user's raw files (mateconv/data/readers.py) as HF `load_dataset("json")`, LLaMA-Factory and MiniMind
read them: byte order marks, JSON Lines under a .json name, file:line positions, plain text modes."""
from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pytest

from mateconv.data import DataError
from mateconv.data import readers
from mateconv.data.readers import BadLine, iter_records

BOM = "\ufeff"
FIRST, SECOND = {"text": "The river runs past the old mill."}, {"text": "The mill wheel turns all day."}


def numbered_records(path: Path) -> list[tuple[int, object]]:
    return [(number, record) for _, number, record in iter_records(path)]


def jsonl(records: list) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.json", "data.json.gz"])
def test_a_byte_order_mark_is_dropped(tmp_path, name):
    text = BOM + (jsonl([FIRST, SECOND]) if ".jsonl" in name else json.dumps([FIRST, SECOND]))
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert [record for _, record in numbered_records(path)] == [FIRST, SECOND]


def test_a_byte_order_mark_is_not_part_of_the_first_text_line(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(BOM + "First line of the book.\nSecond line.\n", encoding="utf-8")
    assert numbered_records(path) == [(1, {"text": "First line of the book."}), (2, {"text": "Second line."})]



def test_files_joined_each_with_its_byte_order_mark_lose_no_line(tmp_path):
    """`cat a.jsonl b.jsonl > all.jsonl` of two files a Windows editor saved: the second mark opens a line inside."""
    path = tmp_path / "all.jsonl"
    path.write_text(BOM + jsonl([FIRST]) + BOM + jsonl([SECOND]), encoding="utf-8")
    assert numbered_records(path) == [(1, FIRST), (2, SECOND)]

def test_json_lines_under_a_json_name_are_read_line_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(FIRST) + "\n{not json\n\n" + json.dumps(SECOND) + "\n")
    numbered = numbered_records(path)
    assert [(number, type(record)) for number, record in numbered] == [(1, dict), (2, BadLine), (4, dict)]
    assert [record for _, record in numbered if isinstance(record, dict)] == [FIRST, SECOND]


@pytest.mark.parametrize("read_bytes", [1 << 20, 7], ids=["one-read", "many-reads"])
def test_json_array_records_are_numbered_by_the_line_they_start_on(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(readers, "JSON_READ_BYTES", read_bytes, raising=False)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([FIRST, SECOND, 12345], indent=2))  # '[', then lines 2-4, 5-7, 8
    assert numbered_records(path) == [(2, FIRST), (5, SECOND), (8, 12345)]


def test_pretty_objects_one_after_another_are_one_clear_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{\n  \"text\": \"a\"\n}\n{\n  \"text\": \"b\"\n}\n")
    with pytest.raises(DataError, match=f"^{path}:4: malformed JSON: "):
        numbered_records(path)


@pytest.mark.parametrize("read_bytes", [1 << 20, 7], ids=["one-read", "many-reads"])
@pytest.mark.parametrize("content, expected", [
    ("[\n" + json.dumps(FIRST) + ",\n{\"text\": 1,}\n,\n" + json.dumps(SECOND) + "\n]",
     [(2, FIRST), (3, "array element 2: malformed JSON: Expecting property name"), (5, SECOND)]),
    ("[\n" + json.dumps(FIRST) + ",\n{\"a\": [1, 2},\n" + json.dumps(SECOND) + "\n]",
     [(2, FIRST), (3, "array element 2: malformed JSON: Expecting ',' delimiter"), (4, SECOND)]),
    ("[\n" + json.dumps(FIRST) + "\n" + json.dumps(SECOND) + "\n]",
     [(3, "array element 1: malformed JSON: Extra data")]),
    ("[\n" + json.dumps(FIRST) + "\n]\n]", [(2, FIRST), (4, "malformed JSON: Extra data after the array")]),
    ("[\n" + json.dumps(FIRST) + ",\n{\"text\": \"cut",
     [(2, FIRST), (3, "the file ends inside array element 2, before the array's closing ']' (cut short?)")]),
    ("[\n" + json.dumps(FIRST) + ",\n" + json.dumps(SECOND),
     [(2, FIRST), (3, SECOND), (3, "the file ends before the array's closing ']' (cut short?)")]),
], ids=["bad-element", "unbalanced-brackets", "missing-comma", "after-the-array", "cut-short", "cut-before-the-end"])
def test_a_malformed_array_element_is_a_bad_line_and_the_others_are_kept(tmp_path, monkeypatch, read_bytes, content,
                                                                         expected):
    monkeypatch.setattr(readers, "JSON_READ_BYTES", read_bytes)
    path = tmp_path / "data.json"
    path.write_text(content)
    read = [(number, record.error if isinstance(record, BadLine) else record)
            for number, record in numbered_records(path)]
    assert [number for number, _ in read] == [number for number, _ in expected]
    assert all(got == want or str(got).startswith(str(want)) for (_, got), (_, want) in zip(read, expected))


def test_one_top_level_object_is_one_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [FIRST, SECOND]}, indent=2))
    assert numbered_records(path) == [(1, {"data": [FIRST, SECOND]})]


def article(number: int, length: int) -> str:
    return f"Article {number}: " + "the river runs past the old mill " * (length // 33)


@pytest.mark.parametrize("count, length", [(100, 100), (5, 5000)], ids=["a-stray-blank-line", "long-lines"])
def test_one_document_per_line_stays_line_mode_despite_a_blank_line(tmp_path, count, length):
    lines = [article(number, length) for number in range(count)]
    path = tmp_path / "articles.txt"
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    assert numbered_records(path) == [(number if number < 3 else number + 1, {"text": line})
                                      for number, line in enumerate(lines, 1)]


def test_blank_line_separated_verse_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "verse.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n")
    assert numbered_records(path) == [(1, {"text": "First Citizen:\nBefore we proceed any further, hear me speak."}),
                                      (4, {"text": "All:\nSpeak, speak."})]


def test_tinyshakespeare_is_one_document_per_speech(shared_data):
    path = shared_data("karpathy__char-rnn/data/tinyshakespeare/input.first2000lines.txt")
    speeches = numbered_records(path)
    assert len(speeches) == path.read_text().count("\n\n") + 1
    assert speeches[1] == (4, {"text": "All:\nSpeak, speak."})


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json.gz", "data.txt.gz"])
@pytest.mark.parametrize("size", [2000, 20])
def test_a_gzip_cut_short_keeps_its_records_and_reports_the_cut(tmp_path, name, size):
    """A download cut short: every whole record before the cut is kept, the cut is one bad line saying how many were
    kept. Before, a .json.gz array (and a small .jsonl.gz or .txt.gz, one read of gzip) was skipped whole."""
    records = [{"text": f"Document {i} about the river and the mill."} for i in range(size)]
    text = {"data.jsonl.gz": jsonl(records), "data.json.gz": json.dumps(records, indent=1),
            "data.txt.gz": "".join(f"{record['text']}\n" for record in records)}[name]
    packed = gzip.compress(text.encode())
    path = tmp_path / name
    path.write_bytes(packed[:len(packed) * 3 // 4])
    *kept, (number, cut) = numbered_records(path)
    assert 0 < len(kept) < size and [record for _, record in kept] == records[:len(kept)]
    assert number > kept[-1][0] and cut.error == ("the compressed file is cut short here (an interrupted download?); "
                                                  f"the {len(kept):,} records before it are kept")


@pytest.mark.parametrize("name, content", [("plain.jsonl.gz", b'{"text": "not compressed"}\n'),
                                           ("cut.json.gz", gzip.compress(json.dumps([FIRST] * 500).encode())[:12]),
                                           ("web.parquet", b"PAR1 not a parquet file")],
                         ids=["not_gzip", "gzip_cut_short", "not_parquet"])  # ids: gzip's bytes hold the time
def test_a_damaged_file_is_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: (cannot read the file|not a readable parquet file): "):
        numbered_records(path)


def zipped(name: str, text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
    return buffer.getvalue()


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, said", [
    ("c4.jsonl", gzip.compress(jsonl([FIRST, SECOND] * 200).encode()), "gzip-compressed data, not text: decompress"),
    ("export.json", zipped("export.json", json.dumps([FIRST])), "a zip archive, not text: unzip it"),
    ("web.txt", parquet_bytes([FIRST, SECOND]), "a parquet file, not text: end its name with .parquet"),
], ids=["gzip", "zip", "parquet"])
def test_a_binary_file_under_a_text_name_is_one_clear_error(tmp_path, name, content, said):
    """A download saved without its .gz (or a zip, a table) was read as text: its bytes were reported as GBK lines
    ('iconv -f GBK ...') or as records of no known shape ('expected a JSON object, got int')."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: {said}"):
        numbered_records(path)


def test_a_text_that_begins_like_a_parquet_file_is_read_as_text(tmp_path):
    """Only a parquet file's first bytes with its first page header after 'PAR1' are refused as one."""
    path = tmp_path / "notes.txt"
    path.write_text("PAR1 of the notes: the river.\n\nPAR2: the mill.\n")
    texts = [record["text"] for _, record in numbered_records(path)]
    assert texts == ["PAR1 of the notes: the river.", "PAR2: the mill."]


@pytest.mark.parametrize("name", ["notes.txt", "data.jsonl", "data.jsonl.gz"])
def test_a_line_that_is_not_utf8_is_a_bad_line_not_replacement_characters(tmp_path, name):
    lines = ["河流流过古老的磨坊。", "磨坊的水车整天转动。", "晚上河面很安静。"]
    encoded = [(json.dumps({"text": line}, ensure_ascii=False) if ".jsonl" in name else line).encode()
               for line in lines]
    encoded[1] = encoded[1].decode().encode("gbk")  # one line saved from a GBK editor
    content = b"\n".join(encoded) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    read = numbered_records(path)
    assert [(number, record) for number, record in read if not isinstance(record, BadLine)] == \
        [(1, {"text": lines[0]}), (3, {"text": lines[2]})]
    [(number, bad)] = [(number, record) for number, record in read if isinstance(record, BadLine)]
    assert number == 2 and "not UTF-8 text; save the file as UTF-8" in bad.error


@pytest.mark.parametrize("read_bytes", [1 << 20, 7], ids=["one-read", "many-reads"])
@pytest.mark.parametrize("name", ["alpaca_zh.json", "alpaca_zh.jsonl"])
@pytest.mark.parametrize("inside", [0, 1, 2])  # bytes into a 3-byte character where the download stopped
def test_a_chinese_file_cut_inside_a_character_keeps_its_records(tmp_path, monkeypatch, read_bytes, name, inside):
    """An interrupted download of a Chinese .json array ends inside a character two times in three: the whole file
    was refused as 'not UTF-8 text ... (from GBK ...)', and stage 2 stopped on it (a .jsonl lost only its last line,
    but that line was said to be GBK)."""
    records = [{"instruction": f"第{i}个问题：河流流过古老的磨坊吗？", "output": "是的。"} for i in range(4)]
    text = (json.dumps(records, ensure_ascii=False, indent=1) if name.endswith(".json") else
            "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    monkeypatch.setattr(readers, "JSON_READ_BYTES", read_bytes)  # reads that end inside characters too
    data = text.encode()
    cut = data.index("第3".encode()) + len("第3个问题：河流".encode()) + inside
    path = tmp_path / name
    path.write_bytes(data[:cut])
    *kept, last = [record for _, _, record in iter_records(path)]
    assert kept == records[:3]  # the cut is one bad line
    assert isinstance(last, BadLine) and "GBK" not in last.error
    assert "cut short" in last.error or (inside == 0 and "malformed JSON" in last.error)


def test_a_json_array_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "alpaca_gbk.json"
    path.write_bytes(json.dumps([{"instruction": "你好", "output": "您好"}], ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match=rf"^{path}: invalid .* not UTF-8 text"):
        numbered_records(path)


@pytest.mark.parametrize("name", ["alpaca.jsonl", "alpaca.jsonl.gz"])
def test_a_json_array_under_a_jsonl_name_is_read_as_an_array(tmp_path, name):
    text = BOM + "\n" + json.dumps([FIRST, SECOND], indent=2)
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert numbered_records(path) == [(3, FIRST), (6, SECOND)]


def test_the_tokenizer_text_of_a_record_holds_every_field_the_formats_read():
    assert readers.record_text({"prompt": "Capital of France?", "completion": "Paris."}) == "Capital of France?\nParis."
    assert readers.record_text({"system": "Be brief.", "question": "Capital?", "chosen": "Paris.",
                                "rejected": "Rome."}) == "Be brief.\nCapital?\nParis.\nRome."


def test_a_tokenizer_kept_in_a_corpus_directory_is_not_read_as_text(tmp_path):
    """`python -m mateconv.tokenizer --corpus DIR` (and stage 2's --raw_dir, 3.dataset.py) on a directory that also
    holds a tokenizer: its merges.txt was trained on as text and its JSON files read as records."""
    (tmp_path / "text.txt").write_text("The river runs past the old mill.\n")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\n")
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    assert readers.list_files([tmp_path]) == [tmp_path / "text.txt"]
    assert readers.list_files([tmp_path / "tokenizer" / "merges.txt"]) == [tmp_path / "tokenizer" / "merges.txt"]
