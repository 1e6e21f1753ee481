"""What the shared body must know of the WSGI servers it runs under.

The rule: everything server-specific the body does lives here, and each
function does nothing on a server it does not know (the server's own
behaviour then holds, as without geventctx).

- :func:`reader_for` reads what has arrived, as soon as something has:
  gevent.pywsgi's input is asked only for bytes its buffer already holds
  (after it sent ``100 Continue``); other servers' inputs return only once
  they have the bytes asked for, so they are asked for at most
  :data:`SMALL_READ` bytes at a time.
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

__all__ = ["reader_for", "translate", "close_connection", "SMALL_READ"]

#: The largest read asked of a server input that blocks until it has it all.
SMALL_READ = 8 * 1024


def reader_for(raw: t.Any) -> t.Callable[[int], bytes]:
    """``read(n)``: up to ``n`` bytes of ``raw``, returning as soon as some arrived."""
    rfile = getattr(raw, "rfile", None)
    send_100 = getattr(raw, "_send_100_continue", None)
    peek = getattr(rfile, "peek", None)
    if peek is None or send_100 is None or not hasattr(raw, "chunk_length"):
        return lambda size: raw.read(min(size, SMALL_READ))

    def read_arrived(size: int) -> bytes:
        # gevent.pywsgi: its Input reads until it has all it was asked for.
        # peek() returns the buffered bytes, or does one socket read when
        # there are none (losing nothing if interrupted); then ask for no
        # more than that. 100 Continue first, as Input.read would send it.
        if raw.chunked_input and raw.chunk_length == 0:
            # The last chunk was read (with the data before it): at the end,
            # where a peek would wait for bytes the client will never send.
            return b""
        send_100()
        arrived = len(peek(1))
        return raw.read(min(size, max(arrived, 1)))  # type: ignore[no-any-return]

    return read_arrived



def translate(exc: BaseException) -> BaseException:
    """The error every reader should get for ``exc``, raised by a server's input."""
    from werkzeug.exceptions import BadRequest, ClientDisconnected, HTTPException

    if isinstance(exc, HTTPException):
        return exc
    if _is_bad_chunking(exc):
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
    """Shut the request's connection down, after its response was written.

    The client has its response (servers write it before they call the
    response's ``close()``, where this runs); the server then finds the
    input at its end and closes the connection instead of reading on.
    Returns ``False`` on a server it does not know.
    """
    sock = _socket_of(environ, raw)
    if sock is None:
        return False
    if hasattr(raw, "_chunked_input_error"):
        # gevent.pywsgi skips discarding the rest of the body when this is
        # set ("the user of this object is going to close the socket").
        raw._chunked_input_error = True
    try:
        sock.shutdown(_stdlib_socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    return True
