"""A raw-socket HTTP/1.1 client for real servers on 127.0.0.1, and test helpers.

The servers come from geventctx's pytest plugin (``gevent_server``, wrapped
as ``serve`` in conftest.py). The client speaks HTTP by hand so that tests control every byte and every
pause: Content-Length bodies trickled in pieces, chunked bodies, malformed
chunking, and clients that vanish mid-upload. It uses gevent sockets, so the
server and the client share the test's hub. Every wait is bounded.
"""

from __future__ import annotations

import json as _json
import typing as t
from dataclasses import dataclass, field

import gevent
from gevent import socket


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None

    def json(self) -> t.Any:
        return _json.loads(self.body)


def _encode_request(
    method: str, path: str, headers: dict[str, str], body_length: int | None, chunked: bool
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif body_length is not None:
        lines.append(f"Content-Length: {body_length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    chunks: t.Sequence[bytes] | None = None,
    raw_body: bytes | None = None,
    content_length: int | None = None,
    piece: int = 0,
    delay: float = 0.0,
    disconnect_after: int | None = None,
    timeout: float = 15.0,
) -> Response | None:
    """Send one request over a fresh connection and read the whole response.

    - ``body``: sent with Content-Length, in ``piece``-byte writes with
      ``delay`` seconds between them when ``piece`` is set (a slow client).
    - ``chunks``: sent with ``Transfer-Encoding: chunked``, ``delay`` apart.
    - ``raw_body``: bytes sent as they are after the headers (malformed
      chunking); add ``chunked=True`` semantics with a header yourself.
    - ``content_length``: announce this length instead of ``len(body)``.
    - ``disconnect_after``: close the socket after sending that many body
      bytes; returns ``None`` (the client is gone).
    """
    headers = dict(headers or {})
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with gevent.Timeout(timeout, TimeoutError(f"{method} {path}: no response in {timeout}s")):
            if chunks is not None:
                sock.sendall(_encode_request(method, path, headers, None, True))
                for chunk in chunks:
                    if delay:
                        gevent.sleep(delay)
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
            elif raw_body is not None:
                sock.sendall(_encode_request(method, path, headers, None, False) + raw_body)
            else:
                data = body or b""
                length = content_length if content_length is not None else (len(data) if body is not None else None)
                sock.sendall(_encode_request(method, path, headers, length, False))
                limit = len(data) if disconnect_after is None else disconnect_after
                step = piece or max(limit, 1)
                sent = 0
                while sent < limit:
                    if delay and sent:
                        gevent.sleep(delay)
                    sock.sendall(data[sent : min(sent + step, limit)])
                    sent += step
                if disconnect_after is not None:
                    return None
            return _read_response(sock)
    finally:
        sock.close()


def _read_response(sock: t.Any) -> Response:
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        rest = _dechunk(rest)
    return Response(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def wait_for(predicate: t.Callable[[], t.Any], timeout: float = 5.0, message: str = "condition") -> None:
    """Let the hub run until ``predicate()`` is true; fail after ``timeout``."""
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        gevent.sleep(0.005)


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes]], boundary: str = "geventctxBOUNDARY"
) -> tuple[bytes, str]:
    """Encode a multipart/form-data body; returns (body, content type)."""
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    for name, (filename, content) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def pieces(data: bytes, n: int) -> list[bytes]:
    """``data`` cut into ``n`` (nearly) equal pieces, to send one by one."""
    size = -(-len(data) // n)
    return [data[i : i + size] for i in range(0, len(data), size)]


def settle(n: int = 5) -> None:
    """Let pending hub callbacks run, so that a second (wrong) teardown or an
    early (wrong) close would show before the test asserts."""
    for _ in range(n):
        gevent.sleep(0.01)


class CountingInput:
    """The server's wsgi.input, counting the bytes the app takes from it."""

    def __init__(self, inner: t.Any, counter: list[int]) -> None:
        self.inner = inner
        self.counter = counter

    def read(self, *args: t.Any) -> bytes:
        data = self.inner.read(*args)
        self.counter[0] += len(data)
        return data

    def readline(self, *args: t.Any) -> bytes:
        data = self.inner.readline(*args)
        self.counter[0] += len(data)
        return data


def upload(
    server: t.Any, path: str, body: bytes, content_type: str, transfer: str, timeout: float, **kwargs: t.Any
) -> Response | None:
    """POST ``body`` slowly, in 8 pieces 10 ms apart: ``"trickled"`` with a
    Content-Length, or ``"chunked"`` with Transfer-Encoding: chunked."""
    headers = {"Content-Type": content_type}
    if transfer == "trickled":
        return server.request(  # type: ignore[no-any-return]
            "POST", path, headers=headers, body=body, piece=-(-len(body) // 8), delay=0.01, timeout=timeout, **kwargs
        )
    assert transfer == "chunked", transfer
    return server.request(  # type: ignore[no-any-return]
        "POST", path, headers=headers, chunks=pieces(body, 8), delay=0.01, timeout=timeout, **kwargs
    )


class RawClient:
    """One connection driven by hand: send bytes, wait for bytes, see the end.

    For clients that wait for ``100 Continue``, stall mid-body or vanish.
    Every wait is bounded and fails the test with what was received so far.
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received = b""

    def send_head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, n: int, delay: float) -> None:
        """Send ``data`` in ``n`` pieces, ``delay`` seconds apart (a slow client)."""
        for piece in pieces(data, n):
            self.sock.sendall(piece)
            gevent.sleep(delay)

    def _recv(self, timeout: float, what: str) -> bytes:
        stuck = AssertionError(f"nothing more in {timeout:g}s waiting for {what}: {self.received[-300:]!r}")
        try:
            with gevent.Timeout(timeout, stuck):
                return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Wait until ``marker`` was received; returns everything up to and with it."""
        deadline = gevent.get_hub().loop.now() + timeout
        while marker not in self.received:
            left = deadline - gevent.get_hub().loop.now()
            data = self._recv(max(left, 0.001), repr(marker))
            if not data:
                raise AssertionError(f"connection closed before {marker!r}: {self.received[-300:]!r}")
            self.received += data
        head, _, self.received = self.received.partition(marker)
        return head + marker

    def read_response(self, timeout: float = 5.0) -> Response:
        """One response with a Content-Length (what Flask sends)."""
        head = self.read_until(b"\r\n\r\n", timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        deadline = gevent.get_hub().loop.now() + timeout
        while len(self.received) < length:
            data = self._recv(max(deadline - gevent.get_hub().loop.now(), 0.001), "the response body")
            if not data:
                raise AssertionError(f"connection closed mid-response: {self.received!r}")
            self.received += data
        body, self.received = self.received[:length], self.received[length:]
        return Response(status, headers, body)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (within ``timeout``)."""
        try:
            with gevent.Timeout(timeout, False):
                while True:
                    data = self._recv(timeout + 1, "the end")
                    if not data:
                        return True
                    self.received += data
        except OSError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()
