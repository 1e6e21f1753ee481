"""A request body as it arrives: bytes in, reads at any offset out.

The rule: a :class:`Spool` holds every byte appended to it, in memory up to
``memory_limit`` bytes and then in an anonymous temporary file, until it is
closed; it knows whether more may come (``ended``) or why none will
(``error``), and nothing else. It never reads a socket, never blocks and
never waits: that is the job of :mod:`geventctx.body`, which feeds it.

Cost: a body of up to ``memory_limit`` bytes costs that much memory; a larger
one costs one write and (per whole read) one read of a temporary file, which
the operating system keeps in its page cache, and at most ``memory_limit``
bytes of process memory. The file has no name (it is unlinked when made), so
nothing is left on disk even if the process dies; :meth:`close` frees it.

Thread safety: one thread appends (the request's hub), any thread may read.
File reads and the switch from memory to file happen under a native lock;
memory reads need only the GIL.

.. versionadded:: 0.2
"""

from __future__ import annotations

import os
import tempfile
import typing as t

from gevent.monkey import get_original

__all__ = ["Spool", "DEFAULT_MEMORY_LIMIT"]

#: Bytes a spool keeps in memory before it moves to a temporary file.
DEFAULT_MEMORY_LIMIT = 1024 * 1024

# Never monkey-patched: readers may be native threads (ThreadPool tasks).
_allocate_lock = get_original("_thread", "allocate_lock")


class Spool:
    """An append-only byte store, readable at any offset while it grows.

    :param memory_limit: bytes kept in memory; past it, everything moves to
        an unnamed temporary file.
    :param directory: where that file is made (``None``: the system's
        temporary directory).
    """

    __slots__ = ("memory_limit", "directory", "size", "ended", "error", "closed", "_memory", "_file", "_lock")

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
        self._memory: bytearray | None = bytearray()
        self._file: t.IO[bytes] | None = None
        self._lock = _allocate_lock()

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
        memory = self._memory
        if memory is not None and len(memory) + len(data) <= self.memory_limit:
            memory += data
        else:
            with self._lock:
                if self.closed:
                    return
                file = self._file
                if file is None:
                    file = self._file = tempfile.TemporaryFile(dir=self.directory)
                    if memory:
                        file.write(memory)
                    # Readers holding the bytearray keep reading their copy;
                    # new readers find the file.
                    self._memory = None
                file.write(data)
                file.flush()
        self.size += len(data)

    def end(self) -> None:
        """No more bytes: the body is complete."""
        if not self.done:
            self.ended = True

    def fail(self, error: BaseException) -> None:
        """No more bytes, because of ``error`` (kept for every reader)."""
        if not self.done:
            self.error = error

    # -- readers ---------------------------------------------------------------

    def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``position``: only what has arrived.

        Returns ``b""`` at the current end, whatever the state: the caller
        decides whether to wait, to report the end, or to raise ``error``.
        """
        if self.closed:
            raise ValueError("read from a closed spool")
        end = min(self.size, position + size) if size >= 0 else self.size
        if end <= position:
            return b""
        memory = self._memory
        if memory is not None:
            if position == 0 and end == len(memory):
                return bytes(memory)
            return bytes(memory[position:end])
        with self._lock:
            if self.closed:
                raise ValueError("read from a closed spool")
            assert self._file is not None
            return os.pread(self._file.fileno(), end - position, position)

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
            self._memory = None
            file, self._file = self._file, None
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        state = (
            "closed" if self.closed else "ended" if self.ended else f"failed {self.error!r}" if self.error else "open"
        )
        where = "file" if self._file is not None else "memory"
        return f"<Spool {state} {self.size} bytes in {where}>"
