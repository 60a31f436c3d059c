"""The libFuzzer targets build with clang and run clean for a few seconds.

CI runs fuzz/smoke.sh for a minute per target; this is the quick version
(FUZZ_SMOKE_SECONDS, default 4).
"""
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FUZZ = os.path.join(REPO, "fuzz")
TARGETS = ("ring_blk", "ring_net", "mem_translate")

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds into a scratch directory (a long run may be using fuzz/build)."""
    out = tmp_path_factory.mktemp("fuzz-build")
    subprocess.run([os.path.join(FUZZ, "build.sh"), *TARGETS], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "FUZZ_BUILD_DIR": str(out)})
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean(built, target, tmp_path):
    seconds = os.environ.get("FUZZ_SMOKE_SECONDS", "4")
    # A scratch corpus so the test never grows the checked-in seeds.
    proc = subprocess.run([str(built / target), f"-max_total_time={seconds}",
                           "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
                           str(tmp_path), os.path.join(FUZZ, "corpus", target)],
                          capture_output=True, text=True, timeout=int(seconds) + 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", proc.stderr).group(1))
    assert runs > 1000


def test_packed_base_outside_the_ring_is_refused(built):
    """Bug 1's input (FUZZING.md), passed raw now: the queue must refuse to
    start with it; the target aborts if it starts, or if ASan sees the old
    out-of-bounds ring access."""
    proc = subprocess.run([str(built / "ring_blk"),
                           os.path.join(FUZZ, "reproducers", "ring_blk-packed-base-out-of-ring")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Executed" in proc.stderr


def test_looped_back_frame_over_its_own_buffer(built):
    """A guest that lays its receive buffers over the frames it transmits
    (FUZZING.md, bug 5): the loopback copied them with memcpy on
    overlapping ranges, which ASan reports. Two frames: the first fits one
    receive buffer (the loopback's burst copy), the second takes two
    mergeable ones (vu_net_rx_deliver's scatter)."""
    proc = subprocess.run([str(built / "ring_net"),
                           os.path.join(FUZZ, "reproducers", "ring_net-loopback-over-own-frame")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Executed" in proc.stderr
