"""A crash-consistency recorder: a back-end that passes every request to
another Python back-end and logs what changes the disk.

Every write (with its data), write-through write, write-zeroes, discard and
flush is logged when it starts and again when it finishes, in the order
seen (``vhostuser.blk.recordlog`` has the format). From that log and a copy
of the disk as it was when recording began, ``vhostuser-replay`` rebuilds
the states a power cut may leave behind under the virtio write-cache
contract, to check each with the file system's own tools.

    base = copy of disk.img
    device = BlkDevice(RecordingBackend(MyBackend("disk.img"), "disk.rlog"))

or from the command line, the recorded back-end named like ``--backend``
and the remaining options given to it::

    vhostuser-blk --socket-path /tmp/d.sock --backend vhostuser.blk.record:RecordingBackend \\
        --backend-opt log=disk.rlog --backend-opt backend=examples.sparse_dict:SparseDictDisk \\
        --backend-opt size=67108864

Reads go straight through, unlogged.
"""
from __future__ import annotations

import importlib

from .backends import BackendError, BlockBackend, awaitable_result
from .recordlog import Kind, LogWriter


class RecordingBackend(BlockBackend):
    """Wraps ``backend`` (a BlockBackend, or ``"module:Class"`` built with
    ``options``) and appends what it is asked to do to the log at ``log``
    (created, or emptied)."""

    def __init__(self, backend: BlockBackend | str, log: str, **options):
        if isinstance(backend, str):
            backend = _build(backend, options)
        elif options:
            raise TypeError(f"options {sorted(options)} are for a back-end named by a string")
        if not isinstance(backend, BlockBackend):
            raise TypeError(f"not a Python block back-end: {backend!r}")
        self.inner = backend
        self.read_only = backend.read_only
        self.log_path = log
        self._log = LogWriter(log, backend.size())

    # -- pass-through ---------------------------------------------------------------
    def size(self) -> int:
        return self.inner.size()

    def read(self, offset, bufs):
        return self.inner.read(offset, bufs)

    def lifetime(self):
        return self.inner.lifetime()

    def supports(self, method: str) -> bool:
        return self.inner.supports(method)

    # -- logged -------------------------------------------------------------------
    def write(self, offset, bufs):
        return self._data_call(Kind.WRITE, self.inner.write, offset, bufs)

    def write_fua(self, offset, bufs):
        return self._data_call(Kind.FUA, self.inner.write_fua, offset, bufs)

    def write_zeroes(self, offset, length, unmap):
        op = self._log.start(Kind.ZEROES, offset, length)
        return self._finish(op, self.inner.write_zeroes, offset, length, unmap)

    def discard(self, offset, length):
        op = self._log.start(Kind.DISCARD, offset, length)
        return self._finish(op, self.inner.discard, offset, length)

    def flush(self):
        op = self._log.start(Kind.FLUSH)
        return self._finish(op, self.inner.flush)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._log.close()

    def _data_call(self, kind: Kind, method, offset, bufs):
        # Copied before the back-end runs: it is what the guest asked to write.
        data = b"".join(bytes(b) for b in bufs) if len(bufs) != 1 else bytes(bufs[0])
        op = self._log.start(kind, offset, len(data), data)
        return self._finish(op, method, offset, bufs)

    def _finish(self, op: int, method, *args):
        """Runs the call; its DONE record follows its end, awaited if async."""
        try:
            outcome = method(*args)
        except BaseException:
            self._log.done(op, False)
            raise
        waiting = awaitable_result(outcome)
        if waiting is not None:
            return self._finish_async(op, waiting)
        self._log.done(op, True)
        return outcome

    async def _finish_async(self, op: int, outcome):
        try:
            result = await outcome
        except BaseException:
            self._log.done(op, False)
            raise
        self._log.done(op, True)
        return result


def _build(spec: str, options: dict) -> BlockBackend:
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise BackendError(f"the recorded back-end is MODULE:CLASS, not {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"recorded back-end {spec}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, BlockBackend)):
        raise BackendError(f"recorded back-end {spec}: not a BlockBackend subclass")
    return cls(**options)
