"""Real Celery workers and brokers for tests: start, wait until ready, stop.

A worker is ``celery -A celeryapp worker`` in a subprocess (processkit's
:class:`~processkit.ServerProcess`: its own process group, its output kept
for failing assertions), on a broker of its own: kombu's filesystem
transport in a temporary folder (no service needed), or a real
``redis-server`` that :func:`redis_server` starts on a free loopback port
when the binary is on PATH. The module fixtures of test_celery.py stop
every worker and server they start.

The filesystem transport's known trap: kombu writes a message file in place
(open, then write), so a worker in another process can list the file and
move it away before its bytes are there, read an empty message and lose the
task. :class:`AtomicFilesystemTransport` writes each message under a name
the worker does not look at, then renames it into place (atomic on one
filesystem): the worker sees whole messages or none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import typing as t
import uuid
from pathlib import Path

import pytest
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps
from processkit import BIN, HOST, ROOT, ServerProcess, free_port

READY_TIMEOUT = 30.0


class AtomicChannel(filesystem.Channel):  # type: ignore[misc]
    def _put(self, queue: str, payload: t.Any, **kwargs: t.Any) -> None:
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # "part-<uuid>" never matches the worker's "<queue>.msg" filter.
        partial = os.path.join(self.data_folder_out, f"part-{uuid.uuid4()}")
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.rename(partial, final)


class AtomicFilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport, each message written whole, then renamed
    into place (the module docstring says why)."""

    Channel = AtomicChannel


def fs_broker(workdir: Path) -> dict[str, t.Any]:
    """Celery settings for a filesystem broker in ``workdir``."""
    for name in ("broker", "processed", "control"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport": "celerykit:AtomicFilesystemTransport",
        "broker_transport_options": {
            "data_folder_in": str(workdir / "broker"),
            "data_folder_out": str(workdir / "broker"),
            "processed_folder": str(workdir / "processed"),
            "control_folder": str(workdir / "control"),
            "store_processed": True,  # moved to processed/, not to the shared /tmp
            "polling_interval": 0.02,
        },
    }


class RedisServer:
    """A ``redis-server`` on a free port of 127.0.0.1, nothing saved to disk."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.proc = ServerProcess(
            [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "no"],
            self.port, dict(os.environ),
        )
        self.proc.wait_ready()
        self.url = f"redis://{HOST}:{self.port}"

    def stop(self) -> None:
        self.proc.close()


def redis_server(workdir: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server; .ci/run does)")
    return RedisServer(binary, workdir)


class Worker:
    """A ``celery -A celeryapp worker`` subprocess and the settings of its
    broker (the publishing app in the test uses the same)."""

    def __init__(self, pool: str, concurrency: int, workdir: Path, broker: str = "filesystem") -> None:
        self.workdir = workdir
        self.pool = pool
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / "ready"
        self.config = {"broker": broker, "workdir": str(workdir)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GEVENTCTX_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
            PYTHONUNBUFFERED="1",
            CELERYAPP_CONFIG=json.dumps(self.config),
        )
        argv = [
            str(BIN / "celery"), "-A", "celeryapp", "worker", "-P", pool, "-c", str(concurrency),
            "--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "warning",
            "-n", f"{pool}-{uuid.uuid4().hex[:6]}@%h",
        ]
        self.proc = ServerProcess(argv, 0, env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready_file.exists():
            if self.proc.proc.poll() is not None:
                pytest.fail(f"worker exited with {self.proc.proc.returncode} before ready{self.proc.context()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready after {READY_TIMEOUT} s{self.proc.context()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.proc.output()

    def context(self) -> str:
        return self.proc.context()

    def close(self) -> None:
        """Celery's warm shutdown (SIGTERM); processkit kills the group if it hangs."""
        self.proc.close()


def close_all(workers: t.Iterable[Worker]) -> None:
    """Stop workers together: a worker notices SIGTERM only between two
    waits for messages (about 3 s on the filesystem transport), so the
    signals go out first and the waits overlap."""
    workers = list(workers)
    for worker in workers:
        if worker.proc.proc.poll() is None:
            worker.proc.proc.terminate()
    for worker in workers:
        worker.close()
