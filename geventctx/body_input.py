"""Moving a request body's bytes off the server's input: the only part of the
shared body that reads a socket, starts a timer or a greenlet.

The rule: one reader at a time reads the server's input, and
:attr:`InputReader.reading` says who — nobody (``None``); a greenlet that
needs bytes, reading them itself (:data:`INLINE`: never interrupted from
outside, the socket's reading side is shut instead); or a greenlet reading
for others, the pump or the request's greenlet capturing the rest after the
response (that greenlet: stopped by a throw from a hub callback). Every read
is bounded by the plan's seconds, and its bytes go to the spool, or — read
straight through by a parse that alone needs them — are only counted there.
What to ask for and what a read means is the plan's
(:mod:`geventctx.body_plan`); what a server's input is, :mod:`geventctx._servers`'.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

import gevent
from gevent import Timeout
from greenlet import GreenletExit
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from . import _servers
from ._wakeup import Changes
from .body_plan import BodyPlan, Verdict
from .errors import BodyReadError, BodyTimeout
from .spool import Spool

__all__ = ["InputReader", "INLINE", "QuietStop"]

#: :attr:`InputReader.reading` while a reader reads the input itself.
INLINE = object()


class QuietStop(Exception):
    """The pump stops reading ahead: nobody waits and nothing was lost."""


class InputReader:
    """Reads one request's input into its spool, as its plan says.

    :param raw: the server's input.
    :param environ: the request's environ, to close the connection when the
        input was left out of step.
    """

    __slots__ = (
        "raw", "source", "lossless", "spool", "plan", "changes", "environ", "reading", "broken", "idle_waiters"
    )

    def __init__(
        self, raw: t.Any, spool: Spool, plan: BodyPlan, changes: Changes, environ: dict[str, t.Any]
    ) -> None:
        self.raw = raw
        self.source = _servers.source_for(raw) if raw is not None else None
        #: True if a read interrupted while it waits loses nothing.
        self.lossless: bool = self.source is not None and self.source.lossless
        self.spool = spool
        self.plan = plan
        self.changes = changes
        self.environ = environ
        #: Who reads the input now (see the module's rule).
        self.reading: t.Any = None
        #: True once the server's input was left out of step (a read cut
        #: short): the connection must not be reused.
        self.broken = False
        #: How many wait for nobody to read the input (:meth:`wait_idle`).
        self.idle_waiters = 0

    def open(self) -> None:
        """Ask the limits (at the first read); a body announced over the
        limit fails at once, before a byte is read."""
        if not self.plan.open():
            self.spool.fail(RequestEntityTooLarge())
            self.changes.notify()

    def reads_itself(self) -> bool:
        """The rule for who reads: the greenlet that needs bytes reads them
        itself when nobody else reads and an interrupted read loses nothing
        (a lossless source); otherwise the pump does, and it waits."""
        return self.reading is None and self.lossless

    # -- the pump: a greenlet reading for the others ---------------------------

    def start_pump(self) -> None:
        """Start the pump, unless somebody reads (only in the request's hub:
        a thread schedules this there)."""
        if self.reading is None and not self.spool.done:
            self.reading = gevent.spawn_raw(self._run_pump)

    def _run_pump(self) -> None:
        spool = self.spool
        try:
            while not spool.done and self.take(self.plan.wanted(spool.size)) is not None:
                pass
        except GreenletExit:
            # Killed by abort(): the request itself is going away.
            self.broken = True
            spool.fail(BodyReadError("reading the request body was interrupted: the request was stopped"))
        except BaseException as exc:
            self.failed(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.reading = None
            self.changes.notify()

    # -- a reader's own reads ----------------------------------------------------

    def read_inline(self, target: int, marker: t.Any = INLINE) -> None:
        """The pump's work, done by a reader itself while it alone needs
        bytes (no pump greenlet, no switch: what arrived with the headers is
        read at once), up to its own ``target``, so it never waits for bytes
        it did not ask for. Interrupted while it waits (killed, its own
        ``gevent.Timeout``), it loses nothing and fails nothing: the next
        reader goes on. An ``Exception`` from the read is the body's failure,
        for every reader, as the pump's would be. ``marker``: what
        :attr:`reading` says meanwhile (the capturing greenlet, to be stopped)."""
        spool = self.spool
        plan = self.plan
        self.reading = marker
        try:
            while not (spool.size >= target or spool.done) and self.take(plan.wanted(spool.size)) is not None:
                pass
        except Exception as exc:
            self.failed(exc)
        finally:
            self.reading = None
            if not spool.done and plan.others_wait(target, spool.size):
                # Another reader (a thread task: it does not re-check at
                # once) needs more than this one did: the pump goes on.
                self.start_pump()
            self.changes.notify()

    def read_through(self, size: int) -> bytes | None:
        """A parse's read straight off the input, kept nowhere (the plan
        allowed it: :meth:`~geventctx.body_plan.BodyPlan.may_read_through`):
        ``size`` bytes as a buffered reader gives them (a parser's work grows
        with the number of pieces), fewer only at the end. ``None``: read
        through the spool instead."""
        spool = self.spool
        plan = self.plan
        source = self.source
        assert source is not None
        self.reading = INLINE
        data: bytes | None = None
        try:
            size = plan.clip(spool.size, size)
            try:
                whole = source.read_exactly(size, plan.seconds)
            except _servers.SourceTimeout:
                self.broken = True
                raise BodyTimeout(f"the client sent no request body bytes for {plan.seconds:g}s") from None
            if whole is None:
                pass  # this input cannot: the parse reads through the spool
            elif whole and plan.length is not None and spool.skip(len(whole)):
                # A known length is within the limit (checked at open) and
                # read_exactly raises at an early end: only the end is news.
                data = whole
                if spool.size == plan.length:
                    spool.end()
                    self.changes.notify()
            else:
                data = self._taken(whole)  # the spool could not leave them out: kept
        except Exception as exc:
            self.failed(exc)
        except BaseException:
            # Interrupted (killed, the reader's own timeout). Waiting for the
            # first byte of this read, it lost nothing: it just stops (what
            # earlier reads took was kept nowhere: a later reader of those
            # bytes gets BodyReadError from the spool). Interrupted after it
            # took bytes, they are gone with it: the body fails.
            if source.lost:
                self.broken = True
                spool.fail(BodyReadError("reading the request body was interrupted: the parse reading it was stopped"))
            raise
        finally:
            self.reading = None
            if plan.targets or self.idle_waiters:
                # Someone came while it read: the pump serves a reader, and
                # a waiter for the input to be idle looks again. (Nobody
                # else is woken per read: a greenlet waiting for the parse's
                # result sleeps until the parse ends.)
                if not spool.done and plan.targets:
                    self.start_pump()
                self.changes.notify()
        if data is None and spool.error is not None:
            raise spool.error
        return data

    # -- one read ------------------------------------------------------------------

    def take(self, wanted: int) -> bytes | None:
        """One read off the input into the spool; ``None``: stop."""
        if wanted <= 0:
            return None
        try:
            data = self._read_source(wanted)
        except QuietStop:
            return None
        return self._taken(data)

    def _taken(self, data: bytes) -> bytes | None:
        # What a read brought: counted, kept, judged.
        spool = self.spool
        if spool.closed:
            return None
        count, verdict = self.plan.accept(spool.size, len(data))
        if count:
            if count < len(data):
                data = data[:count]  # one byte past the limit, no more
            spool.append(data)
        if verdict is Verdict.TOO_LARGE:
            raise RequestEntityTooLarge()  # not out of step: the server can discard the rest
        if verdict is Verdict.CUT_SHORT:
            self.broken = True
            raise ClientDisconnected(f"the client sent {spool.size} of {self.plan.length} announced body bytes")
        if verdict is Verdict.END:
            spool.end()
            self.changes.notify()
        elif self.plan.wakes(spool.size):
            self.changes.notify()
        return data

    def _read_source(self, size: int) -> bytes:
        source = self.source
        assert source is not None
        seconds = self.plan.seconds
        if seconds is None:
            return source.read(size)
        # A new timer per read: a gevent Timeout started again after
        # cancel() keeps its first deadline (the timeout counts per read).
        timer = Timeout(seconds)
        timer.start()
        try:
            return source.read(size)
        except Timeout as exc:
            if exc is not timer:
                raise
            if self.plan.quiet_on_timeout(source.lossless):
                raise QuietStop() from None  # reading ahead, nobody waiting, nothing lost
            self.broken = True
            raise BodyTimeout(f"the client sent no request body bytes for {timer.seconds:g}s") from None
        finally:
            timer.close()

    def failed(self, exc: BaseException) -> None:
        """The input failed with ``exc``: the body's error, for every reader."""
        if not isinstance(exc, RequestEntityTooLarge):
            self.broken = True  # the server's input failed mid-read
        self.spool.fail(_servers.translate(exc))

    # -- stopping ------------------------------------------------------------------

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nobody reads the input; ``False`` if ``timeout`` passed."""
        self.idle_waiters += 1
        try:
            return self.changes.wait(lambda: self.reading is None, timeout=timeout)
        finally:
            self.idle_waiters -= 1

    def stop_reading_ahead(self) -> None:
        """Nobody will read on: the server discards the rest itself. A read
        ahead that waits is stopped without loss."""
        self.plan.stop_reading_ahead()
        reading = self.reading
        if reading not in (None, INLINE) and self.lossless:
            self.changes.hub.loop.run_callback(self._stop, reading, QuietStop, True)

    def _stop(self, reader: t.Any, error: type[BaseException], only_if_idle: bool) -> None:
        # A hub callback, so it checks what it finds when it runs, not when
        # it was scheduled: the same reader, still alive (a throw into a dead
        # greenlet fails in the hub), and for a quiet stop nobody waiting.
        if self.reading is reader and not reader.dead and not (only_if_idle and self.plan.targets):
            reader.throw(error)

    def abort(self) -> None:
        """Stop whoever reads, now: the input is left out of step."""
        reading = self.reading
        if reading is None:
            return
        self.broken = True
        if reading is INLINE:
            # A reader reading inline is not killed (it may be a child that
            # lives on): the connection's reading side is shut instead, so
            # its read ends at once (the body fails for every reader).
            _servers.shut_reading(self.environ, self.raw)
        else:
            self.changes.hub.loop.run_callback(self._stop, reading, GreenletExit, False)
        self.wait_idle(1.0)

    def close(self) -> None:
        """The body is released: free what reading made (a socket's duplicate)."""
        if self.source is not None:
            self.source.close()

    def close_if_broken(self) -> None:
        """Close the connection if the input was left out of step."""
        if self.broken:
            _servers.close_connection(self.environ, self.raw)
