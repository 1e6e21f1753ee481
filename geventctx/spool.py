"""A request body as it arrives: bytes in, reads at any offset out.

The rule: a :class:`Spool` holds every byte appended to it, in memory up to
``memory_limit`` bytes and then in an anonymous temporary file, until it is
closed; it knows whether more may come (``ended``) or why none will
(``error``), and nothing else. It never reads a socket, never blocks and
never waits: that is the job of :mod:`geventctx.body`, which feeds it.

The bytes before :attr:`kept_from` are gone: :meth:`forget` frees what
nobody will read again (the body decides who that is), so a single reader
that reads as bytes arrive leaves at most the piece it is reading in the
spool, however large the body; a read there raises :class:`Forgotten`.
The memory limit counts the bytes kept, not the bytes seen.

One exception to the limit: while a reader *holds* the spool (:meth:`hold`,
a whole-body read such as ``get_data()``, which will hold every byte in
memory itself), the bytes stay in memory, and :meth:`whole` then returns
one ``bytes`` object that the reader and the spool share — the body is in
memory once, not twice, and never written to disk for nothing.

Cost: a body of up to ``memory_limit`` bytes costs that much memory, kept
as the pieces that arrived (no copy); a larger one costs one write and (per
read) one read of a temporary file, which the operating system keeps in its
page cache, and at most ``memory_limit`` bytes of process memory. The file
has no name (it is unlinked when made), so nothing is left on disk even if
the process dies; :meth:`close` frees it.

Thread safety: one thread appends (the request's hub), any thread may read
or hold. Appends, file reads and the switch from memory to file happen
under a native lock; memory reads take one consistent snapshot and need
only the GIL.

.. versionadded:: 0.2
"""

from __future__ import annotations

import bisect
import os
import tempfile
import typing as t

from gevent.monkey import get_original

__all__ = ["Spool", "Forgotten", "DEFAULT_MEMORY_LIMIT"]

#: Bytes a spool keeps in memory before it moves to a temporary file.
DEFAULT_MEMORY_LIMIT = 1024 * 1024

# Never monkey-patched: readers may be native threads (ThreadPool tasks).
_allocate_lock = get_original("_thread", "allocate_lock")

#: The pieces in memory and the offset each starts at, swapped as one.
_Pieces = t.Tuple[t.List[bytes], t.List[int]]


class Forgotten(LookupError):
    """A read before :attr:`Spool.kept_from`: those bytes were not kept."""


def _write_all(fd: int, data: t.Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """An append-only byte store, readable at any offset while it grows.

    :param memory_limit: bytes kept in memory; past it, everything moves to
        an unnamed temporary file.
    :param directory: where that file is made (``None``: the system's
        temporary directory).
    """

    __slots__ = (
        "memory_limit",
        "directory",
        "size",
        "ended",
        "error",
        "closed",
        "_pieces",
        "_file",
        "_lock",
        "_holds",
        "kept_from",
        "most_kept",
        "written",
        "_file_from",
    )

    def __init__(self, memory_limit: int = DEFAULT_MEMORY_LIMIT, directory: str | None = None) -> None:
        self.memory_limit = memory_limit
        self.directory = directory
        #: Bytes appended so far.
        self.size = 0
        #: True once the last byte arrived: the body is complete.
        self.ended = False
        #: Why no more bytes will come (the body is incomplete), or ``None``.
        self.error: BaseException | None = None
        #: True once :meth:`close` freed the bytes.
        self.closed = False
        self._pieces: _Pieces | None = ([], [])
        self._file: t.Any = None
        self._lock = _allocate_lock()
        self._holds = 0
        #: The first byte still kept (:meth:`forget` moves it).
        self.kept_from = 0
        #: The most bytes kept at once, in memory or on disk.
        self.most_kept = 0
        #: Bytes written to the temporary file.
        self.written = 0
        self._file_from = 0  # the offset of the file's first byte

    @property
    def done(self) -> bool:
        """True if no more bytes will come: ended, failed or closed."""
        return self.ended or self.error is not None or self.closed

    @property
    def on_disk(self) -> bool:
        """True once the bytes moved to the temporary file."""
        return self._file is not None

    # -- the writer ------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Add ``data`` at the end. Ignored once closed (the request ended)."""
        if self.done:
            if self.closed:
                return
            raise RuntimeError("append to a spool that has ended or failed")
        with self._lock:  # against a spill by a thread's unhold()
            if self.closed:
                return
            pieces = self._pieces
            kept = self.size - self.kept_from + len(data)
            if pieces is not None and (self._holds or kept <= self.memory_limit):
                chunks, starts = pieces
                chunks.append(data)  # before its offset: readers index by offset
                starts.append(self.size)
            else:
                self._spill()
                _write_all(self._file.fileno(), data)
                self.written += len(data)
            self.size += len(data)
            if kept > self.most_kept:
                self.most_kept = kept

    def _spill(self) -> None:
        # Under the lock: move the pieces in memory to the file, once.
        if self._file is None:
            # Unbuffered: a write is one system call, and pread() sees it.
            self._file = tempfile.TemporaryFile(buffering=0, dir=self.directory)
            self._file_from = self.kept_from
            pieces = self._pieces
            if pieces is not None:
                for chunk in pieces[0]:
                    _write_all(self._file.fileno(), chunk)
                    self.written += len(chunk)
            # Readers holding the old snapshot keep reading it.
            self._pieces = None

    def end(self) -> None:
        """No more bytes: the body is complete."""
        if not self.done:
            self.ended = True

    def fail(self, error: BaseException) -> None:
        """No more bytes, because of ``error`` (kept for every reader)."""
        if not self.done:
            self.error = error

    def forget(self, below: int) -> None:
        """Free the bytes before offset ``below``: nobody will read them.

        In memory only, and whole pieces only (the piece holding ``below``
        stays); not while a whole-body read holds the spool.
        """
        with self._lock:
            pieces = self._pieces
            if pieces is None or self._holds or below <= self.kept_from:
                return
            chunks, starts = pieces
            first = bisect.bisect_right(starts, below) - 1
            if first > 0:
                # New lists: a reader's snapshot of the old ones stays whole.
                self._pieces = (chunks[first:], starts[first:])
                self.kept_from = starts[first]

    def skip(self, size: int) -> bool:
        """``size`` more bytes went by that nobody will read again: count
        them, keep nothing (every kept byte is forgotten too). ``False``
        (nothing done) once on disk, where bytes cannot be left out."""
        with self._lock:
            if self.done or self._pieces is None or self._holds:
                return False
            self.size += size
            self.kept_from = self.size
            self._pieces = ([], [])
            return True

    # -- whole-body readers ------------------------------------------------------

    def hold(self) -> bool:
        """Keep the bytes in memory (for a whole-body read that will hold
        them all itself). Returns ``False`` if they are on disk already."""
        with self._lock:  # a ThreadPool task may hold it too
            if self._pieces is None or self.closed:
                return False
            self._holds += 1
            return True

    def unhold(self) -> None:
        """The whole-body read is over; past the limit, the bytes move to
        disk unless they became one shared whole (:meth:`whole`)."""
        with self._lock:
            self._holds -= 1
            pieces = self._pieces
            if self._holds == 0 and pieces is not None and len(pieces[0]) > 1 and self.size > self.memory_limit:
                if not self.closed:
                    self._spill()

    def whole(self) -> bytes:
        """Every byte appended so far, as one ``bytes``; in memory, the spool
        keeps that same object as its only piece (no second copy)."""
        pieces = self._pieces
        if pieces is None or self.kept_from:
            return self.read(0, -1)
        chunks = pieces[0]
        size = self.size
        if len(chunks) == 1 and len(chunks[0]) == size:
            return bytes(chunks[0])
        data = b"".join(chunks[: bisect.bisect_left(pieces[1], size)])
        if len(data) == size and self._pieces is pieces and not self.closed:
            self._pieces = ([data], [0])
        return data

    # -- readers ---------------------------------------------------------------

    def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``position``: only what has arrived.

        Returns ``b""`` at the current end, whatever the state: the caller
        decides whether to wait, to report the end, or to raise ``error``.
        Raises :class:`Forgotten` before :attr:`kept_from`.
        """
        if self.closed:
            raise ValueError("read from a closed spool")
        end = min(self.size, position + size) if size >= 0 else self.size
        pieces = self._pieces  # one snapshot: forget() and skip() make new lists
        if pieces is not None and position < (pieces[1][0] if pieces[1] else self.kept_from):
            raise Forgotten(f"bytes from {position} were not kept")
        if end <= position:
            return b""
        if pieces is not None:
            return _read_pieces(pieces, position, end)
        with self._lock:
            if self.closed:
                raise ValueError("read from a closed spool")
            if position < self._file_from:
                raise Forgotten(f"bytes from {position} were not kept (the spool keeps those from {self._file_from})")
            return os.pread(self._file.fileno(), end - position, position - self._file_from)

    def find(self, byte: bytes, position: int, limit: int) -> int:
        """Offset of the first ``byte`` in ``[position, limit)``, or ``-1``."""
        end = min(self.size, limit)
        step = 64 * 1024
        while position < end:
            chunk = self.read(position, min(step, end - position))
            found = chunk.find(byte)
            if found >= 0:
                return position + found
            position += len(chunk)
        return -1

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """Free the bytes (memory, file). Reads fail from now on."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._pieces = None
            file, self._file = self._file, None
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        state = (
            "closed" if self.closed else "ended" if self.ended else f"failed {self.error!r}" if self.error else "open"
        )
        where = "file" if self._file is not None else "memory"
        return f"<Spool {state} {self.size} bytes in {where}>"


def _read_pieces(pieces: _Pieces, position: int, end: int) -> bytes:
    chunks, starts = pieces
    index = bisect.bisect_right(starts, position) - 1
    first = chunks[index]
    offset = position - starts[index]
    if end - starts[index] <= len(first):
        # Within one piece (the common case: a reader reads what arrived).
        if offset == 0 and end - position == len(first):
            return first
        return first[offset : offset + end - position]
    out = [first[offset:]]
    got = len(first) - offset
    index += 1
    while position + got < end:
        chunk = chunks[index]
        take = min(len(chunk), end - position - got)
        out.append(chunk if take == len(chunk) else chunk[:take])
        got += take
        index += 1
    return b"".join(out)
