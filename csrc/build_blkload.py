"""cffi builder for vhostuser-blkload's C loop (API, out-of-line mode).

setup.py names this file in ``cffi_modules`` next to build_native.py, so a
wheel carries ``vhostuser._blkload`` compiled and the ``vhostuser-blkload``
console script needs neither the source tree nor a compiler at run time.
``python3 csrc/build_native.py`` (run from the checkout's root) builds it in
place too.
"""
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "blkload" / "loadgen.cdef").read_text())
ffibuilder.set_source(
    "vhostuser._blkload",
    '#include "loadgen.c"\n',
    include_dirs=[str((HERE / "blkload").relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-g", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
