"""The notebooks' cells that meet bad input show one line naming the problem, not the traceback through MateConv."""
from __future__ import annotations

import contextlib
import io

import pytest
from IPython.core.interactiveshell import InteractiveShell

from conftest import REPO


def cell_output(source: str) -> str:
    """What Jupyter shows under a cell: the cell run by IPython, the shell that runs a notebook's kernel."""
    shell = InteractiveShell.instance(colors="nocolor")
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        result = shell.run_cell(source)
    assert result.error_in_exec is not None
    return shown.getvalue()


@pytest.mark.parametrize("source, line", [
    ("from mateconv.data.prepare import prepare\nprepare({'pretrain': ['no/such.jsonl']}, 'out/data')",
     "DataError: no/such.jsonl: no such file or directory"),
    ("from mateconv.evaluate.run import evaluate\nevaluate(['out/sft/fianl'], 'out/eval')",
     "EvalError: no model at out/sft/fianl (expected a save_pretrained directory or a training checkpoint)"),
    ("from mateconv.chat import resolve_device\nresolve_device('cuad')",
     "ChatError: device: 'cuad' is not a device; use auto, cpu, cuda or cuda:N"),
])
def test_bad_input_shows_one_line(source, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cell_output(source).strip() == line


@pytest.mark.parametrize("name", ["1.tokenizer_training.ipynb", "2.prepare_data.ipynb", "6.inference_evaluate.ipynb"])
def test_notebooks_are_kept_without_outputs(name):
    """A notebook saved after a run holds its outputs: this machine's paths, data and plots in every clone. They are
    committed clean (Kernel > Restart and Clear Outputs, then save), so a diff shows only their code."""
    import nbformat

    notebook = nbformat.read(REPO / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
