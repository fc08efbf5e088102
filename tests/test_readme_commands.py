"""Every command line the README and docs show parses as written: `higgs-accel ...` (also as `python -m
higgs_accel`, under `accelerate launch` or `torchrun`) with the real parser (flags exist, choices are valid), its
key=value overrides real config keys, and `python -m analysis ...` with analysis' parser. Nothing runs: commands that
name hub ids or the user's files are checked for their syntax only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from analysis.__main__ import build_parser as analysis_parser
from higgs_accel.cli import parse_args
from higgs_accel.config import ConfigError, all_keys, parse_override

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "(", ")"}


def commands_in(text: str) -> list[list[str]]:
    """The argument lists after `higgs-accel` / `-m higgs_accel` (first item "higgs-accel") or `-m analysis` (first
    item "analysis") in the code blocks of ``text``: continuation lines joined, comments and what follows a pipe or a
    redirection left out."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            try:
                words = list(lexer)
            except ValueError:  # not shell (a Python or YAML line with an odd quote)
                continue
            for i, word in enumerate(words):
                if word == "higgs-accel" and (i == 0 or words[i - 1] in SHELL_STOP | {"$", "time", "nohup"}):
                    tool = "higgs-accel"
                elif word == "-m" and i + 1 < len(words) and words[i + 1] in ("higgs_accel", "analysis"):
                    tool = "higgs-accel" if words[i + 1] == "higgs_accel" else "analysis"
                    i += 1
                else:
                    continue
                args = []
                rest = words[i + 1:]
                for k, w in enumerate(rest):
                    redirect = w.isdigit() and k + 1 < len(rest) and rest[k + 1].startswith((">", "<"))  # 2>&1
                    if redirect or w in SHELL_STOP or w.startswith((">", "<", "|", "&", ";")):
                        break
                    args.append(w)
                if not any(a.startswith("[") or a == "..." for a in args):  # a usage synopsis, not a command
                    found.append([tool, *args])
                break
    return found


CASES = [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in commands_in(doc.read_text())]


def test_the_docs_show_commands():
    tools = {cmd[0] for _, cmd in CASES}
    assert tools == {"higgs-accel", "analysis"}, tools
    assert len(CASES) > 20


def problem(cmd: list[str]) -> str | None:
    """Why ``cmd`` (from ``commands_in``) would be refused before it runs, or None."""
    tool, argv = cmd[0], cmd[1:]
    try:
        if tool == "analysis":
            analysis_parser().parse_args(argv)
            return None
        args = parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else f"does not parse (exit {e.code})"  # 0: --help, --version
    except ConfigError as e:  # a mistyped --section.key
        return str(e)
    keys = all_keys()
    for text in getattr(args, "overrides", []):
        key, _ = parse_override(text)
        if key not in keys:
            return f"{key} is no config key"
    return None


def test_the_check_finds_what_a_user_would_meet():
    doc = """```bash
higgs-accel train --preset tiny train.lr=1e-4 2>&1 | tee log   # fine
higgs-accel train --preset tiny --no-such-flag
python -m higgs_accel train --preset tiny train.lrr=1e-4
higgs-accel report runs/demo --format pdf
python -m analysis diff runs/a runs/b --fail-if-worse
accelerate launch -m higgs_accel train --train.lrr 1
```"""
    cmds = commands_in(doc)
    assert [c[:2] for c in cmds] == [["higgs-accel", "train"]] * 3 + [["higgs-accel", "report"], ["analysis", "diff"],
                                                                      ["higgs-accel", "train"]]
    assert cmds[0] == ["higgs-accel", "train", "--preset", "tiny", "train.lr=1e-4"]
    said = [problem(c) for c in cmds]
    assert said[0] is None and all(said[1:]), said
    assert said[2] == "train.lrr is no config key"


@pytest.mark.parametrize("doc, cmd", CASES, ids=[f"{d}:{' '.join(c)[:60]}" for d, c in CASES])
def test_a_documented_command_parses(doc, cmd):
    assert problem(cmd) is None, f"{doc}: `{shlex.join(cmd)}`: {problem(cmd)}"
