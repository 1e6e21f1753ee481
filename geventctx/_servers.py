"""What the shared body must know of the WSGI servers it runs under.

The rule: everything server-specific the body does lives here, and each
function does nothing on a server it does not know (the server's own
behaviour then holds, as without geventctx).

- :func:`source_for` reads what has arrived, as soon as something has:
  gevent.pywsgi's input with one socket read of up to 64 KiB (after it sent
  ``100 Continue``, as its own read would); other servers' inputs return
  only once they have the bytes asked for, so they are asked for at most
  :data:`SMALL_READ` bytes at a time.
- :func:`progress` says how far a framework read a body stream itself.
- :func:`translate` turns a server's read error into Werkzeug's HTTP error
  a client should get (400 for bad chunking or a client gone).
- :func:`close_connection` ends a connection whose input is out of step (a
  read was cut short: a timeout, a killed reader, a body over the limit), so
  the server can neither block discarding the rest nor read the rest of the
  body as the next request.

.. versionadded:: 0.2
"""

from __future__ import annotations

import socket as _stdlib_socket
import sys
import typing as t

from .body_plan import CHUNK

__all__ = ["Source", "SourceTimeout", "source_for", "progress", "translate", "close_connection", "SMALL_READ", "CHUNK"]

#: The largest read asked of a server input that blocks until it has it all.
SMALL_READ = 8 * 1024



class Source:
    """How the pump reads a server's input.

    ``read(wanted)`` returns some bytes (``b""`` at the end) as soon as some
    arrived, ideally ``wanted`` or more; ``lossless`` is True when a read
    interrupted while it waits (a timeout, a kill) loses nothing, so the
    pump may read ahead of its readers and stop quietly.
    """

    lossless = False
    #: True once a :meth:`read_exactly` was interrupted after it took bytes.
    lost = False

    def __init__(self, raw: t.Any) -> None:
        self.raw = raw

    def read(self, wanted: int) -> bytes:
        # A server input that reads until it has all it was asked for.
        return self.raw.read(min(wanted, SMALL_READ))  # type: ignore[no-any-return]

    def read_exactly(self, size: int, seconds: float | None) -> bytes | None:
        """``size`` bytes (fewer only at the end of the body), as the
        server's own ``read(size)`` gives them, each wait for the client
        bounded by ``seconds`` (:class:`SourceTimeout`); ``None`` if this
        input cannot bound its waits so (read with :meth:`read` instead)."""
        return None

    def close(self) -> None:
        """The body is done with this input: free what reading made."""


class SourceTimeout(Exception):
    """No byte arrived for the seconds given to :meth:`Source.read_exactly`."""


class _PywsgiLength(Source):
    """gevent.pywsgi's Input for a Content-Length body: one socket read of
    what has arrived (``read1``), counted in the Input as its own read would
    (so it discards exactly the rest at the end), after ``100 Continue``.

    ``read_exactly`` is the Input's buffered file's own ``readinto``, with a
    duplicate of the connection's socket swapped in under it for the call:
    the duplicate's timeout bounds each wait for a byte, as a gevent
    socket's does (a timer only when it must wait), and the connection's
    own socket — which the response is written through — keeps its own.
    Interrupted after it took bytes, it says they were lost (:attr:`lost`).
    """

    lossless = True
    _reader: t.Any = None  # the duplicate socket, made at the first read_exactly
    _socket_file: t.Any = None  # the buffered file's socket file, whose socket it swaps
    _sock: t.Any = None

    def read(self, wanted: int) -> bytes:
        raw = self.raw
        left = raw.content_length - raw.position
        if left <= 0:
            return b""
        raw._send_100_continue()
        data: bytes = raw.rfile.read1(min(wanted, left))
        if not data:
            raise OSError(f"unexpected end of file while reading request at position {raw.position}")
        raw.position += len(data)
        return data

    def read_exactly(self, size: int, seconds: float | None) -> bytes | None:
        raw = self.raw
        rfile = raw.rfile
        reader = self._reader
        if reader is None:
            socket_file: t.Any = getattr(rfile, "raw", None)
            sock = getattr(socket_file, "_sock", None)
            if sock is None or not hasattr(rfile, "readinto1"):
                return None
            reader = self._reader = sock.dup()
            reader.settimeout(seconds)
            self._socket_file, self._sock = socket_file, sock
        socket_file, sock = self._socket_file, self._sock
        left = raw.content_length - raw.position
        if size > left:
            size = left
        if size <= 0:
            return b""
        raw._send_100_continue()
        data = bytearray(size)  # read straight into it, as a buffered read() does
        view = memoryview(data)
        got = 0
        socket_file._sock = reader
        try:
            # One socket read first: stopped while it waits, nothing was taken.
            got = rfile.readinto1(view)
            if 0 < got < size:
                got += rfile.readinto(view[got:])
        except TimeoutError:  # socket.timeout
            self.lost = bool(got)
            raise SourceTimeout() from None
        except BaseException:
            self.lost = bool(got)
            raise
        finally:
            socket_file._sock = sock
            view.release()
        raw.position += got
        if got < size:
            raise OSError(f"unexpected end of file while reading request at position {raw.position}")
        return data  # type: ignore[return-value]  # a bytearray: what Werkzeug's parser extends its buffer with

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


class _PywsgiChunked(Source):
    """gevent.pywsgi's Input for a chunked body: asked for no more than its
    buffer holds (or the rest of the current chunk), so it does not wait
    for more than has arrived."""

    def read(self, wanted: int) -> bytes:
        raw = self.raw
        if raw.chunk_length == 0:
            # The last chunk was read (with the data before it): at the end,
            # where a peek would wait for bytes the client will never send.
            return b""
        raw._send_100_continue()
        in_chunk = raw.chunk_length - raw.position if raw.chunk_length > 0 else 0
        if in_chunk <= 0:
            # At a chunk boundary: one byte makes pywsgi parse the next size
            # line (it comes with the chunk it announces).
            return raw.read(1)  # type: ignore[no-any-return]
        # Inside a chunk the buffered bytes are its data: ask for no more
        # than arrived, so nothing that arrived is held back.
        arrived = len(raw.rfile.peek(1))
        if not arrived:
            # The connection ended inside a chunk (pywsgi's read(0) would
            # answer b"", a silently short body).
            raise OSError("unexpected end of file while parsing chunked data")
        return raw.read(min(CHUNK, in_chunk, arrived))  # type: ignore[no-any-return]


class _GunicornBody(Source):
    """gunicorn's Body: it reads at least 1 KiB ahead into its buffer; ask
    for what the buffer holds, or for one byte (that is, the next 1 KiB)."""

    def read(self, wanted: int) -> bytes:
        raw = self.raw
        buffered = raw.buf.tell()
        return raw.read(min(CHUNK, buffered) if buffered > 0 else 1)  # type: ignore[no-any-return]


#: Input types known to be gevent.pywsgi's (looked at once per type).
_pywsgi_types: dict[type, bool] = {}


def _is_pywsgi_input(raw: t.Any) -> bool:
    kind = type(raw)
    known = _pywsgi_types.get(kind)
    if known is None:
        names = ("rfile", "_send_100_continue", "chunked_input", "chunk_length", "position", "content_length")
        known = all(hasattr(raw, name) for name in names)
        if len(_pywsgi_types) < 64:
            _pywsgi_types[kind] = known
    return known and hasattr(raw.rfile, "read1")


def source_for(raw: t.Any) -> Source:
    """The way to read ``raw`` (a server's ``wsgi.input``) as bytes arrive."""
    if _is_pywsgi_input(raw):
        if raw.chunked_input:
            return _PywsgiChunked(raw)
        if raw.content_length is not None:
            return _PywsgiLength(raw)
    if type(raw).__module__ == "gunicorn.http.body" and hasattr(getattr(raw, "buf", None), "tell"):
        return _GunicornBody(raw)
    return Source(raw)


def progress(stream: t.Any) -> tuple[int | None, int | None]:
    """``(given, left)`` of a body stream a framework began to read itself:
    the bytes it already handed out and the bytes it still has, each
    ``None`` when the stream does not say (Werkzeug's ``LimitedStream``
    and gevent.pywsgi's Content-Length input do; a chunked input says only
    whether it began)."""
    position = getattr(stream, "_pos", None)  # Werkzeug 2.3+'s LimitedStream
    limit = getattr(stream, "limit", None)
    if isinstance(position, int) and isinstance(limit, int):
        return position, max(limit - position, 0)
    if _is_pywsgi_input(stream):
        if stream.chunked_input:
            return (0 if stream.chunk_length == -1 else None), None
        if stream.content_length is not None:
            return stream.position, max(stream.content_length - stream.position, 0)
    return None, None


def reads_a_socket(environ: dict[str, t.Any], raw: t.Any) -> bool:
    """True if ``raw`` is a server's input on the connection's socket (so
    the server reads it itself once the request ends)."""
    return _socket_of(environ, raw) is not None


def response_started(raw: t.Any) -> None:
    """The final response has begun: a ``100 Continue`` may no longer be sent
    (a capture after the response reads without it, as pywsgi's own discard
    does)."""
    if hasattr(raw, "send_100_continue_enabled"):
        raw.send_100_continue_enabled = False
    elif _is_pywsgi_input(raw):
        # gevent < 25.4.1 has no switch: its Input sends the 100 at the next
        # read while it holds the socket, and drops the socket once it has
        # sent it. Dropping it here is what sending would do, minus the 100.
        raw.socket = None


def translate(exc: BaseException) -> BaseException:
    """The error every reader should get for ``exc``, raised by a server's input."""
    from werkzeug.exceptions import BadRequest, ClientDisconnected, HTTPException

    if isinstance(exc, HTTPException):
        return exc
    if _is_bad_chunking(exc) or isinstance(exc, ValueError):
        # ValueError: gevent.pywsgi parsing an empty chunk-size line.
        error: BaseException = BadRequest(f"malformed request body: {exc}")
    elif isinstance(exc, OSError):
        # gevent.pywsgi: IOError at an early end; gunicorn: NoMoreData.
        error = ClientDisconnected(f"the request body could not be read completely: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error


def _is_bad_chunking(exc: BaseException) -> bool:
    # gevent.pywsgi's _InvalidClientInput (an IOError), gunicorn's
    # InvalidChunkSize, ChunkMissingTerminator, ... (ParseException).
    for module, name in (("gevent.pywsgi", "_InvalidClientInput"), ("gunicorn.http.errors", "ParseException")):
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(exc, kind):
            return True
    return False


def _socket_of(environ: dict[str, t.Any], raw: t.Any) -> t.Any:
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return sock
    rfile = getattr(raw, "rfile", None)  # gevent.pywsgi's Input
    return getattr(getattr(rfile, "raw", None), "_sock", None)


def close_connection(environ: dict[str, t.Any], raw: t.Any) -> bool:
    """Stop the server reading the request's connection, and drop what it
    buffered: it finds its input at an end and closes the connection
    instead of reading the rest of a broken body (or as the next request).
    Returns ``False`` on a server it does not know.
    """
    if not shut_reading(environ, raw):
        return False
    # Bytes the server already buffered must not be parsed as a request.
    rfile = getattr(raw, "rfile", None)
    read1 = getattr(rfile, "read1", None)
    if read1 is not None:
        try:
            for _ in range(64):
                if not read1(65536):
                    break
        except (OSError, ValueError, RuntimeError):
            pass  # RuntimeError: a reader still inside the buffered reader
    return True


def shut_reading(environ: dict[str, t.Any], raw: t.Any) -> bool:
    """Shut the reading side of the request's connection: a read waiting on
    it ends at once (at an end of file). ``False`` on a server it does not
    know."""
    sock = _socket_of(environ, raw)
    if sock is None:
        return False
    if hasattr(raw, "_chunked_input_error"):
        # gevent.pywsgi skips discarding the rest of the body when this is
        # set ("the user of this object is going to close the socket").
        raw._chunked_input_error = True
    try:
        # The reading side only: the server still writes its response (an
        # error page when the app let the error through), then finds the end
        # of its input and closes the connection.
        sock.shutdown(_stdlib_socket.SHUT_RD)
    except OSError:
        pass  # already gone
    return True
