"""What every benchmark module returns, and how run.py prints it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing as t


class Row(t.NamedTuple):
    """One measured line of a benchmark table."""

    name: str
    value: float
    unit: str
    #: value / the module's baseline, or None for rows without one.
    ratio: float | None = None
    #: e.g. "P1 <=1.2x bare"; empty for rows without a budget.
    budget: str = ""
    #: True PASS, False MISS, None no budget.
    ok: bool | None = None
    note: str = ""


def format_table(rows: t.Sequence[Row]) -> str:
    """A plain-text table of ``rows``."""
    header = ("variant", "median", "vs base", "budget", "verdict", "note")
    lines = [
        (
            r.name,
            f"{r.value:.2f} {r.unit}",
            "" if r.ratio is None else f"{r.ratio:.3f}x",
            r.budget,
            {True: "PASS", False: "MISS", None: ""}[r.ok],
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'>' if i in (1, 2) else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


def read_response(sock: t.Any, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """One Content-Length response from a keep-alive ``sock``.

    ``buf`` holds bytes already received; returns (head, body, the bytes
    received past this response).
    """
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock)
    head, _, buf = buf.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match is None:
        raise ValueError(f"no Content-Length in {head!r}")
    length = int(match.group(1))
    while len(buf) < length:
        buf += _recv(sock)
    return head, buf[:length], buf[length:]


def _recv(sock: t.Any) -> bytes:
    chunk: bytes = sock.recv(65536)
    if not chunk:
        raise ConnectionError("server closed the connection")
    return chunk


def start_server(script: str, *args: str) -> tuple[subprocess.Popen[str], t.Any]:
    """Run ``script`` (a file next to this one) as a server process; returns
    it and the JSON of its first line (ports, ...). Killed if it fails."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(here, script), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process did not start: {proc.communicate(timeout=10)[1]}")
        return proc, json.loads(line)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def stop_server(proc: subprocess.Popen[str]) -> str:
    """End a server process of :func:`start_server` (stdin EOF, then
    terminate, then kill, 5 s each); its stderr."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read() if proc.stderr is not None else ""


def serve_until_stdin_closes(servers: t.Iterable[t.Any], lifetime: float, stop_timeout: float) -> None:
    """In a server process: serve until the driver closes our stdin (or
    ``lifetime`` seconds pass), then stop every server."""
    import gevent
    import gevent.os

    def stdin_closed() -> None:
        gevent.os.make_nonblocking(0)
        while gevent.os.nb_read(0, 4096):
            pass

    gevent.spawn(stdin_closed).join(timeout=lifetime)
    for server in servers:
        server.stop(timeout=stop_timeout)
