"""Builds loadgen.c with cffi (API mode) on first use, into a cache dir.

Not part of the vhostuser package's build: the load generator is a bench
tool. The module is cached under $VHOSTUSER_BENCH_CACHE (default
~/.cache/vhostuser-bench) in a directory named after a hash of the C source
and the cdef, so editing loadgen.c rebuilds it and nothing stale is loaded.

    python bench/blkload/build.py      # build now (else: first import)
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "loadgen.c"
MODULE = "_vhu_blkload"

CDEF = """
#define LG_HIST 4096
struct lg_queue {
    uint64_t desc_uva, avail_uva, used_uva;
    uint32_t size;
    int32_t kick_fd, call_fd;
    uint64_t hdr_uva, hdr_gpa;
    uint64_t st_uva, st_gpa;
    uint64_t data_uva, data_gpa;
};
struct lg_config {
    int32_t nq, qd;
    uint32_t bs;
    int32_t random, read_pct, event_idx, spin, verify;
    uint64_t capacity, start, max_ios;
    uint32_t flush_every;
    double seconds;
    uint64_t seed;
};
struct lg_result {
    uint64_t ios, reads, writes, bytes, errors, verify_errors;
    uint64_t flushes;
    double flush_lat_sum;
    uint64_t kicks, sleeps, calls;
    int32_t stalled;
    double elapsed;
    double lat_min, lat_max, lat_sum;
    uint64_t hist[LG_HIST];
};
int lg_run(struct lg_queue *queues, const struct lg_config *cfg, struct lg_result *res);
double lg_percentile(const struct lg_result *r, double pct);
void lg_stamp(void *buf, uint64_t first_sector, uint64_t nsectors);
int64_t lg_warm(int fd, uint64_t size, uint64_t *resident);
"""


def cache_dir() -> Path:
    base = Path(os.environ.get("VHOSTUSER_BENCH_CACHE",
                               Path.home() / ".cache" / "vhostuser-bench"))
    digest = hashlib.sha256(SOURCE.read_bytes() + CDEF.encode()
                            + sys.version.encode()).hexdigest()[:16]
    return base / f"blkload-{digest}"


def build(verbose: bool = False) -> Path:
    """Compiles the module (if not cached); returns the directory holding it."""
    out = cache_dir()
    if any(out.glob(f"{MODULE}*.so")):
        return out
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE.read_text(),
                   extra_compile_args=["-O2", "-g", "-Wall", "-Wno-unused-function"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tmp"
    ffi.compile(tmpdir=str(tmp), verbose=verbose)
    # The .so lands in tmpdir; move it next to nothing else so a half-built
    # directory is never mistaken for a finished one.
    for so in tmp.glob(f"{MODULE}*.so"):
        os.replace(so, out / so.name)
    return out


def load():
    """The compiled module (ffi, lib), building it first if needed."""
    out = build()
    so = next(out.glob(f"{MODULE}*.so"))
    spec = importlib.util.spec_from_file_location(MODULE, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


if __name__ == "__main__":
    print(build(verbose=True))
