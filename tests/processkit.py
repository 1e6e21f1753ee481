"""Real server processes for tests: start, wait until they accept, stop;
and what files this process holds open.

A server is a subprocess on a free port of 127.0.0.1, in its own process
group (master and workers stop together), its output in a temporary file
that failing assertions include. Used by the deployment recipes
(test_deploy.py) and by the body tests against ``gunicorn -k gevent``.
The ``server`` fixture (conftest.py) stops every server a test started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def open_files_in(directory: str) -> list[str]:
    """Files this process has open in ``directory``, unlinked ones too (the
    body's spool files have no name: only /proc/self/fd shows them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory):
            found.append(target)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess, its port and its captured output."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.argv = argv
        self.port = port
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: master and workers stop together
        )

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def context(self) -> str:
        """For assertion messages: the command line and everything it printed."""
        return f"\n--- {' '.join(self.argv)} (port {self.port}) ---\n{self.output()[-6000:]}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before serving{self.context()}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"server not accepting connections after {START_TIMEOUT} s{self.context()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its whole process group if it does not exit in time."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: the group is still ours
            self.proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        self.stop()
        self._log.close()


def servers() -> t.Iterator[t.Callable[..., ServerProcess]]:
    """``start(argv, **env)`` starts ``argv`` (``{port}`` filled in) and waits
    for it; every server started is stopped when the generator is closed."""
    started: list[ServerProcess] = []

    def start(argv: list[str], **env: str) -> ServerProcess:
        port = free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GEVENTCTX_")}
        environ.update(PORT=str(port), PYTHONUNBUFFERED="1", **env)
        proc = ServerProcess([arg.format(port=port) for arg in argv], port, environ)
        started.append(proc)
        proc.wait_ready()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


def executable(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)
