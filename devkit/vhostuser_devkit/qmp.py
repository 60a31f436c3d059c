"""A small QMP (QEMU Machine Protocol) client for tests; standard library only.

QMP is JSON over a unix socket: QEMU greets, the client sends
``qmp_capabilities``, then commands ``{"execute": ..., "arguments": ...}``
get a ``{"return": ...}`` or an ``{"error": ...}``; asynchronous events
(``{"event": ...}``) may arrive at any time and are kept in :attr:`events`.

Typical use::

    with QMP.connect(vm.qmp_path) as qmp:
        qmp.command("migrate", uri="unix:/tmp/mig.sock")
        status = qmp.wait_migration()
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from vhostuser.errors import VhostUserError

__all__ = ["QMP", "QMPError"]


class QMPError(VhostUserError, RuntimeError):
    """QEMU answered a command with an error (``.error`` holds its dict)."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error = error
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")


class QMP:
    """One QMP connection (capabilities negotiated by :meth:`connect`)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = b""
        self.events: list[dict] = []
        self.greeting: dict | None = None

    @classmethod
    def connect(cls, path: str | Path, timeout: float = 30.0) -> "QMP":
        """Connects (retrying until QEMU listens) and negotiates capabilities."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(timeout)
        qmp = cls(sock)
        qmp.greeting = qmp._read()
        if "QMP" not in qmp.greeting:
            raise RuntimeError(f"not a QMP greeting: {qmp.greeting}")
        qmp.command("qmp_capabilities")
        return qmp

    # -- wire ------------------------------------------------------------------
    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.strip()
        if not line:
            return self._read()
        return json.loads(line)

    def command(self, name: str, **arguments):
        """Runs a command; returns its ``return`` value or raises :class:`QMPError`."""
        request = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(name, reply["error"])
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """A human monitor command through QMP (for what QMP lacks)."""
        return self.command("human-monitor-command", **{"command-line": command_line})

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        """Waits for (or finds an already received) event ``name``; removes it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"QMP event {name} did not arrive within {timeout:.0f}s")
            self._sock.settimeout(remaining)
            try:
                message = self._read()
            except socket.timeout:
                continue
            if "event" in message:
                self.events.append(message)

    # -- migration ---------------------------------------------------------------
    def wait_migration(self, timeout: float = 120.0, interval: float = 0.2) -> dict:
        """Polls ``query-migrate`` until the status is final; returns the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.command("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration not finished within {timeout:.0f}s: {info}")
            time.sleep(interval)

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``...)."""
        return self.command("query-status")["status"]

    # -- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
