"""1.tokenizer_training.ipynb executed for real (nbclient) with small parameters injected."""
from __future__ import annotations

import csv
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SMALL_CORPUS = [SHARED_DATA / "karpathy__char-rnn/data/tinyshakespeare/input.first2000lines.txt",
                SHARED_DATA / "chinese-poetry__chinese-poetry/宋词/ci.song.0.first200.json"]


def run_notebook(path: Path, workdir: Path, parameters: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))  # after its own, as papermill does
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


@pytest.mark.slow
def test_tokenizer_notebook_trains_and_reports(tmp_path):
    # Shared corpus when present; the embedded data (made by the notebook itself) otherwise.
    corpus = [str(p) for p in SMALL_CORPUS if p.exists()] or ["out/raw/embedded"]
    reference = SHARED_DATA / "jingyaogong__minimind/model"
    run_notebook(ROOT / "1.tokenizer_training.ipynb", tmp_path, "\n".join([
        f"corpus = {corpus!r}", "make_embedded_if_missing = True", "vocab_size = 800", "min_frequency = 2",
        "max_chars = None", "out_dir = 'out/tokenizer'", f"reference_tokenizer = {str(reference)!r}",
        f"eval_texts = {{'zh': {[str(SHARED_DATA / 'chinese-poetry__chinese-poetry/论语/lunyu.json')]!r},"
        f" 'en': {[str(SHARED_DATA / 'hiyouga__LLaMA-Factory/data/wiki_demo.first3lines.txt')]!r}}}",
        "eval_max_chars = 20_000"]))
    out = tmp_path / "out/tokenizer"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    report = out / "report"
    assert (report / "compression.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(report / "compression.csv")))
    assert {r["text"] for r in rows} == {"zh", "en"}
    expected = {"mateconv", "minimind"} if (reference / "tokenizer.json").exists() else {"mateconv"}
    assert {r["tokenizer"] for r in rows} == expected
    for row in rows:
        assert float(row["bytes_per_token"]) >= 1.0  # byte-level BPE: every token covers at least one byte
        assert int(row["tokens"]) > 0
