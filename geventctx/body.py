"""One request body for any number of readers: a streaming, spooled tee.

The rule: the body is taken off the server's input one read at a time,
only while a consumer waits for bytes that have not arrived (or, once the
response is written, while children that may still read it are alive),
into a :class:`~geventctx.spool.Spool`; every consumer reads the spool
through its own cursor and gets bytes as they arrive; how the body ended —
complete, or the error that stopped it — is the same for every consumer.
The spool keeps only what somebody may still read: a parse whose result is
cached (a form) that alone reads the body takes it straight off the input
and the spool keeps none of it (G5: one consumer, no copy).

Three parts, each with one job: :mod:`geventctx.body_plan` decides (what to
read next, what a read or a timeout means, what may be dropped), with no
I/O; :mod:`geventctx.body_input` moves bytes off the server's input (a
reader reading for itself, or a *pump* greenlet reading for the others);
:mod:`geventctx.spool` keeps them. This module puts them together: waits,
reads at each reader's position, and the end of the response.

What follows from it:

- Nothing reads before a consumer asks, so gevent.pywsgi sends ``100
  Continue`` at the first read, exactly as without geventctx.
- A streaming reader (``request.stream.read(n)``) waits for its ``n``
  bytes, never for the whole body; ``get_data()`` waits for the end.
- The pump is never interrupted by a reader: a reader killed while it waits
  just stops waiting, the body stays intact for everyone else, and the
  server finds its input in step. (A lone form parse interrupted midway is
  the one exception: nobody kept what it read, so every later consumer
  gets :class:`~geventctx.BodyReadError`.)
- A read that makes no progress for ``timeout`` seconds fails with
  :class:`~geventctx.BodyTimeout` (408). Any failure once reading started
  leaves the input out of step, so the connection is shut down after the
  response is written: the server neither blocks discarding the rest nor
  reads it as the next request. A stalled client holds only its own
  connection.
- **The response never waits for the body.** When the response has been
  written (its ``close()``) and children may still read an unread body, the
  rest is captured then, each read bounded by ``timeout``.
- Memory per request is bounded by the spool's memory limit (default 1 MiB),
  whatever the body's size; the rest lives in an unnamed temporary file,
  freed as the last step of the request's teardown. A whole-body read
  (``get_data()``, ``json``) holds every byte itself anyway: while it
  reads, the spool keeps the bytes in memory and then shares that one
  ``bytes`` object instead of writing a second copy to disk.
- Under gevent.pywsgi a read takes what has arrived, up to 64 KiB, and the
  pump reads up to 1 MiB ahead of its readers (a read that waits there is
  stopped without loss when nobody needs it); other servers' inputs block
  until they have what they were asked for, so they are asked for 8 KiB at
  a time and the timeout counts per 8 KiB.

Cost: a request that never reads its body and never hands off pays nothing
(adapters create the shared body lazily). Under gevent.pywsgi (a
``Content-Length`` body), a reader that alone needs bytes reads them itself
— what arrived with the headers at once, without a switch; otherwise a body
that is read costs one greenlet for the pump, two switches per read of up to
64 KiB, and the spool.

.. versionchanged:: 0.2
    A streaming tee over a spool, instead of a whole-body buffer under a
    lock; split into the plan, the input reader and this module; a lone
    form parse keeps no copy.

.. versionadded:: 0.1
"""

from __future__ import annotations

import io
import sys
import typing as t
import weakref

from gevent.monkey import get_original
from greenlet import getcurrent

from . import _servers
from ._wakeup import Changes
from .body_input import InputReader
from .body_plan import CHUNK, EVERYTHING, READ_AHEAD, BodyPlan
from .errors import BodyReadError
from .spool import DEFAULT_MEMORY_LIMIT, Forgotten, Spool

__all__ = [
    "SharedBody",
    "BodyCursor",
    "SharedFile",
    "share_wsgi_input",
    "has_body",
    "end_of_response",
    "ENVIRON_BODY",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MEMORY_LIMIT",
    "CHUNK",
    "READ_AHEAD",
]

#: Where the shared body of a request is kept in its WSGI environ.
ENVIRON_BODY = "geventctx.body"

#: Body modes: share through the tee (``"tee"``; ``"lock"`` is its old name),
#: the same plus an eager read at the first hand-off (``"buffer"``), or
#: leave the body alone (``"off"``).
BODY_MODES = ("tee", "lock", "buffer", "off")

#: Seconds a body read may go without a byte arriving.
DEFAULT_TIMEOUT = 30.0

_allocate_lock = get_original("_thread", "allocate_lock")


def reader_key() -> t.Any:
    """Who a position in a body or an uploaded file belongs to: the running
    greenlet, or — in a ThreadPool worker — the task it runs (one worker
    greenlet runs task after task)."""
    current = getcurrent()
    return getattr(current, "geventctx_reader", None) or current


class Readable(t.Protocol):
    """What a SharedBody reads from: the server's ``wsgi.input``."""

    def read(self, size: int = -1, /) -> bytes: ...


class _Readable(io.RawIOBase):
    """``readall`` and ``readinto`` in terms of ``read``."""

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: t.Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _Reader(_Readable):
    """The file methods of a body reader, at the position a subclass keeps."""

    _body: SharedBody

    def _at(self) -> int:
        raise NotImplementedError

    def _move(self, position: int) -> None:
        raise NotImplementedError

    def read(self, size: int | None = -1) -> bytes:
        position = self._at()
        data = self._body.read_at(position, size)
        self._move(position + len(data))
        return data

    def readline(self, size: int | None = -1) -> bytes:
        position = self._at()
        data = self._body._readline_at(position, size)
        self._move(position + len(data))
        return data


class SharedBody(_Reader):
    """The body of one request, shared by its greenlets and thread tasks.

    As a file (``wsgi.input``, Werkzeug's ``stream``) each greenlet reads
    through its own position; :meth:`cursor` makes an independent reader
    (for a parser) and :meth:`read_whole` returns the complete body. It puts
    three parts together: the :class:`~geventctx.body_plan.BodyPlan` (what
    is decided), the :class:`~geventctx.body_input.InputReader` (what moves
    bytes off the server's input) and the :class:`~geventctx.spool.Spool`
    (what keeps them); itself, it waits, and serves reads at positions.

    :param raw: the server's input, or ``None`` for a request without a body.
    :param length: the ``Content-Length``, if known.
    :param memory_limit: bytes of the body kept in memory; the rest is
        spooled to an unnamed temporary file.
    :param timeout: seconds a read may wait for the client without a byte
        arriving, then every reader gets :class:`~geventctx.BodyTimeout`;
        ``None`` or ``0`` waits for ever.
    :param directory: where spool files are made (the system's default).
    :param environ: the request's environ, to close the connection when the
        input was left out of step.
    :param owner: ``(hub, thread id)`` of the request, when the body is made
        in another thread (its socket belongs to the request's hub).
    :param data: the whole body, read already (``raw`` is then ``None``):
        nothing is left to read, no copy is made.
    """

    def __init__(
        self,
        raw: Readable | None,
        length: int | None = None,
        *,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        timeout: float | None = DEFAULT_TIMEOUT,
        directory: str | None = None,
        environ: dict[str, t.Any] | None = None,
        owner: tuple[t.Any, int] | None = None,
        data: bytes | None = None,
    ) -> None:
        super().__init__()
        self.raw = raw
        self.length = length
        self.timeout = timeout
        self._spool = spool = Spool(memory_limit, directory)
        self._plan = plan = BodyPlan(length, timeout)
        #: Wakes the body's waiters (readers, a form's or JSON's waiters in
        #: :mod:`geventctx.request`), in any thread.
        self.changes = Changes(owner)
        self._input = InputReader(raw, spool, plan, self.changes, environ if environ is not None else {})
        #: True once end_response() finished (the connection was settled).
        self._responded = False
        #: The request scope that made the body and releases it as the last
        #: step of its teardown (an adapter stacked inside shares it).
        self.owner: t.Any = None
        #: Who read part of the raw stream before the body was shared (the
        #: Flask view, before its first hand-off): the body is only the rest,
        #: so only that reader may read it; anyone else gets BodyReadError (G5).
        self.partial_reader: t.Any = None
        #: Set when the response was written: the capture for children
        #: (``True``) or the settling of the input is due, outside the
        #: request's Context (:func:`geventctx.request_end.after_response`).
        self.end_due: bool | None = None
        if data is not None:
            # The whole body, read already (a framework's cache): kept as it
            # is, in memory whatever its size (its reader holds it anyway).
            spool.hold()
            spool.append(data)
            spool.unhold()
            spool.end()
        elif raw is None or length == 0:
            spool.end()

    # -- state -------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        """Where the bytes are kept (for inspection and tests)."""
        return self._spool

    @property
    def loaded(self) -> bool:
        """True once the whole body has arrived."""
        return self._spool.ended

    @property
    def received(self) -> int:
        """Bytes taken off the server's input so far."""
        return self._spool.size

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the body, if any."""
        return self._spool.error

    @property
    def waiting(self) -> int:
        """How many readers wait for bytes that have not arrived yet."""
        return len(self._plan.targets)

    @property
    def reading(self) -> bool:
        """True while somebody reads the server's input."""
        return self._input.reading is not None

    @property
    def broken(self) -> bool:
        """True once the server's input was left out of step (a read cut
        short): the connection must not be reused."""
        return self._input.broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self._input.broken = value

    @property
    def positions(self) -> weakref.WeakKeyDictionary[t.Any, int]:
        """Each raw reader's position in the body (:func:`reader_key` -> offset)."""
        return self._plan.positions

    def position_of(self, key: t.Any) -> int | None:
        """The position of reader ``key`` (:func:`reader_key`), or ``None``."""
        return self._plan.position_of(key)

    def add_limit(self, max_length: t.Callable[[], int | None]) -> None:
        """Also bound the body by ``max_length()`` (asked at the first read,
        in the reader's context); the smallest of the limits counts."""
        self._plan.add_limit(max_length)

    def settle_limits(self) -> None:
        """Ask the limits now (in the request's context), if no read has;
        for a capture after the response, when the context is gone."""
        if not self._plan.opened:
            self._input.open()

    # -- waiting for bytes ---------------------------------------------------

    def _wait_for(self, target: int) -> None:
        """Block until ``target`` bytes arrived or the body ended, failed or
        was released. A waiter that is killed just stops waiting."""
        spool = self._spool
        plan = self._plan
        source = self._input
        if not plan.opened:
            source.open()
        if spool.size >= target or spool.done:
            return
        changes = self.changes
        plan.want(target, source.lossless)
        try:
            if changes.in_owner_thread():
                # Read in this greenlet if nobody else reads (a lossless
                # source), else wait for the pump, starting it, and again if
                # it stopped (read ahead, then stopped quietly) before this
                # reader had its bytes.
                while not (spool.size >= target or spool.done):
                    if source.reads_itself() and not plan.capturing:
                        source.read_inline(target)
                        continue
                    source.start_pump()
                    changes.wait(lambda: spool.size >= target or spool.done or source.reading is None)
            else:
                # A ThreadPool task: the request's own hub reads the socket;
                # asked again now and then, in case its pump stopped.
                while not (spool.size >= target or spool.done):
                    changes.hub.loop.run_callback_threadsafe(source.start_pump)
                    changes.wait(lambda: spool.size >= target or spool.done, timeout=1.0)
        finally:
            plan.got(target)

    # -- reads at a position -------------------------------------------------

    def _gone(self, error: Exception) -> BaseException:
        if isinstance(error, Forgotten):
            return self._spool.error or BodyReadError(
                f"the request body could not be read from where this reader starts: {error}; the only reader "
                "that needed them, a form parse, was interrupted before its end"
            )
        return BodyReadError("the request has ended: its body was released")

    def read_at(self, position: int, size: int | None) -> bytes:
        """Bytes at ``position``: ``size`` of them (fewer only at the end),
        or all the rest (``size`` < 0) once the body is complete."""
        spool = self._spool
        if size is None or size < 0:
            return self._read_rest(position)
        if size == 0:
            return b""
        self._wait_for(position + size)
        try:
            data = spool.read(position, size)
        except (ValueError, Forgotten) as exc:
            raise self._gone(exc) from None
        if len(data) < size and spool.error is not None:
            # Short only because the body failed: the error, never a
            # silently short read (read(content_length) is a common idiom).
            raise spool.error
        return data

    def _read_rest(self, position: int) -> bytes:
        # A whole-body read holds every byte itself: from the first byte, the
        # spool keeps the bytes in memory meanwhile and shares the result.
        spool = self._spool
        held = position == 0 and spool.hold()
        try:
            self._wait_for(EVERYTHING)
            if spool.error is not None:
                raise spool.error  # never a silently short body
            try:
                return spool.whole() if position == 0 else spool.read(position, -1)
            except (ValueError, Forgotten) as exc:
                raise self._gone(exc) from None
        finally:
            if held:
                spool.unhold()

    def _readline_at(self, position: int, size: int | None) -> bytes:
        spool = self._spool
        limit = EVERYTHING if size is None or size < 0 else position + size
        scanned = position
        try:
            while True:
                found = spool.find(b"\n", scanned, limit)
                if found >= 0:
                    end = found + 1
                    break
                if spool.size >= limit or spool.done:
                    end = min(spool.size, limit)
                    break
                scanned = spool.size
                self._wait_for(spool.size + 1)
            data = spool.read(position, end - position)
        except (ValueError, Forgotten) as exc:
            raise self._gone(exc) from None
        if spool.error is not None and not data.endswith(b"\n") and position + len(data) < limit:
            raise spool.error  # a line cut short by the failure: the error
        return data

    def read_whole(self) -> bytes:
        """The complete body (waits for it), or the error that stopped it."""
        self._check_whole()
        return self.read_at(0, -1)

    def _check_whole(self) -> None:
        partial = self.partial_reader
        if partial is not None and reader_key() is not partial:
            raise BodyReadError(
                "the view read part of the request body's raw stream before its first hand-off, so "
                "nobody kept those bytes: a child cannot read the whole body (read the body, or "
                "parse it, before handing off; or pass the part read to the child)"
            )

    # -- parsers' readers ------------------------------------------------------

    def cursor(self, start: int = 0, *, parse: bool = False) -> BodyCursor:
        """A reader of its own, from ``start`` (for a parser).

        With ``parse``, the reader of a parse whose result is cached, which
        nobody else reads raw while it runs (a Werkzeug form parse: raw
        readers wait for it, then start where it ended): alone, it reads
        straight off the server's input, keeping nothing; the bytes behind
        it that another reader still needs are kept, the rest freed (G5: a
        single consumer keeps no copy). End it with :meth:`parse_ended`.
        """
        self._check_whole()
        cursor = BodyCursor(self)
        cursor._position = start
        if parse:
            cursor.parse = True
            cursor.owner = reader_key()
            self._plan.parses[cursor] = start
        else:
            self._plan.positions[cursor] = start  # a reader of its own: it reads on from there
        return cursor

    def parse_ended(self, cursor: BodyCursor) -> None:
        """The parse reading through ``cursor`` ended, however it ended."""
        self._plan.parses.pop(cursor, None)

    def _parse_moved(self, cursor: BodyCursor, position: int) -> None:
        plan = self._plan
        plan.parses[cursor] = position
        self._spool.forget(plan.keep_from())

    def _read_through(self, cursor: BodyCursor, size: int) -> bytes | None:
        """A parse's read straight off the input, if the plan allows it
        (else ``None``: read through the spool)."""
        spool = self._spool
        source = self._input
        if (
            source.reading is not None  # somebody else reads
            or not source.lossless
            or spool.done
            or not self._plan.may_read_through(cursor._position, spool.size, cursor.owner)
            or not self.changes.in_owner_thread()  # a thread task: the request's hub reads its socket
        ):
            return None
        if not self._plan.opened:
            source.open()
            if spool.done:
                return None
        return source.read_through(size)

    # -- file-like, one position per greenlet --------------------------------

    @property
    def _body(self) -> SharedBody:  # type: ignore[override]
        return self

    def _at(self) -> int:
        if self.partial_reader is not None:
            self._check_whole()
        key = reader_key()
        at = self._plan.position_of(key)
        if at is None:
            at = self._plan.positions[key] = 0  # from its first read on, its bytes are kept
        return at

    def _move(self, position: int) -> None:
        self._plan.positions[reader_key()] = position

    def close(self) -> None:
        """Does nothing: the body belongs to the request, not to one reader
        (Werkzeug and applications close streams they are done with)."""

    @property
    def closed(self) -> bool:
        return False

    # -- the end of the request --------------------------------------------

    def end_response(self, children: bool, killed: bool = False) -> None:
        """The response has been written (or the request is being killed).

        With ``children`` alive, capture the rest of the body for them; then
        wait until nobody reads the input (its reads are bounded by the
        timeout), so that the server finds its input in step — or shut the
        connection down if it is not. Interrupted, it stops the reader and
        closes the connection: no greenlet keeps reading.
        """
        spool = self._spool
        plan = self._plan
        source = self._input
        _servers.response_started(self.raw)
        try:
            if killed:
                source.abort()
                if not spool.ended and spool.error is None:
                    # Not read to its end (released by teardown already, or
                    # not): the input is out of step, and nobody may read
                    # the rest later from a drained input.
                    source.broken = True
                    if not spool.done:
                        spool.fail(BodyReadError("the request was stopped before its body was read"))
                        self.changes.notify()
                return
            if children and not spool.done:
                if not plan.opened:
                    source.open()  # the capture obeys the body's limits too
                plan.capturing = True
                # Again if a reader was reading inline: it stops at its own
                # target, the capture goes on to the end.
                while plan.capturing and not spool.done:
                    if source.reads_itself():
                        # As the pump: release() stops it quietly once no
                        # child is left to read (a hub callback throws).
                        source.read_inline(EVERYTHING, getcurrent())
                        continue
                    source.start_pump()
                    source.wait_idle(None)
            else:
                # Nobody reads on: a read in flight ends within the timeout
                # (or is stopped without loss); else the connection closes.
                source.stop_reading_ahead()
                bound = plan.seconds or DEFAULT_TIMEOUT
                if not source.wait_idle(bound):
                    source.abort()
        except BaseException:
            source.abort()
            if plan.capturing and not spool.done:
                # The capture was cut short (its reader was this greenlet):
                # nobody may read the rest later from a drained input.
                source.broken = True
                spool.fail(BodyReadError("reading the request body was interrupted: the request was stopped"))
                self.changes.notify()
            raise
        finally:
            plan.capturing = False
            source.close_if_broken()
            self._responded = True
            self._forget_environ()

    def release(self) -> None:
        """The request's scope has ended: free the spool (memory and file).

        Readers that come later get :class:`~geventctx.BodyReadError`; a read
        in flight finishes (so the input stays in step) and is dropped.
        """
        self._plan.capturing = False
        self._spool.close()
        self._input.stop_reading_ahead()  # nobody can want the bytes any more
        self._input.close()
        self.changes.notify()
        self._forget_environ()

    def _forget_environ(self) -> None:
        # Once released and past the response, the body needs the environ
        # no more: dropping it breaks the environ <-> body reference cycle,
        # so the request is freed at once, not by the garbage collector.
        if self._responded and self._spool.closed:
            self._input.environ = {}
            self.owner = None

    def __repr__(self) -> str:
        spool = self._spool
        state = (
            "released"
            if spool.closed
            else "complete"
            if spool.ended
            else f"failed {spool.error!r}"
            if spool.error
            else "reading"
            if self.reading
            else "waiting"
        )
        return f"<SharedBody {state} {spool.size}/{self.length if self.length is not None else '?'} bytes>"


class BodyCursor(_Reader):
    """An independent reader of a :class:`SharedBody` (:meth:`SharedBody.cursor`)."""

    #: True for the reader of a parse (:meth:`SharedBody.cursor`).
    parse = False
    #: Who runs the parse (:func:`reader_key`).
    owner: t.Any = None

    def __init__(self, body: SharedBody) -> None:
        super().__init__()
        self._body = body
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        if self.parse and size is not None and size > 0:
            # A parse that alone reads takes its bytes straight off the input.
            body = self._body
            data = body._read_through(self, size)
            if data is not None:
                # Kept nowhere: nothing for the spool to forget.
                self._position = body._plan.parses[self] = self._position + len(data)
                return data
        return super().read(size)

    def _at(self) -> int:
        return self._position

    def _move(self, position: int) -> None:
        self._position = position
        if self.parse:
            self._body._parse_moved(self, position)
        else:
            self._body._plan.positions[self] = position

    def tell(self) -> int:
        return self._position


class SharedFile(_Readable):
    """A seekable file (an uploaded file's spool) read by several greenlets.

    Each greenlet reads the file from the start through its own position, so
    a file read by the parent is still complete for a child. ``seek`` and
    ``tell`` move the calling greenlet's position only; a seek and its read
    happen under a native lock (ThreadPool tasks read it too). ``close()``
    by one reader does nothing: the file belongs to the request, and
    :meth:`release` (the request's deferred ``close()``) closes it.
    """

    def __init__(self, file: t.IO[bytes]) -> None:
        super().__init__()
        self.file = file
        self._positions: weakref.WeakKeyDictionary[t.Any, int] = weakref.WeakKeyDictionary()
        self._lock = _allocate_lock()

    def seekable(self) -> bool:
        return True

    def _at(self) -> int:
        return self._positions.get(reader_key(), 0)

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            self.file.seek(self._at())
            data = self.file.read(-1 if size is None else size)
            self._positions[reader_key()] = self.file.tell()
        return data

    def readline(self, size: int | None = -1) -> bytes:
        with self._lock:
            self.file.seek(self._at())
            data = self.file.readline(-1 if size is None else size)
            self._positions[reader_key()] = self.file.tell()
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._at()
        elif whence == io.SEEK_END:
            offset += self.file.seek(0, io.SEEK_END)
        self._positions[reader_key()] = offset
        return offset

    def tell(self) -> int:
        return self._at()

    def close(self) -> None:
        """Does nothing: other greenlets may still read the file."""

    @property
    def closed(self) -> bool:
        return bool(self.file.closed)

    def release(self) -> None:
        """Close the file (the request's deferred ``close()``)."""
        self.file.close()

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.file, name)


# -- adapters' entry points ---------------------------------------------------------


def has_body(environ: dict[str, t.Any]) -> bool:
    """True if the request announces a body (a length above 0, or chunked)."""
    length = environ.get("CONTENT_LENGTH")
    if length and length != "0":
        return True
    return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def share_wsgi_input(
    environ: dict[str, t.Any],
    max_length: t.Callable[[], int | None] | None = None,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    timeout: float | None = DEFAULT_TIMEOUT,
    directory: str | None = None,
    scope: t.Any = None,
    owner: tuple[t.Any, int] | None = None,
    source: tuple[Readable | bytes | None, int | None] | None = None,
) -> SharedBody:
    """Put ``environ["wsgi.input"]`` behind a :class:`SharedBody`, once.

    ``max_length()`` is asked at the first read (a framework's
    ``MAX_CONTENT_LENGTH``). A second call for the same request (a second
    adapter) returns the same body and adds its limit: the smallest counts,
    so an inner framework without a limit does not lift the outer one.
    ``source`` is ``(raw, length)`` to read instead of ``wsgi.input``.
    ``scope`` (a :class:`~geventctx.Scope`) owns the body: its adapter's
    :func:`end_of_response` releases it as the last teardown step.
    """
    body = environ.get(ENVIRON_BODY)
    if isinstance(body, SharedBody):
        if max_length is not None:
            body.add_limit(max_length)
        return body
    raw: Readable | None
    data: bytes | None = None
    if source is not None:
        # What is left of a body a framework began to read itself (the
        # Flask extension, at a request's first hand-off): ``(raw, length)``;
        # ``raw`` is ``bytes`` when the framework read it all (its cache).
        given, length = source
        if isinstance(given, bytes):
            data, raw, length = given, None, len(given)
        else:
            raw = given
    else:
        length = _content_length(environ)
        raw = environ["wsgi.input"]
    if data is None and length is None and not (
        environ.get("wsgi.input_terminated")
        and (source is not None or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower())
    ):
        # Neither a length nor a self-terminating chunked input: like
        # Werkzeug, there is no body to read safely.
        raw = None
    body = SharedBody(
        raw, length, memory_limit=memory_limit, timeout=timeout, directory=directory, environ=environ, owner=owner,
        data=data,
    )
    if max_length is not None:
        body.add_limit(max_length)
    environ[ENVIRON_BODY] = body
    environ["wsgi.input"] = body
    environ["wsgi.input_terminated"] = True  # the shared body ends itself
    body.owner = scope
    return body


#: In ``environ[ENVIRON_BODY]`` once a request ended without a shared body:
#: a late reader gets a clear error instead of racing the server for the socket.
BODY_GONE = "geventctx.body-gone"


def end_of_response(environ: dict[str, t.Any], scope: t.Any) -> None:
    """The response of ``scope``'s request was written, or its app call raised.

    The owner's body is released as the last of its deferred teardown
    steps (so teardown functions can still read it); then, with children
    still holding ``scope``, the rest of the body is captured for them (see
    :meth:`SharedBody.end_response`).

    The rule for a kill: adapters call this from an ``except`` or a server's
    ``finally``, so an exception in flight that is neither an ``Exception``
    nor a generator's ``GeneratorExit`` (a middleware closing its iteration)
    is a kill — ``GreenletExit``, a ``gevent.Timeout``.
    """
    in_flight = sys.exc_info()[1]
    killed = in_flight is not None and not isinstance(in_flight, (Exception, GeneratorExit))
    body = environ.get(ENVIRON_BODY)
    if isinstance(body, SharedBody):
        if body.owner is scope:
            scope.defer(body.release)
        children = scope.holders > 0
        if killed:
            body.end_response(children=children, killed=True)
        else:
            # It may wait for the client: after the response's close(),
            # outside the request's Context (geventctx.request_end.after_response).
            body.end_due = children
    elif body is None and has_body(environ) and _servers.reads_a_socket(environ, environ.get("wsgi.input")):
        # The server discards the unread body now: a later first read would
        # race it for the socket. (A test client's input is in memory, and
        # stays readable after the response, as without geventctx.)
        environ[ENVIRON_BODY] = BODY_GONE


def _content_length(environ: dict[str, t.Any]) -> int | None:
    try:
        value = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return value if value >= 0 else None
