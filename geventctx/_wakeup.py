"""Wake waiters of the request's hub and of other threads alike.

The rule: :meth:`Changes.wait` returns once ``check()`` is true, re-checking
after every :meth:`Changes.notify`; greenlets of the owner hub wait on a
gevent :class:`~gevent.event.Event`, native threads (ThreadPool tasks) on a
native lock, and ``notify`` may be called from any thread. A waiter that is
killed stops waiting and leaves nothing registered.

Cost: a wait registers one event; ``notify`` with nobody waiting is two
attribute reads.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

from gevent import get_hub
from gevent.event import Event
from gevent.monkey import get_original

__all__ = ["Changes"]

_get_ident = get_original("_thread", "get_ident")
_allocate_lock = get_original("_thread", "allocate_lock")


class Changes:
    """Something a reader waits for has changed: look again."""

    __slots__ = ("_thread", "_hub", "_event", "_native")

    def __init__(self, owner: tuple[t.Any, int] | None = None) -> None:
        # owner: (hub, thread id) of the request, if made in another thread.
        hub, thread = owner if owner is not None else (get_hub(), _get_ident())
        self._hub: t.Any = hub
        self._thread: int = thread
        self._event: Event | None = None
        self._native: list[t.Any] = []

    @property
    def hub(self) -> t.Any:
        """The hub this belongs to (the request's)."""
        return self._hub

    def in_owner_thread(self) -> bool:
        return bool(_get_ident() == self._thread)

    def wait(self, check: t.Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``check()`` is true; ``False`` if ``timeout`` passed first."""
        if check():
            return True
        if _get_ident() == self._thread:
            return self._wait_in_hub(check, timeout)
        return self._wait_in_thread(check, timeout)

    def _wait_in_hub(self, check: t.Callable[[], bool], timeout: float | None) -> bool:
        loop = self._hub.loop
        deadline = None if timeout is None else loop.now() + timeout
        while not check():
            event = self._event
            if event is None:
                event = self._event = Event()
            left = None if deadline is None else deadline - loop.now()
            if left is not None and left <= 0:
                return False
            event.wait(left)
        return True

    def _wait_in_thread(self, check: t.Callable[[], bool], timeout: float | None) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lock = _allocate_lock()
            lock.acquire()
            self._native.append(lock)
            try:
                if check():  # a notify may have come before we registered
                    return True
                left = -1 if deadline is None else deadline - time.monotonic()
                if deadline is not None and left <= 0:
                    return False
                # Re-check now and then even without a notify: a lost
                # wakeup costs a short delay, never a hang.
                lock.acquire(True, 1.0 if left < 0 else min(left, 1.0))
            finally:
                try:
                    self._native.remove(lock)
                except ValueError:
                    pass
            if check():
                return True

    def notify(self) -> None:
        """Wake every waiter; they re-check. Callable from any thread."""
        native = self._native
        if native:
            for lock in list(native):
                try:
                    lock.release()
                except RuntimeError:
                    pass  # released already
        if _get_ident() == self._thread:
            self._notify_hub()
        else:
            # Every change of _event happens in the owner thread; always
            # schedule, since a waiter may be about to make one.
            self._hub.loop.run_callback_threadsafe(self._notify_hub)

    def _notify_hub(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()
