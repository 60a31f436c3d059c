"""Reading the user guide from the tests: fenced code blocks, the
``<!-- doc-test: NAME -->`` markers that name them, and shell commands.

A marker is an HTML comment (invisible when the Markdown is rendered) on
the line right above a fence; the tests find the blocks they run by it.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
EXAMPLES = REPO / "examples"

_FENCE = re.compile(r"^```(\S*)[^\n]*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*([\w.-]+)\s*-->$")

#: our programs -> the module that implements them (run as ``python -m``)
PROGRAMS = {
    "vhostuser-blk": "vhostuser.cli.blk",
    "vhostuser-net": "vhostuser.cli.net",
    "vhostuser-daemon": "vhostuser.cli.daemon",
    "vhostuser-ctl": "vhostuser.cli.ctl",
    "vhostuser-fuzz": "vhostuser.cli.fuzz",
    "vhostuser-replay": "vhostuser.blk.replay",
}


@dataclasses.dataclass
class Block:
    path: Path
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    name: str | None    # from a doc-test marker above the fence

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = Path(path).read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        marker = _MARKER.match(lines[i - 1].strip()) if i > 0 else None
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        out.append(Block(Path(path), start + 1, m.group(1), "\n".join(body) + "\n",
                         marker.group(1) if marker else None))
        i += 1
    return out


def named_block(path: Path, name: str) -> Block:
    found = [b for b in blocks(path) if b.name == name]
    assert len(found) == 1, f"{path}: want one block marked doc-test: {name}, found {len(found)}"
    return found[0]


def commands(text: str) -> list[list[str]]:
    """Shell commands of a block as argv lists: continuation lines joined,
    comments dropped, a trailing ``&`` removed."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[-1] == "&":
            argv = argv[:-1]
        if argv:
            out.append(argv)
    return out


def python_argv(argv: list[str]) -> list[str]:
    """``vhostuser-blk ARGS`` -> ``python -m vhostuser.cli.blk ARGS`` (the
    tests use the checkout's code, whatever is on $PATH)."""
    return [sys.executable, "-m", PROGRAMS[argv[0]], *argv[1:]]
