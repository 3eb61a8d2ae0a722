"""The base of the errors that bad input or settings cause."""
from __future__ import annotations


class InputError(Exception):
    """Bad input or settings; the message names the problem and is the one line to show. A notebook cell that raises
    one shows that line: Jupyter's kernel (IPython) uses `_render_traceback_` in place of the traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]
