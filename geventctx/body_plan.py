"""What a shared request body decides, with no I/O: plain integers in, answers out.

The rule: a :class:`BodyPlan` knows the body's announced length, its size
limit, the offsets that waiting readers need, how far to read ahead, every
reader's position and the seconds a read may wait; from them it answers the
questions the reader of the server's input asks (how many bytes to ask for
next, what a read that brought ``n`` bytes means, what a timeout means,
which bytes nobody will read again, whether a parse may read straight off
the input). It never reads, never waits, never imports gevent: the bytes are
moved by :mod:`geventctx.body_input`, kept by :mod:`geventctx.spool`, and
:mod:`geventctx.body` puts the three together for the request's greenlets.

.. versionadded:: 0.2
"""

from __future__ import annotations

import enum
import sys
import typing as t
import weakref

__all__ = ["BodyPlan", "Verdict", "EVERYTHING", "CHUNK", "READ_AHEAD"]

#: A target meaning "the whole body".
EVERYTHING = sys.maxsize

#: The largest single read from the server's input (Werkzeug's form parser
#: reads in pieces of this size too).
CHUNK = 64 * 1024

#: How far the pump reads ahead of the furthest reader, where a read that
#: waits can be interrupted without loss (gevent.pywsgi): readers then find
#: their bytes there instead of restarting the pump for each piece.
READ_AHEAD = 1024 * 1024


class Verdict(enum.Enum):
    """What a read off the server's input brought."""

    MORE = "more"  #: bytes, and more may come
    END = "end"  #: the last bytes (or the end of a body of unknown length)
    TOO_LARGE = "too large"  #: past the size limit
    CUT_SHORT = "cut short"  #: the input ended before the announced length


class BodyPlan:
    """The decisions of one request body.

    :param length: the ``Content-Length``, if known.
    :param timeout: seconds a read may wait for the client without a byte
        arriving; ``None`` or ``0``: for ever.
    """

    __slots__ = (
        "length",
        "seconds",
        "limit",
        "opened",
        "targets",
        "ahead",
        "capturing",
        "_pending_limits",
        "_positions",
        "parses",
        "__weakref__",
    )

    def __init__(self, length: int | None, timeout: float | None) -> None:
        self.length = length
        #: Seconds one read may wait for a byte, or ``None``.
        self.seconds: float | None = timeout if timeout and timeout > 0 else None
        #: The largest body allowed (the smallest of the limits), known once opened.
        self.limit: int | None = None
        #: True once the limits were asked (at the first read).
        self.opened = False
        #: End offsets that waiting readers need (:data:`EVERYTHING` for all).
        self.targets: list[int] = []
        #: Where reading ahead stops (see :data:`READ_AHEAD`).
        self.ahead = 0
        #: True while the rest is taken for readers that come after the response.
        self.capturing = False
        self._pending_limits: list[t.Callable[[], int | None]] = []
        self._positions: weakref.WeakKeyDictionary[t.Any, int] | None = None
        #: Position of each parse in progress whose result is cached (its reader -> offset).
        self.parses: dict[t.Any, int] = {}

    # -- the size limit ------------------------------------------------------

    def add_limit(self, max_length: t.Callable[[], int | None]) -> None:
        """Also bound the body by ``max_length()``, asked at :meth:`open`
        (at once if opened already); the smallest of the limits counts."""
        if self.opened:
            self._lower_limit(max_length())
        else:
            self._pending_limits.append(max_length)

    def _lower_limit(self, limit: int | None) -> None:
        if limit is not None and (self.limit is None or limit < self.limit):
            self.limit = limit

    def open(self) -> bool:
        """Ask the limits (at the first read, in the reader's context: a
        limit such as Flask's ``request.max_content_length`` needs it).
        ``False`` if the announced length is over the limit: refused before
        a byte is read, so the server's input stays in step."""
        self.opened = True
        pending, self._pending_limits = self._pending_limits, []
        for get in pending:
            self._lower_limit(get())
        return not (self.length is not None and self.limit is not None and self.length > self.limit)

    # -- what to read next ---------------------------------------------------

    def want(self, target: int, lossless: bool) -> None:
        """A reader waits until ``target`` bytes arrived. On a lossless input
        the bytes up to :data:`READ_AHEAD` past it are read too."""
        self.targets.append(target)
        if lossless and target + READ_AHEAD > self.ahead:
            self.ahead = EVERYTHING if target == EVERYTHING else target + READ_AHEAD

    def got(self, target: int) -> None:
        """The reader waiting for ``target`` stopped waiting (served or not)."""
        self.targets.remove(target)

    def wanted(self, size: int) -> int:
        """How many bytes the next read should ask for, ``size`` bytes having
        arrived; 0: stop reading."""
        pending = [target for target in self.targets if target > size]
        if pending:
            wanted = min(min(pending) - size, CHUNK)
        elif self.capturing or size < self.ahead:
            wanted = CHUNK
        else:
            return 0
        return self.clip(size, wanted)

    def clip(self, size: int, wanted: int) -> int:
        """``wanted`` bytes, but none past the announced length and no more
        than one past the limit (that one byte says "too large")."""
        if self.length is not None:
            return min(wanted, self.length - size)
        if self.limit is not None:
            return min(wanted, self.limit + 1 - size)
        return wanted

    def stop_reading_ahead(self) -> None:
        """Nobody will read on: the server discards the rest itself."""
        self.ahead = 0

    def others_wait(self, own: int, size: int) -> bool:
        """True if a reader other than the one waiting for ``own`` waits for
        bytes past ``size``."""
        pending = [target for target in self.targets if target > size]
        if own in pending:
            pending.remove(own)
        return bool(pending)

    def wakes(self, size: int) -> bool:
        """True if a waiter for bytes can go on, ``size`` bytes having arrived."""
        return bool(self.targets) and min(self.targets) <= size

    # -- what a read brought ---------------------------------------------------

    def accept(self, size: int, arrived: int) -> tuple[int, Verdict]:
        """A read brought ``arrived`` bytes, ``size`` having arrived before:
        how many of them count (no more than one past the limit) and what
        they mean."""
        if not arrived:
            return 0, Verdict.END if self.length is None else Verdict.CUT_SHORT
        limit = self.limit
        if limit is not None and size + arrived > limit:
            return min(arrived, limit + 1 - size), Verdict.TOO_LARGE
        if size + arrived == self.length:
            return arrived, Verdict.END
        return arrived, Verdict.MORE

    def quiet_on_timeout(self, lossless: bool) -> bool:
        """A read timed out: ``True`` if it only read ahead for nobody on a
        lossless input (stop, nothing lost), ``False`` if it is the body's
        timeout error."""
        return lossless and not (self.targets or self.capturing)

    # -- readers' positions ----------------------------------------------------

    @property
    def positions(self) -> weakref.WeakKeyDictionary[t.Any, int]:
        """Each raw reader's position (a reader key -> offset), made on first use."""
        positions = self._positions
        if positions is None:
            positions = self._positions = weakref.WeakKeyDictionary()
        return positions

    def position_of(self, key: t.Any) -> int | None:
        """The position of reader ``key``, or ``None`` if it has none."""
        positions = self._positions
        return None if positions is None else positions.get(key)

    def keep_from(self) -> int:
        """The first byte somebody may still read while a parse runs.

        The rule: while a parse runs, a new raw reader waits for it and
        starts where it ended (if it was interrupted: an error), so only the
        parses and the readers that have a position need bytes — a reader
        has one from the moment its first read begins, before it waits for
        a byte; otherwise a new reader may start at the first byte.
        """
        if not self.parses:
            return 0
        needed = list(self.parses.values())
        if self._positions:
            needed.extend(self._positions.values())
        return min(needed)

    def may_read_through(self, position: int, size: int, own: t.Any) -> bool:
        """True if the only parse, at ``position``, may take its bytes
        straight off the input and keep none: it is at the end of what
        arrived (``size``), nobody else waits or captures, and no reader but
        the parse's own (``own``, whose raw position the parse moves on)
        has a position: a reader with one reads on from there."""
        if position != size or len(self.parses) != 1 or self.targets or self.capturing:
            return False
        positions = self._positions
        return not positions or all(key is own for key in list(positions.keys()))
