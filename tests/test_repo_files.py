"""The repository's own text files: nothing a merge left behind, no link in the docs that leads nowhere."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO

TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".json", ".ipynb", ".cfg"}


def test_no_merge_conflict_markers():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    marked = [f"{name}:{number}" for name in files if (REPO / name).suffix in TEXT_SUFFIXES and (REPO / name).is_file()
              for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
              if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert len(files) > 50 and not marked, marked


def _markdown_outside_code(path):
    """The file's lines outside ``` fences."""
    inside = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside:
            yield line


def _anchors(path):
    """The heading anchors GitHub makes for a Markdown file: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for line in _markdown_outside_code(path):
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            repeat = 0
            while (anchor := f"{slug}-{repeat}" if repeat else slug) in anchors:  # GitHub numbers a repeated one
                repeat += 1
            anchors.add(anchor)
    return anchors


def test_docs_relative_links_resolve():
    pages = [REPO / "README.md", REPO / "README_zh.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for line in _markdown_outside_code(page):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                linked = (page.parent / file) if file else page
                if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                    broken.append(f"{page.relative_to(REPO)}: {target}")
    assert len(pages) > 10 and not broken, broken


DOC_PAGES = [REPO / "README.md", REPO / "README_zh.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCHERS = {"python", "deepspeed", "torchrun"}
# Shown with stand-ins for its config (`python train.py config.yml`): its --help needs that file.
NO_HELP = {"train.py"}
# Scripts that hand their arguments to a program: (program, its arguments before them).
SCRIPT_PROGRAMS = {"scripts/run_pipeline.sh": ("mateconv.pipeline", ["run"]),
                   "scripts/launch.sh": ("mateconv.pipeline", ["run"])}


def _doc_commands():
    """(page:line, command) for each shell command the docs show: the lines of ```bash blocks (a line ending in `\\`
    joined to the next, comments dropped), indented command lines and inline code spans."""
    for page in DOC_PAGES:
        fence, pending = None, ""
        for number, line in enumerate(page.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = None if fence is not None else stripped[3:]
            elif fence == "bash" or (fence is None and line.startswith("    ") and stripped.split(" ")[0] in LAUNCHERS):
                command = pending + " " + re.split(r"\s#", stripped)[0]
                pending = command[:-1] if command.endswith("\\") else ""
                if not pending:
                    yield f"{page.relative_to(REPO)}:{number}", command
            elif fence is None:
                for span in re.findall(r"`([^`]+)`", line):
                    yield f"{page.relative_to(REPO)}:{number}", span


def _program_calls(command):
    """(program, help arguments, flags) for each `python [-m] PROGRAM --flag ...` (or deepspeed/torchrun PROGRAM) in a
    command line, each pipe stage and `$(...)` on its own."""
    for part in re.split(r"\$\(|[|;&<>()]", command):
        words = [word.lstrip("[") for word in part.split()]
        launched = False
        for index, word in enumerate(words):
            launched = launched or word.rsplit("/", 1)[-1] in LAUNCHERS
            module = word == "-m" and index + 1 < len(words) and words[index + 1].startswith("mateconv.")
            if word in SCRIPT_PROGRAMS:
                (program, mode), rest = SCRIPT_PROGRAMS[word], words[index + 1:]
            elif launched and (module or word.endswith(".py")):
                program, rest = (words[index + 1], words[index + 2:]) if module else (word.removeprefix("./"), words[index + 1:])
                mode = [f"--mode={rest[rest.index('--mode') + 1]}"] if "--mode" in rest[:-1] else []
            else:
                continue
            yield program, mode, {word.split("=")[0] for word in rest if re.match(r"--\w", word)} - {"--help"}
            break


HELP_RUNNER = """
import json, os, runpy, sys
for program, *args in json.loads(sys.argv[1]):
    print("\\0" + program + " " + " ".join(args), flush=True)
    sys.argv = [program, *args, "--help"]
    try:
        if program.startswith("mateconv."):
            runpy.run_module(program, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(program))  # as `python PROGRAM` sets it: sibling imports
            runpy.run_path(program, run_name="__main__")
    except SystemExit:
        pass
    except Exception as error:  # a module there is not: no flags
        print(repr(error))
    sys.stdout.flush()
"""


def test_docs_commands_name_programs_and_flags_that_exist():
    """Every `python PROGRAM --flag` in the docs names a program there is and flags its --help lists."""
    calls = {}
    for where, command in _doc_commands():
        for program, mode, flags in _program_calls(command):
            if program not in NO_HELP and not program.startswith("/") and "|" not in "".join(mode):
                calls.setdefault((program, *mode), []).append((where, flags))
    helps = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(sorted(calls))], cwd=REPO,
                           capture_output=True, text=True, timeout=120).stdout
    help_of = {key.strip(): text for key, _, text in (part.partition("\n") for part in helps.split("\0")[1:])}
    wrong = [f"{where}: {' '.join(key)} {flag}" for key, uses in calls.items() for where, flags in uses
             for flag in sorted(flags) if not re.search(rf"{flag}(?![\w-])", help_of.get(" ".join(key), ""))]
    missing = [" ".join(key) for key in calls if "--" not in help_of.get(" ".join(key), "")]
    assert len(calls) > 10 and not missing and not wrong, (missing, wrong)
