"""Every Python block in README.rst and docs/ is valid Python, and every block
marked as a complete program runs and does what its page says.

Blocks are ``.. code-block:: python`` directives. ``:class: program`` marks a
script that must exit 0 by itself; ``:class: server`` marks an application
that serves on ``127.0.0.1:$PORT``: it is started as a real process, asked for
``/`` over a real socket, must answer 200 and print what its child saw, and
must neither warn nor print a traceback.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import time
import typing as t
from pathlib import Path

import pytest
from processkit import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]
DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. code-block:: python[ \t]*$")


class Block(t.NamedTuple):
    page: Path
    line: int
    kind: str  # "program", "server" or "" (a fragment)
    source: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        match = DIRECTIVE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        kind = ""
        body_start = number + 1
        while body_start < len(lines) and lines[body_start].strip().startswith(":"):
            option = lines[body_start].strip()
            if option.startswith(":class:"):
                kind = option.split(":", 2)[2].strip()
            body_start += 1
        body = []
        for text in lines[body_start:]:
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            body.append(text)
        found.append(Block(page, number + 1, kind, textwrap.dedent("\n".join(body)).strip("\n") + "\n"))
    return found


ALL = [block for page in PAGES for block in blocks(page)]
PROGRAMS = [block for block in ALL if block.kind in ("program", "server")]


def test_the_pages_have_complete_programs():
    # The README's quickstart and the docs' quickstart at least.
    assert {block.page.name for block in PROGRAMS} >= {"README.rst", "quickstart.rst"}


@pytest.mark.parametrize("block", ALL, ids=str)
def test_every_python_block_is_valid_python(block: Block) -> None:
    ast.parse(block.source, filename=str(block))


@pytest.mark.parametrize("block", PROGRAMS, ids=str)
def test_every_complete_program_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(block.source)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PYTHONWARNINGS": "always"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if block.kind == "program":
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{block}\n{out}\n{err}"
            assert "Warning" not in err, f"{block}\n{err}"
            return
        body = get_root(port, proc, block)
        assert body, block
        time.sleep(1.0)  # the child prints after the response
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    # What the child saw of the request (its path, GET /), and a teardown
    # that says so comes after it.
    saw = [i for i, line in enumerate(out.splitlines()) if "GET /" in line or "from /" in line]
    assert saw, f"{block}: no child line names the request\n{out}\n{err}"
    teardown = [i for i, line in enumerate(out.splitlines()) if line.startswith("teardown")]
    assert all(i > saw[0] for i in teardown), f"{block}: teardown before the child\n{out}"
    assert "Warning" not in err and "Traceback" not in err, f"{block}\n{err}"


def get_root(port: int, proc: subprocess.Popen[str], block: Block) -> bytes:
    """GET / from the server the block started (waiting for it to listen)."""
    import socket

    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{block} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), f"{block}: {head!r}"
    return body
