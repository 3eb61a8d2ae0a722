"""MateConv. Every program imports this first, so a Ctrl-C (`kill -2`) while a program's imports still load (torch,
transformers, DeepSpeed: seconds, before mateconv.terminal.run_main can catch it) ends it with run_main's one line
instead of a traceback through the importing library. Python then ends the process by SIGINT, as a shell reports it."""
import os
import sys


def program_name() -> str:
    """The running program as it was started: `mateconv.serve` for `python -m mateconv.serve` (not `__main__.py`),
    else the script's file name (`4.pretrain.py`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) or "python"


def _interrupted_in_one_line(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print(f"{program_name()}: interrupted", file=sys.stderr, flush=True)
    else:
        previous(kind, value, traceback)


sys.excepthook = _interrupted_in_one_line
