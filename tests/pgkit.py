"""A private PostgreSQL cluster for tests and benchmarks, and connection counts.

:class:`Cluster` runs the Debian ``postgresql`` package's own ``initdb`` and
``pg_ctl`` (``/usr/lib/postgresql/<version>/bin``; the newest installed is
used) in a temporary directory: a free port on 127.0.0.1, its unix sockets
in that directory, no fsync (the data is thrown away), ``trust`` for local
connections (nobody else can reach 127.0.0.1's port inside the test). Run as
root, the cluster belongs to the ``postgres`` user, as PostgreSQL requires;
otherwise to the current user. :func:`cluster` skips, saying why, where
``initdb`` is missing (``apt-get install postgresql``; ``.ci/run`` does).

Every database a caller asks for (:meth:`Cluster.create_database`) is new
and empty, so that one server's rows and connections never mix with
another's: the counts below are taken per database.

The counts a test asserts on after its requests:

- :func:`backends`: the cluster's view (``pg_stat_activity``) of one
  database: connections open, and those ``idle in transaction`` (a
  transaction begun and neither committed nor rolled back: a Session that
  was never closed).
- :func:`checked_out`: SQLAlchemy's view (the engine's pool): connections
  handed out and not yet returned.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import typing as t
from dataclasses import dataclass

HOST = "127.0.0.1"
USER = "postgres"
START_TIMEOUT = 60.0
#: Enough for every pool the tests and benchmarks open at once (the load
#: case's pool_size 40 + overflow, a few engines per server, two servers).
MAX_CONNECTIONS = 400


def find_bin_dir() -> str | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with an ``initdb``, or
    the directory of ``initdb`` on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        found.sort(key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
        return os.path.dirname(found[-1])
    on_path = shutil.which("initdb")
    return os.path.dirname(on_path) if on_path else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Backends:
    """``pg_stat_activity`` rows of one database (this counting connection excluded)."""

    total: int
    idle_in_transaction: int
    states: list[tuple[str, str]]  # (application_name, state), for assertion messages


class Cluster:
    """A PostgreSQL cluster of its own: ``start()``, ``stop()``, databases, URLs."""

    def __init__(self, bin_dir: str) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="geventctx-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self._run_as: dict[str, t.Any] = {}
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            entry = pwd.getpwnam(USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self._databases = 0

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [os.path.join(self.bin_dir, argv[0]), *argv[1:]], capture_output=True, text=True,
            timeout=START_TIMEOUT, cwd=self.dir, env={**os.environ, "LC_ALL": "C"}, **self._run_as,
        )
        if done.returncode:
            output = f"{done.stdout}{done.stderr}{self.output()}"
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{output}")

    def output(self) -> str:
        """The server's log, for assertion messages."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f"\n--- PostgreSQL log ---\n{f.read()[-4000:]}"
        except OSError:
            return ""

    def start(self) -> Cluster:
        self._run("initdb", "-D", self.data, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C")
        options = " ".join([
            f"-p {self.port}", f"-h {HOST}", f"-k {self.dir}", "-F",  # -F: fsync off
            "-c synchronous_commit=off", "-c full_page_writes=off",
            f"-c max_connections={MAX_CONNECTIONS}", "-c shared_buffers=32MB",
        ])
        self._run("pg_ctl", "start", "-D", self.data, "-w", "-t", str(int(START_TIMEOUT)), "-l", self.log,
                  "-o", options)
        return self

    def stop(self) -> None:
        """Stop the server (``immediate``: nothing needs saving) and remove its files."""
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run("pg_ctl", "stop", "-D", self.data, "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------

    def connect(self, database: str = "postgres") -> t.Any:
        """A pg8000 connection in autocommit mode (the test process's own)."""
        import pg8000.native

        return pg8000.native.Connection(USER, host=HOST, port=self.port, database=database,
                                        application_name="pgkit")

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; returns its name."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        conn = self.connect()
        try:
            conn.run(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def url(self, database: str, driver: str = "pg8000") -> str:
        """A SQLAlchemy URL for ``database`` through ``driver`` (``pg8000`` or ``psycopg``)."""
        return f"postgresql+{driver}://{USER}@{HOST}:{self.port}/{database}"


def backends(cluster: Cluster, database: str) -> Backends:
    """How many connections ``database`` has open, and how many are idle in a transaction."""
    conn = cluster.connect(database)
    try:
        rows = conn.run(
            "SELECT application_name, coalesce(state, '') FROM pg_stat_activity"
            " WHERE datname = :db AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            db=database,
        )
    finally:
        conn.close()
    states = [(str(name), str(state)) for name, state in rows]
    return Backends(len(states), sum(1 for _, state in states if state.startswith("idle in transaction")), states)


def checked_out(engine: t.Any) -> int:
    """Connections the SQLAlchemy ``engine``'s pool has handed out and not got back."""
    return int(engine.pool.checkedout())


def cluster() -> Cluster:
    """A started cluster, or ``pytest.skip`` saying why there is none."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        import pytest

        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql; .ci/run does)")
    return Cluster(bin_dir).start()
