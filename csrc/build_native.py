"""cffi builder for the C data plane (API, out-of-line mode).

setup.py names this file in ``cffi_modules``, so ``pip install .`` compiles
``vhostuser._native``. ``VHOSTUSER_SANITIZE=1`` builds it with AddressSanitizer
and UBSan (run Python with libasan preloaded; see .ci/run).
"""
import os
import pathlib
import platform

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("vu_*.c"))

CDEF = (HERE / "native.cdef").read_text()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)

# -fno-semantic-interposition, -fvisibility=hidden: calls between our own
# functions go direct, not through the PLT (nothing interposes them, and
# only the module's init function needs exporting; a few % of the net path).
extra_compile = ["-std=gnu11", "-D_GNU_SOURCE", "-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter",
                 "-Wno-missing-field-initializers", "-fno-strict-aliasing",
                 "-fno-semantic-interposition", "-fvisibility=hidden"]
# -mprfchw: __builtin_prefetch(p, 1) becomes PREFETCHW (fetch a line for
# writing) instead of a plain read prefetch; x86 CPUs without it run it as a
# NOP, so the module still runs everywhere.
if platform.machine() in ("x86_64", "AMD64"):
    extra_compile.append("-mprfchw")
extra_link = []
if os.environ.get("VHOSTUSER_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
           "-fno-sanitize-recover=undefined"]
    extra_compile += san + ["-O1"]
    extra_link += san

ffibuilder.set_source(
    "vhostuser._native",
    '#include "vu_all.h"\n',
    sources=SOURCES,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    # vhostuser-blkload's C loop, the package's other extension (setup.py).
    import build_blkload
    build_blkload.ffibuilder.compile(verbose=True)
