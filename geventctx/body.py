"""One request body, read from the socket once, for any number of readers.

When a request hands its context to children, the parent and the children
may all consume the body (``get_data``, ``form``, ``json``, ``stream``...).
Reading the socket from two greenlets interleaves partial reads. A
:class:`SharedBody` is read from the real input once, by whoever asks first,
under a per-request lock; every reader then gets the complete body, each
greenlet through its own cursor. If reading fails (client gone, bad chunking,
too large) or the reader is killed mid-read, every reader gets the same
error; no one gets partial data, and no one hangs.

The cost is that the whole body is held in memory once read: use the
``off`` body mode for streaming uploads that only the parent reads.

.. versionadded:: 0.1
"""

from __future__ import annotations

import io
import typing as t
import weakref

import gevent
from gevent import get_hub
from gevent.event import Event
from gevent.lock import RLock
from gevent.monkey import get_original
from greenlet import getcurrent

from .errors import BodyReadError
from .scope import current_scope

__all__ = ["SharedBody", "SharedFile", "share_wsgi_input", "ENVIRON_BODY"]

# Native (never monkey-patched) primitives, for ThreadPool worker threads.
_get_ident = get_original("_thread", "get_ident")
_NativeEvent = get_original("threading", "Event")

#: Where the shared body of a request is kept in its WSGI environ.
ENVIRON_BODY = "geventctx.body"

#: Body modes: serialize-and-share on first read, read eagerly in the parent
#: at the first hand-off, or leave the body alone.
BODY_MODES = ("lock", "buffer", "off")


class Readable(t.Protocol):
    """What a SharedBody reads from: anything with ``read()``."""

    def read(self, size: int = -1, /) -> bytes: ...


class SharedBody(io.RawIOBase):
    """A file-like request body shared by the greenlets of one request.

    :param open_stream: returns the real, bounded input stream (such as
        Werkzeug's ``LimitedStream``); called once, by the first reader.
    :param length: the ``Content-Length``, if known.
    """

    def __init__(self, open_stream: t.Callable[[], Readable], length: int | None = None) -> None:
        super().__init__()
        self._open_stream = open_stream
        self.length = length
        #: The socket belongs to this thread's hub: only it may read it.
        self._owner_thread = _get_ident()
        self._owner_hub = get_hub()
        #: Serializes the read of the body and any parse of it (reentrant).
        self.lock = RLock()
        self._data: bytes | None = None
        self._error: BaseException | None = None
        #: Set once the socket read has ended, however it ended.
        self._read_done: Event | None = None
        self._cursor_map: weakref.WeakKeyDictionary[t.Any, int] | None = None
        #: Asked when the body is first read: the largest body allowed.
        self.max_length: t.Callable[[], int | None] = lambda: None
        #: Asked before the first read: is the whole body already buffered
        #: by the server (so reading it cannot block)? Adapters that know
        #: their server set it; by default the read always uses a helper.
        self.buffered: t.Callable[[], bool] = lambda: False

    # -- state -------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True once the body was read completely."""
        return self._data is not None

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the read, if any."""
        return self._error

    def load(self) -> bytes:
        """Read the whole body once (under the lock) and return it.

        Raises the error that stopped the first read, to every caller.
        """
        data = self._data
        if data is not None:
            return data
        if _get_ident() != self._owner_thread:
            return self._load_from_other_thread()
        with self.lock:
            return self._load_locked()

    def _load_locked(self) -> bytes:
        # The caller holds the lock.
        if self._data is None:
            if self._error is not None:
                raise self._error
            self._read_all()
        assert self._data is not None
        return self._data

    def _load_from_other_thread(self) -> bytes:
        # A ThreadPool task: the request's own hub reads the socket (in a
        # greenlet, under the lock as always) while this thread waits.
        # If this thread already holds the lock (a consumer that parses under
        # it, like Flask's get_data/form), the hub's greenlet could never take
        # it: it reads under this thread's hold, which excludes every other
        # reader just the same.
        done = _NativeEvent()
        read = self._load_locked if self.lock._is_owned() else self.load

        def read_in_owner_hub() -> None:
            try:
                read()
            except BaseException:
                pass
            finally:
                done.set()

        self._owner_hub.loop.run_callback_threadsafe(gevent.spawn_raw, read_in_owner_hub)
        done.wait()
        if self._data is not None:
            return self._data
        raise self._error if self._error is not None else BodyReadError("the request body could not be read")

    def try_load(self) -> None:
        """Read the body now if it was not; keep any error for the readers.

        Also waits until a read abandoned mid-way (its reader was killed) has
        taken the rest of the body off the socket, so that the server finds
        the connection in step when the request ends.
        """
        try:
            self.load()
        except Exception:
            pass
        done = self._read_done
        if done is not None:
            done.wait()

    def _read_all(self) -> None:
        open_stream, self._open_stream = self._open_stream, _closed_stream
        try:
            stream = open_stream()
        except BaseException as exc:
            self._error = exc
            raise
        outcome: list[t.Any] = []
        if self.buffered():
            # The whole body is already in the server's buffer: the read
            # cannot block, so it cannot be interrupted half-way either.
            _read_into(stream, outcome, None)
            self._keep(outcome)
            return
        # The socket is read in a helper greenlet. A read interrupted inside
        # the server's buffered socket file (the reader was killed, or timed
        # out) loses the bytes it had taken, and the server would then wait
        # forever for them when it discards the rest of the body. The helper
        # is never interrupted: it finishes the read whatever happens to the
        # greenlet that asked for it.
        done = self._read_done = Event()
        gevent.spawn_raw(_read_into, stream, outcome, done)
        try:
            done.wait()
        except BaseException:
            if outcome:  # interrupted just after the read ended: keep it
                self._data, self._error = (outcome[1], None) if outcome[0] else (None, outcome[1])
            else:
                self._abandon(done)
            raise
        self._keep(outcome)

    def _keep(self, outcome: list[t.Any]) -> None:
        # outcome is (True, data) or (False, error), as _read_into left it.
        if not outcome[0]:
            self._error = outcome[1]
            raise self._error
        self._data = outcome[1]

    def _abandon(self, done: Event) -> None:
        # The reader went away mid-read: everyone gets a clear error, never
        # partial data (the outcome of the read is dropped), and the request
        # scope stays held until the helper has the body off the socket. The
        # hold makes the adapter call try_load() at the end of the request
        # (it does while the scope has other holders), which waits for the
        # helper: the server must not read the connection while it does.
        self._error = BodyReadError(
            "the greenlet reading the request body was killed mid-read; "
            "the body is lost and cannot be read again"
        )
        scope = current_scope()
        if scope is None or scope.closed:
            return
        if scope.acquire():
            done.rawlink(lambda _event: scope.release())

    # -- file-like, one cursor per greenlet --------------------------------

    @property
    def _cursors(self) -> weakref.WeakKeyDictionary[t.Any, int]:
        # Made on first use: most requests never read the stream directly.
        cursors = self._cursor_map
        if cursors is None:
            cursors = self._cursor_map = weakref.WeakKeyDictionary()
        return cursors

    def readable(self) -> bool:
        return True

    def _take(self, size: int | None) -> bytes:
        data = self.load()
        reader = getcurrent()
        pos = self._cursors.get(reader, 0)
        if size is None or size < 0:
            end = len(data)
        else:
            end = min(len(data), pos + size)
        self._cursors[reader] = end
        if pos == 0 and end == len(data):
            return data
        return data[pos:end]

    def read(self, size: int | None = -1) -> bytes:
        return self._take(size)

    def readall(self) -> bytes:
        return self._take(-1)

    def readinto(self, buffer: t.Any) -> int:
        chunk = self._take(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def readline(self, size: int | None = -1) -> bytes:
        data = self.load()
        reader = getcurrent()
        pos = self._cursors.get(reader, 0)
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        if size is not None and size >= 0:
            end = min(end, pos + size)
        self._cursors[reader] = end
        return data[pos:end]

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else ("failed" if self._error else "unread")
        return f"<SharedBody {state} length={self.length}>"


class SharedFile(io.RawIOBase):
    """A seekable file (an uploaded file's spool) read by several greenlets.

    Each greenlet reads the file from the start through its own position, so
    a file read by the parent is still complete for a child. ``seek`` and
    ``tell`` move the calling greenlet's position only.
    """

    def __init__(self, file: t.IO[bytes]) -> None:
        super().__init__()
        self.file = file
        self._positions: weakref.WeakKeyDictionary[t.Any, int] = weakref.WeakKeyDictionary()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _at(self) -> int:
        return self._positions.get(getcurrent(), 0)

    def read(self, size: int | None = -1) -> bytes:
        # Local file reads do not switch greenlets, so seek+read is atomic.
        self.file.seek(self._at())
        data = self.file.read(-1 if size is None else size)
        self._positions[getcurrent()] = self.file.tell()
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: t.Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def readline(self, size: int | None = -1) -> bytes:
        self.file.seek(self._at())
        data = self.file.readline(-1 if size is None else size)
        self._positions[getcurrent()] = self.file.tell()
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._at()
        elif whence == io.SEEK_END:
            offset += self.file.seek(0, io.SEEK_END)
        self._positions[getcurrent()] = offset
        return offset

    def tell(self) -> int:
        return self._at()

    def close(self) -> None:
        self.file.close()
        super().close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.file, name)


def share_wsgi_input(
    environ: dict[str, t.Any], max_length: t.Callable[[], int | None] = lambda: None
) -> SharedBody:
    """Put ``environ["wsgi.input"]`` behind a :class:`SharedBody`, once.

    ``max_length()`` is asked when the body is first read (a framework's
    ``MAX_CONTENT_LENGTH``). A second call for the same request (a second
    adapter) returns the same body; the smaller of the two limits counts, so
    an inner framework without a limit does not lift the outer one.
    """
    body = environ.get(ENVIRON_BODY)
    if isinstance(body, SharedBody):
        outer = body.max_length
        body.max_length = lambda: _smallest(outer(), max_length())
        return body
    raw = environ["wsgi.input"]
    length = _content_length(environ)

    def open_stream() -> _WholeBody:
        from werkzeug.exceptions import RequestEntityTooLarge
        from werkzeug.wsgi import LimitedStream, get_input_stream

        if length is not None:
            # Read exactly the announced bytes in as few reads as the server
            # allows: going through LimitedStream.readall() grows a second
            # copy of the body and took 13% longer on a 20 MB upload (P3).
            limit = shared.max_length()
            if limit is not None and length > limit:
                raise RequestEntityTooLarge()
            return _WholeBody(_ExactBody(raw, length), None)
        raw_environ = dict(environ)
        raw_environ["wsgi.input"] = raw
        limit = shared.max_length()
        stream = get_input_stream(raw_environ, max_content_length=limit)
        if limit is not None and environ.get("wsgi.input_terminated"):
            # A body of unknown length (chunked) on a server that ends its
            # input itself: Werkzeug's max-limited stream stops silently at
            # the limit, which would hand every reader a truncated body (and
            # Werkzeug 2.3 does not limit it at all, while its form parser
            # does: readers disagreed). Read one byte past the limit to tell
            # a body that fits from one that does not, the same for all.
            return _WholeBody(LimitedStream(raw, limit + 1, is_max=True), limit)
        return _WholeBody(stream, None)

    shared = body = SharedBody(open_stream, length)
    body.max_length = max_length
    if length is not None:
        body.buffered = lambda: _pywsgi_buffered(raw, length)
    if length == 0 or (length is None and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
        # No body at all (a GET): nothing to read, nothing to share.
        body._data = b""
    environ[ENVIRON_BODY] = body
    environ["wsgi.input"] = body
    return body


def _pywsgi_buffered(raw: t.Any, length: int) -> bool:
    """True if gevent.pywsgi already holds all ``length`` body bytes in memory.

    ``peek`` returns the buffered bytes without reading when there are any;
    with an empty buffer it does a single socket read into the buffer, which
    loses nothing if interrupted. Other servers: False (use the helper).
    """
    rfile = getattr(raw, "rfile", None)
    if rfile is None or getattr(raw, "chunked_input", True) or getattr(raw, "position", 1) != 0:
        return False
    try:
        return len(rfile.peek(0)) >= length
    except Exception:
        return False


def _smallest(*limits: int | None) -> int | None:
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _content_length(environ: dict[str, t.Any]) -> int | None:
    try:
        value = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return value if value >= 0 else None


class _ExactBody:
    """Exactly ``length`` bytes of ``raw``; fewer is a client gone mid-body."""

    def __init__(self, raw: t.IO[bytes], length: int) -> None:
        self.raw = raw
        self.length = length

    def read(self, size: int = -1) -> bytes:
        from werkzeug.exceptions import ClientDisconnected

        chunks = []
        remaining = self.length
        while remaining > 0:
            chunk = self.raw.read(remaining)
            if not chunk:
                raise ClientDisconnected(
                    f"the client sent {self.length - remaining} of {self.length} announced body bytes"
                )
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _WholeBody:
    """Reads the real input whole, turning what went wrong into a 4xx.

    Too large is ``RequestEntityTooLarge`` (413). Bytes the server could not
    parse as chunked encoding (pywsgi's ``_InvalidClientInput``) are a
    ``BadRequest`` (400), and any other socket error, such as the client
    going away mid-upload, is ``ClientDisconnected`` (400): every reader of
    the shared body then gets that same error. (Werkzeug's HTTP exceptions:
    Werkzeug is a dependency of geventctx, not only of Flask.)
    """

    def __init__(self, stream: t.Any, limit: int | None) -> None:
        self.stream = stream
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        from gevent.pywsgi import _InvalidClientInput
        from werkzeug.exceptions import BadRequest, ClientDisconnected, RequestEntityTooLarge

        try:
            data = self.stream.read()
        except _InvalidClientInput as exc:
            raise BadRequest(f"malformed request body: {exc}") from exc
        except OSError as exc:
            raise ClientDisconnected(f"the request body could not be read completely: {exc}") from exc
        if self.limit is not None and len(data) > self.limit:
            raise RequestEntityTooLarge()
        return bytes(data)


def _read_into(stream: t.Any, outcome: list[t.Any], done: Event | None) -> None:
    try:
        outcome += (True, stream.read())
    except BaseException as exc:  # handed to the reader, never to the hub
        outcome += (False, exc)
    finally:
        if done is not None:
            done.set()


def _closed_stream() -> t.IO[bytes]:
    raise BodyReadError("the request body was already read")
