"""MateConv. Every program imports this first, so a Ctrl-C (`kill -2`) while a program's imports still load (torch,
transformers, DeepSpeed: seconds, before mateconv.terminal.run_main can catch it) ends it with run_main's one line
instead of a traceback through the importing library. Python then ends the process by SIGINT, as a shell reports it."""
import os
import sys


def _interrupted_in_one_line(kind, value, traceback, previous=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print(f"{os.path.basename(sys.argv[0]) or 'python'}: interrupted", file=sys.stderr, flush=True)
    else:
        previous(kind, value, traceback)


sys.excepthook = _interrupted_in_one_line
