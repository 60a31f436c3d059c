"""Every vhostuser-* command line in the user guide (docs/*.md, the example
files' usage lines) is accepted by that
program's own argument parser: a renamed or removed option fails here.
(The systemd unit's ExecStart is run for real in test_systemd_units.py.)"""
from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest

from docblocks import DOCS, EXAMPLES, PROGRAMS, blocks, commands
from vhostuser.blk import replay
from vhostuser.cli import blk, ctl, daemon, fuzz, net

#: docs/control-socket.md belongs to the management daemon and has its own tests
GUIDE = sorted(p for p in DOCS.glob("*.md") if p.name != "control-socket.md")

PARSE = {
    "vhostuser-blk": lambda argv: blk.parser().parse_args(argv),
    "vhostuser-net": net.parse_args,
    "vhostuser-daemon": lambda argv: daemon.parser().parse_args(argv),
    "vhostuser-ctl": lambda argv: ctl.parser().parse_args(argv),
    "vhostuser-fuzz": lambda argv: fuzz.parser().parse_args(argv),
    "vhostuser-replay": lambda argv: replay.parser().parse_args(argv),
}


def documented_commands():
    """(where, argv) of each of our programs' command lines in the guide."""
    found = []
    for path in GUIDE:
        for b in blocks(path):
            if b.lang not in ("sh", "console", "bash", ""):
                continue
            for argv in commands(b.text):
                if argv[0] in PROGRAMS and "..." not in argv:
                    found.append((b.where(), argv))
    # the usage lines in the examples' docstrings
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"^ {4}(vhostuser-\w+ (?:.*\\\n)*.*)$", text, re.M):
            found.append((path.name, commands(m.group(1))[0]))
    return found


def inline_options():
    """(where, program, option) for `vhostuser-xxx --option ...` code spans
    in the prose, which name options rather than give whole commands."""
    found = []
    for path in GUIDE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for span in re.findall(r"`(vhostuser-(?:blk|net|daemon|ctl|fuzz|replay) [^`]*)`",
                                   line):
                program, *rest = span.split()
                found += [(f"{path.name}:{n}", program, w.split("=")[0]) for w in rest
                          if w.startswith("--")]
            # a bare `--option ...` span: some program of ours must have it
            for span in re.findall(r"`(--[a-z][a-z-]*)[ =`]", line):
                found.append((f"{path.name}:{n}", "any", span))
    return found


def known_options(program: str, *, hidden: bool = False) -> set[str]:
    """The options of a program (with ``hidden``: only the old spellings,
    accepted but hidden from --help)."""
    if program == "any":
        return set().union(*(known_options(p, hidden=hidden) for p in PROGRAMS))
    parser = {"vhostuser-blk": blk.parser, "vhostuser-net": net.parser,
              "vhostuser-daemon": daemon.parser, "vhostuser-ctl": ctl.parser,
              "vhostuser-fuzz": fuzz.parser, "vhostuser-replay": replay.parser}[program]()
    options, todo = set(), [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            if not hidden or action.help is argparse.SUPPRESS:
                options.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                todo += action.choices.values()
    return options


@pytest.mark.parametrize("where,program,option", inline_options())
def test_option_named_in_the_prose_exists(where, program, option):
    assert option in known_options(program), f"{where}: {program} has no {option}"
    current = known_options(program) - known_options(program, hidden=True)
    assert option in current, f"{where}: {option} is an old spelling; use the current name"


def test_the_guide_has_commands_to_check():
    progs = {argv[0] for _, argv in documented_commands()}
    assert {"vhostuser-blk", "vhostuser-net", "vhostuser-daemon", "vhostuser-ctl"} <= progs


@pytest.mark.parametrize("where,argv", documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_documented_command_parses(where, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            PARSE[argv[0]](argv[1:])
        except SystemExit as exc:
            pytest.fail(f"{where}: {' '.join(argv)}\n{err.getvalue()} (exit {exc.code})")


@pytest.mark.parametrize("where,argv", documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_documented_command_uses_the_current_names(where, argv):
    old = known_options(argv[0], hidden=True)
    used = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
    assert not [o for o in used if o in old], \
        f"{where}: old spellings {[o for o in used if o in old]}; use the current names"


@pytest.mark.parametrize("page", GUIDE, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
