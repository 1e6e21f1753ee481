"""Request scopes: a unit of work whose end waits for its hand-offs.

A :class:`Scope` is framework-neutral. An adapter (the Flask extension, the
WSGI middleware) creates one per request and *enters* it, which makes it the
:func:`current_scope` of the request's greenlet and, through the context
snapshot, of every greenlet that request hands its context to. The request
itself is the first holder; every explicit hand-off acquires the scope when
it starts and releases it when it ends, however it ends. When the last holder
leaves, the scope closes and runs its close callbacks (the *steps*) exactly
once, in order, in the request's own Context: that is where adapters put
teardown. A step runs holding the scope and with the scope current, so a
hand-off made by a teardown function holds the request too: the next step
waits for it.

A scope belongs to the thread (and so the gevent hub) that created it; it is
acquired and released from greenlets of that hub only: a hand-off made in
another thread is handed over to that hub (:mod:`geventctx._threads`).

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import time
import typing as t
import weakref
from contextvars import ContextVar, Token

import gevent
from gevent import get_hub
from gevent.event import Event
from gevent.hub import Hub
from greenlet import getcurrent

from ._threads import get_ident as _get_ident
from .isolation import RequestContext

__all__ = ["Scope", "current_scope", "register_opener", "scope_for_handoff"]

log = logging.getLogger("geventctx")

#: Where an adapter keeps the scope of a request in its WSGI environ, so that
#: a second adapter on the same request (the Flask extension inside the WSGI
#: middleware) nests in it instead of managing the request twice.
ENVIRON_SCOPE = "geventctx.scope"

_SCOPE: ContextVar[Scope | None] = ContextVar("geventctx.scope", default=None)

#: Set by an adapter in a request's own Context when the request starts: its
#: per-request state, whose scope is made at the request's first hand-off
#: (DESIGN, "Pay for what you use": a request that never hands off makes
#: none). Data only; what makes the scope is the adapter's registered opener.
_PENDING: ContextVar[t.Any] = ContextVar("geventctx.pending_scope", default=None)

#: ``opener(pending) -> Scope | None`` by the type of the pending state:
#: what an adapter registers with this layer (the one way up, as forks).
Opener = t.Callable[[t.Any, bool], "Scope | None"]
_openers: dict[type, Opener] = {}


def register_opener(kind: type, opener: Opener) -> None:
    """Make ``opener(state, handoff)`` the way a scope comes into being for a
    request whose adapter left ``state`` (an instance of ``kind``) pending in
    the request's Context. Called with ``handoff=True`` at each hand-off
    until the scope is current (the request's first hand-off: it makes the
    scope if need be and enters it), with ``False`` by
    :func:`current_scope` (make it, do not enter it); it returns the scope,
    or ``None`` (the request ended; not the request's own Context)."""
    _openers[kind] = opener


def _open_pending(handoff: bool) -> Scope | None:
    pending = _PENDING.get()
    if pending is None:
        return None
    opener = _openers.get(type(pending))
    return opener(pending, handoff) if opener is not None else None


def scope_for_handoff() -> Scope | None:
    """The current request scope for a hand-off about to be made: made now
    if the running request has one pending (its first hand-off); ``None``
    outside a request."""
    scope = _SCOPE.get()
    if scope is None:
        scope = _open_pending(True)
    return scope


def current_scope() -> Scope | None:
    """The request scope active in this greenlet, or ``None`` outside one.

    A child handed a request's context sees the request's scope even after
    the request ended; check :attr:`Scope.closed` for that. In a request
    that has not handed off yet, asking makes its scope.
    """
    scope = _SCOPE.get()
    if scope is None:
        scope = _open_pending(False)
    return scope


_every_scope: weakref.WeakSet[Scope]


class Scope:
    """Holders count, deferred close callbacks and request state of one request.

    :param label: what the scope is, for logs and the registry, such as
        ``"GET /upload"``.
    """

    __slots__ = (
        "label",
        "_holders",
        "_callbacks",
        "_closed_event",
        "closed",
        "_done",
        "owner_done_at",
        "response_started",
        "extras",
        "parent",
        "home",
        "_running",
        "children",
        "nested",
        "thread",
        "hub",
        "_raising",
        "adapter",
        "__weakref__",
    )

    def __init__(self, label: str = "", home: RequestContext | None = None) -> None:
        self.label = label
        #: The Context the scope's steps run in: the request's own (by
        #: default the running one, where an adapter makes the scope).
        self.home = home if home is not None else RequestContext.current()
        #: The thread and hub the scope belongs to: it changes only there
        #: (hand-offs from other threads are handed over, see _threads).
        self.thread = _get_ident()
        self.hub = get_hub()
        self._running = False
        self._raising = False
        #: The registry entries of the running hand-offs holding this scope,
        #: by ``id`` of the child: the scope's own, for O(own) look-ups.
        self.children: dict[int, t.Any] = {}
        #: Weak references to scopes nested in this one (:meth:`hold_parent`).
        self.nested: list[weakref.ref[Scope]] = []
        #: The request itself holds the scope until :meth:`finish`.
        self._holders = 1
        self._callbacks: list[tuple[t.Callable[..., t.Any], tuple[t.Any, ...]]] = []
        self._closed_event: Event | None = None
        #: True once the last holder left and the close callbacks started.
        self.closed = False
        self._done = False
        #: When the request itself finished (:meth:`finish`), or ``None``.
        self.owner_done_at: float | None = None
        #: Set by adapters once the status and headers were handed to the server.
        self.response_started = False
        #: Per-scope state of adapters (body lock, session guard, ...).
        self.extras: dict[str, t.Any] = {}
        #: An enclosing scope this one holds until it has closed (a Flask
        #: request inside the WSGI middleware's request), or ``None``.
        self.parent: Scope | None = None
        #: What the adapter that made the scope keeps of it beyond its end
        #: (unlike :attr:`extras`, not cleared when the scope is done).
        self.adapter: t.Any = None
        _every_scope.add(self)

    def __repr__(self) -> str:
        holders = f"holders={self._holders}"
        state = "done" if self._done else f"closing, {holders}" if self.closed else holders
        return f"<Scope {self.label!r} {state}>"

    @staticmethod
    def all_open() -> list[Scope]:
        """Every scope of this process that has not closed yet (for leak checks)."""
        return [scope for scope in list(_every_scope) if not scope.done]

    @property
    def holders(self) -> int:
        """How many holders keep the scope open (the request counts as one)."""
        return self._holders

    def enter(self) -> Token[Scope | None]:
        """Make this the current scope of the running context."""
        return _SCOPE.set(self)

    @staticmethod
    def exit(token: Token[Scope | None]) -> None:
        """Undo :meth:`enter`."""
        _SCOPE.reset(token)

    def acquire(self) -> bool:
        """Add a holder. Returns ``False`` (and adds none) if already closed."""
        if self._holders <= 0:
            return False
        self._holders += 1
        return True

    def acquire_for_handoff(self) -> bool:
        """:meth:`acquire` for a child about to start. (What an adapter does
        at a request's first hand-off is its registered opener's work, done
        before: :func:`scope_for_handoff`; nothing is stored on the scope
        to call back up a layer.)"""
        if self._holders <= 0:
            return False
        self._holders += 1
        return True

    def release(self) -> None:
        """Remove a holder; the last one out closes the scope."""
        holders = self._holders - 1
        if holders < 0:
            raise RuntimeError(f"{self!r} released more often than acquired")
        self._holders = holders
        if holders == 0:
            self._close()

    def finish(self) -> None:
        """The request itself is done: release its hold, once."""
        if self.owner_done_at is not None:
            return
        self.owner_done_at = time.monotonic()
        # Steps that run now, inside the request's own call, raise what
        # they raise (after every step ran), as the framework's own
        # teardown would; steps run later by a child's end are logged.
        self._raising = True
        try:
            self.release()
        finally:
            self._raising = False

    @property
    def idle(self) -> bool:
        """True if only the request itself holds the scope, it has not
        finished, and no close callback (step) waits: what would be
        deferred may as well run now."""
        return self._holders == 1 and not self._callbacks and self.owner_done_at is None

    @property
    def done(self) -> bool:
        """True once the scope closed and its close callbacks have run."""
        return self._done

    @property
    def owner_done(self) -> bool:
        """True once :meth:`finish` was called."""
        return self.owner_done_at is not None

    def on_close(self, callback: t.Callable[..., t.Any], *args: t.Any) -> None:
        """Run ``callback(*args)`` when the scope closes, in registration order.

        If the scope already closed and ran its callbacks, it runs now.
        """
        if self._done:
            self._run_one(callback, args)
        else:
            self._callbacks.append((callback, args))

    def hold_parent(self, parent: Scope) -> bool:
        """Hold ``parent`` until this scope has closed and run its callbacks."""
        if not parent.acquire():
            return False
        self.parent = parent
        parent.nested = [ref for ref in parent.nested if ref() is not None]
        parent.nested.append(weakref.ref(self))
        return True

    def defer(self, callback: t.Callable[..., t.Any], *args: t.Any) -> None:
        """Run ``callback(*args)`` as a step of the scope's end.

        For teardown steps: they run in the request's own Context (see
        :mod:`geventctx.isolation`), with this scope current, after every
        holder left — or right now, in the running Context and raising what
        they raise, if the scope is already done.
        """
        if self._done:
            callback(*args)
        else:
            self._callbacks.append((callback, args))

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the scope closed and its callbacks ran; ``False`` on timeout."""
        if self._done:
            return True
        if self._closed_event is None:
            self._closed_event = Event()
        return bool(self._closed_event.wait(timeout))

    def _close(self) -> None:
        # The last holder left: run the steps, in the request's Context.
        self.closed = True
        if self._running:
            return  # the step runner holds no more: its loop goes on
        if not self._callbacks:
            self._finish_steps()  # no step to run: no Context to enter
            return
        if isinstance(getcurrent(), Hub):
            # The last holder left from a link callback in the hub, where
            # callbacks must not block: run them in a greenlet of their own
            # (it enters the request's Context).
            # (A raw greenlet, in an empty Context of its own: no links, no
            # spawning stack, one callback; P4.)
            gevent.spawn_raw(self.home.call, self._run_callbacks)
        else:
            self.home.call(self._run_callbacks)

    def _run_callbacks(self) -> None:
        # The rule for steps: each runs once, holding the scope, with the
        # scope current — so a hand-off a step makes holds the scope too, and
        # the next step waits for it (the last release resumes the loop).
        # Every step runs even if an earlier one raised anything (a
        # BaseException such as gevent.Timeout included); the first such
        # exception is raised again once the steps ran — and, for steps run
        # inside the request's own finish(), the first Exception too.
        if self._running or self._done:
            return
        callbacks = self._callbacks
        interrupted: BaseException | None = None
        raising = self._raising
        self._running = True
        try:
            while callbacks:
                callback, args = callbacks.pop(0)
                self._holders += 1
                token = _SCOPE.set(self)
                try:
                    if raising:
                        callback(*args)
                    else:
                        self._run_one(callback, args)
                except BaseException as exc:
                    interrupted = interrupted or exc
                finally:
                    _SCOPE.reset(token)
                    self._holders -= 1
                if self._holders > 0:
                    return  # a hand-off of that step: the rest waits for it
            self._finish_steps()
        finally:
            self._running = False
            if interrupted is not None:
                raise interrupted

    def _finish_steps(self) -> None:
        self._done = True
        # What adapters kept for the request (its contexts, its response)
        # goes now: nothing of the request outlives it in a reference cycle.
        self.extras.clear()
        if self._closed_event is not None:
            self._closed_event.set()
        parent, self.parent = self.parent, None
        if parent is not None:
            parent.release()

    def _run_one(self, callback: t.Callable[..., t.Any], args: tuple[t.Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("close callback %r of %r failed", callback, self)


_every_scope = weakref.WeakSet()
