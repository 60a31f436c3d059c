"""docs/python-api.md's Python blocks marked ``<!-- doc-test: run -->`` are
run, each on its own in a fresh interpreter and an empty directory with the
repository on PYTHONPATH (so ``examples.*`` imports), like a reader pasting
it into a file. A block fails the test by raising (its asserts) or hanging."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from docblocks import DOCS, REPO, blocks

PAGE = DOCS / "python-api.md"
RUNNABLE = [b for b in blocks(PAGE) if b.name == "run"]


def test_page_has_runnable_blocks():
    assert all(b.lang == "python" for b in RUNNABLE)
    assert len(RUNNABLE) >= 6


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b.line}")
def test_runnable_block(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.text)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where()}: still running after 120 s\n{exc.stderr or ''}")
    assert result.returncode == 0, (f"{block.where()} exited {result.returncode}\n"
                                    f"{result.stdout}\n{result.stderr}")
