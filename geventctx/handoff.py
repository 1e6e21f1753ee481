"""The hand-off: start a greenlet in a snapshot of its spawner's context.

gevent greenlets start with an empty :mod:`contextvars` context. A hand-off
takes :func:`contextvars.copy_context` (O(1)) in the spawner when the child
is started and sets it as the child's ``gr_context`` before it first runs, so
the child sees every context variable of its spawner as of that moment and
nothing it sets reaches anyone else. No wrapper function, no extra frame, no
Flask context pushed or popped in the child — but one: a child whose
snapshot a fork gave an end (the Flask adapter's: the child's own app
context, to tear down) runs its function inside :class:`Ending`, which runs
the ends in the child when the function returned or raised, before gevent
reports the result (:mod:`geventctx.forks` states the rule).

Inside a request scope the child also *holds* the scope until it ends, so the
request's teardown waits for it; and it is listed in :mod:`geventctx.registry`
while it runs.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import time
import typing as t
import warnings
import weakref
from contextvars import Context, copy_context
from functools import partial

import gevent
from greenlet import GreenletExit, getcurrent, greenlet

from . import _threads, errorlog, registry
from ._misuse import check_unmanaged
from ._site import Site, format_site, site_of
from ._steps import run_every
from .errors import LateEffectWarning
from .forks import End, Ends, _forks
from .forks import handoff_context as _handoff_context
from .forks import run_forks as _run_forks
from .request_end import _shielded, child_ended
from .scope import _PENDING, _SCOPE, Scope, scope_for_handoff

__all__ = ["Greenlet", "spawn", "spawn_later", "attach"]

_getframe = sys._getframe
_base_start = gevent.Greenlet.start
_base_run = gevent.Greenlet.run
_base_start_later = gevent.Greenlet.start_later
_record = registry.record
_live = registry._live
_pop = _live.pop
_unscoped = registry._unscoped
_record_of = registry.record_of
_LAZY_SITE = registry.LAZY_SITE
_ref = weakref.ref
_monotonic = time.monotonic
_get_ident = _threads.get_ident


def _late(scope: Scope, site: Site | None) -> None:
    warnings.warn_explicit(
        f"{scope.label or 'the request'} has already ended; the child "
        f"started at {format_site(site)} sees its context but does not "
        "delay its teardown",
        LateEffectWarning,
        site[0] if site else "<unknown>",
        site[1] if site else 0,
    )


def helper_site() -> Site | None:
    """The spawn site of the running greenlet, if it is a hand-off.

    For spawns made by a helper greenlet (``Pool.map``, ``imap``) whose
    stack holds no user code: its workers report the helper's site, which
    is the user's call that started the map.
    """
    helper = _record_of(getcurrent())
    return helper.site if helper is not None else None


def caller_site(frame: t.Any) -> Site | None:
    """The user's site at or above ``frame``, else the running helper's."""
    site = site_of(frame)
    return site if site is not None else helper_site()


def pin_current_scope(site: Site | None) -> Scope | None:
    """Acquire the current request scope for a hand-off about to start.

    Returns the scope (now held), or ``None`` outside a request, or if the
    request already ended (after a :class:`LateEffectWarning`), or in
    another thread than the request's: a scope changes only on its own hub.
    There (a hand-off inside a ThreadPool task that is not handed over to
    the request's hub: ``spawn_later``, a greenlet started by hand, a map
    helper) the child runs in the thread's own hub, which runs only while
    the task waits on it: the task's own hold covers it, and a child the
    task leaves behind is reported and cancelled when the task returns.
    """
    scope = _SCOPE.get()
    if scope is None and _PENDING.get() is not None:
        scope = scope_for_handoff()  # the request's first hand-off makes its scope
    if scope is None:
        check_unmanaged(site)
    elif scope.thread != _get_ident():
        return None
    elif not scope.acquire_for_handoff():
        _late(scope, site)
        return None
    return scope


def take(site: Site | None) -> tuple[Scope | None, Context, End | None]:
    """The hand-off itself, in the spawner, for a child about to start: the
    request's scope pinned for it (:func:`pin_current_scope`), then its
    Context with every fork run in it, and the ends the forks gave it.

    Every kind of hand-off takes its child's part here — :func:`attach`
    (``spawn_later``, ``Greenlet.start``, the pools, TaskGroup), the
    ThreadPool, the Executor (at ``submit``) — and registers the child with
    :func:`bind` (the ThreadPool: its own record). :func:`spawn` does the
    same inlined (P1: a call less per spawn); ``patch()`` takes the Context
    and ends only (a patched greenlet holds no request).
    """
    scope = pin_current_scope(site)  # first: the request's first hand-off makes its scope
    context, ends = _handoff_context()
    return scope, context, ends


def attach(child: gevent.Greenlet, site: Site | None, function: t.Any = None) -> None:
    """Hand the running context to the unstarted gevent greenlet ``child``.

    Sets its ``gr_context`` to a snapshot of the current context, records it
    in the registry and makes it hold the current request scope (if any)
    until it ends. Call it in the spawner, just before starting ``child``.
    """
    if site is None:
        site = helper_site()
    scope, context, ends = take(site)
    bind(child, context, scope, site, function, ends)


def bind(
    child: t.Any, context: Context, scope: Scope | None, site: Site | None, function: t.Any = None,
    ends: End | None = None,
) -> None:
    """Register ``child`` as a hand-off running in ``context``.

    For work whose context and scope hold were taken earlier (an executor
    task taken at ``submit``): ``scope`` must already be acquired for the
    child; the hold is released when the child ends. ``child`` is a gevent
    greenlet (its ``gr_context`` is set) or any object with ``rawlink``
    (a thread task's ``AsyncResult``). ``ends`` (what the forks returned
    for ``context``) run at the end of a gevent greenlet ``child``'s run.
    """
    if isinstance(child, greenlet):
        child.gr_context = context
        ending = None
        if ends is not None:
            ending = child._run = Ending(child._run, ends, context, site)
            if not isinstance(child, Greenlet):
                child.rawlink(ending.never_ran)
        if isinstance(child, Greenlet):
            child._geventctx_ending = ending  # _finished looks (a set slot: no getattr default)
        if scope is None:
            _note_thread_child(child)
    if isinstance(child, Greenlet):
        # Its record in its own slots (see registry).
        child._geventctx_scope = scope
        child._geventctx_function = function
        child._geventctx_site = site
        child._geventctx_started = _monotonic()
        if scope is None:
            _unscoped[id(child)] = _ref(child)
    else:
        _live[id(child)] = _record(child, getcurrent(), scope, function, site)
    if scope is not None:
        scope.children[id(child)] = child
    child.rawlink(_finished)


def _finished(child: gevent.Greenlet) -> None:
    # Runs once per child, from the hub, however the child ended (returned,
    # raised, was killed, or was killed before it ever ran).
    if getattr(child, "_geventctx_started", None) is not None:
        # A geventctx greenlet: its record is its slots.
        child._geventctx_started = None
        scope = child._geventctx_scope
        ending = child._geventctx_ending
        if ending is not None:
            child._geventctx_ending = None
        if scope is None:
            _unscoped.pop(id(child), None)
            if ending is not None and ending.ends is not None:
                ending.never_ran(child)
        else:
            scope.children.pop(id(child), None)
            # One that never ran holds the request until its ends ran.
            if ending is None or ending.ends is None or not ending.never_ran(child, scope.release):
                scope.release()
        return
    record = _pop(id(child), None)
    if record is not None:
        if not isinstance(child, greenlet):
            # A ThreadPool task (its AsyncResult): its error, held back by
            # the error log, is reported here, where the task is known.
            error = child.exception
            if error is not None:
                errorlog.report_task(record, error)
        scope = record.scope
        if scope is not None:
            scope.children.pop(id(child), None)
            scope.release()


class Ending:
    """A child's function with the ends of its hand-off (:mod:`geventctx.forks`).

    The rule: the ends run once, in the child, right after the function
    returned or raised (a kill included) and before gevent reports its
    result, so whoever joins the child finds them done; with what it raised
    (``None`` if it returned). An end that raises ``Exception`` is logged
    with the child's spawn site and leaves the result alone; a
    ``BaseException`` (a kill meanwhile) lets the other ends run, then is
    raised. A child that never ran has its ends run by :meth:`never_ran`
    (gevent frees ``_run`` of a greenlet killed before it started: the
    Ending is kept in the greenlet's record, or linked to a plain one).

    .. versionadded:: 0.2
    """

    __slots__ = ("function", "ends", "context", "site")

    def __init__(self, function: t.Callable[..., t.Any], ends: End, context: Context, site: t.Any) -> None:
        self.function = function
        self.ends: End | None = ends
        self.context = context
        self.site = site

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        ends, self.ends = self.ends, None
        try:
            result = self.function(*args, **kwargs)
        except BaseException as error:
            if ends is not None:
                run_ends(ends, error, self.site)
            raise
        if ends is not None:
            run_ends(ends, None, self.site)
        return result

    def never_ran(self, child: t.Any, then: t.Callable[[], t.Any] | None = None) -> bool:
        """``child`` is dead: if its ends never ran (it was killed before it
        started), run them in a greenlet of their own, in its Context, with
        its exception, then ``then()``. True if it did (``then`` comes later)."""
        ends, self.ends = self.ends, None
        if ends is None:
            return False
        end_elsewhere(ends, _kill_of(child), self.context, self.site, then)
        return True

    def end_now(self, child: t.Any) -> None:
        """Like :meth:`never_ran`, here and now: for a child stranded in a
        hub that will not run again."""
        ends, self.ends = self.ends, None
        if ends is not None:
            self.context.run(run_ends, ends, _kill_of(child), self.site)

    def __getattr__(self, name: str) -> t.Any:
        # gevent's repr and others read the function's __name__, __self__.
        return getattr(self.function, name)


def _release_at_end(child: Greenlet, scope: Scope) -> None:
    """The rule for a child's hold: a geventctx greenlet that ran gives its
    hold on its request back at its own end, in its greenlet, once its
    function (and its ends) returned or raised and gevent recorded its
    result (:meth:`Greenlet.run`: joiners and links are due, ``ready()`` is
    true) — :func:`geventctx.request_end.child_ended`, where the last holder
    runs the request's end. One that never ran is released by its link
    (:func:`_finished`), and so is a greenlet of another class handed off
    (a pool's ``greenlet_class``, a raw greenlet)."""
    child._geventctx_started = child._geventctx_ending = None
    child.unlink(_finished)
    scope.children.pop(id(child), None)
    if scope._holders > 1:
        scope.release()  # child_ended()'s common case, inlined (P1)
    else:
        child_ended(child, scope)


def _is_kill(args: tuple[t.Any, ...]) -> bool:
    # What greenlet.throw(*args) raises is a GreenletExit (its default).
    if not args:
        return True
    exc = args[0]
    return isinstance(exc, GreenletExit) or (isinstance(exc, type) and issubclass(exc, GreenletExit))


def _kill_of(child: t.Any) -> BaseException | None:
    # What killed a greenlet before it started: gevent keeps a GreenletExit
    # as its value (a "successful" end), any other exception as its error.
    error = child.exception
    if error is None and isinstance(child.value, BaseException):
        error = child.value
    return t.cast("BaseException | None", error)


def run_ends(ends: End, error: BaseException | None, site: t.Any) -> None:
    """Run each end (one, or an :class:`~geventctx.forks.Ends`) once with
    ``error``; then raise the first BaseException one raised (an
    ``Exception`` is logged with the spawn site ``site``,
    :data:`registry.LAZY_SITE` for the running greenlet's own)."""
    several: t.Any = ends

    def logged(_exc: BaseException) -> None:
        nonlocal site
        if site is _LAZY_SITE:
            site = registry.site_of_child(getcurrent())
        scope = _SCOPE.get()
        errorlog.log.exception(
            "the end of the hand-off started at %s%s failed; the child's result stands",
            format_site(site),
            f" in {scope.label}" if scope is not None and scope.label else "",
        )

    if type(several) is not Ends:
        # One end (the common case, P1): no list, no closure per end.
        try:
            ends(error)
        except Exception as exc:
            logged(exc)
        return
    run_every([partial(end, error) for end in several], logged)


def end_now_if_never_ran(child: t.Any) -> None:
    """Run the ends of the geventctx greenlet ``child``, which never ran,
    here and now in its Context (see :meth:`Ending.end_now`)."""
    ending = getattr(child, "_geventctx_ending", None)
    if ending is not None:
        ending.end_now(child)


def end_elsewhere(
    ends: End, error: BaseException | None, context: Context, site: t.Any,
    then: t.Callable[[], t.Any] | None = None,
) -> None:
    """Run ``ends`` of a hand-off that never ran in a greenlet of their own,
    in its Context ``context``, then ``then()`` (never in the hub, nor in
    the greenlet that killed or cancelled it)."""

    def run() -> None:
        try:
            run_ends(ends, error, site)
        finally:
            if then is not None:
                then()

    ender = gevent.Greenlet(run)
    ender.gr_context = context
    _base_start(ender)


class Greenlet(gevent.Greenlet):
    """A :class:`gevent.Greenlet` that runs in its spawner's context.

    The snapshot is taken when the greenlet is started (``start``,
    ``start_later``, or through :meth:`spawn`), in the greenlet that starts it.
    Everything else is :class:`gevent.Greenlet`: ``get()``, ``join()``,
    ``kill()``, links, ``exception``.

    .. versionadded:: 0.1
    """

    # The hand-off's record (registry.HandOff's fields): scope, function, spawn
    # site (or registry.LAZY_SITE: read from gevent's spawning_stack when
    # asked) and start time, None once it ended.
    # Set (to a time, or None once ended) exactly when it was handed off.
    __slots__ = (
        "_geventctx_scope", "_geventctx_function", "_geventctx_site", "_geventctx_started", "_geventctx_ending",
    )

    def run(self) -> None:
        # gevent's own run records the result; then the hold goes back.
        try:
            _base_run(self)
        finally:
            # A running hand-off that holds a request (outside one, or not
            # handed off: its link, _finished, does the rest).
            if getattr(self, "_geventctx_started", None) is not None and self._geventctx_scope is not None:
                _release_at_end(self, self._geventctx_scope)

    def throw(self, *args: t.Any) -> t.Any:
        # gevent's kill() and killall() come here: a kill (GreenletExit,
        # their default) is held back while this child runs its request's
        # end (geventctx.request_end.child_ended). Anything else — a
        # gevent.Timeout a step set for itself — is the step's own.
        if _shielded and self in _shielded and _is_kill(args):
            _shielded[self].append(args)
            return None
        return greenlet.throw(self, *args)

    def _attach_once(self) -> None:
        if not hasattr(self, "_geventctx_started"):
            attach(self, site_of(_getframe(2)), getattr(self, "_run", None))

    def start(self) -> None:
        self._attach_once()
        _base_start(self)

    def start_later(self, seconds: float) -> None:
        self._attach_once()
        _base_start_later(self, seconds)

    def __repr__(self) -> str:
        # Shown by gevent's run-info output (gevent.util.print_run_info) for
        # every greenlet: which request a hand-off belongs to, and its site.
        base: str = gevent.Greenlet.__repr__(self)
        record = _record_of(self)
        if record is None:
            return base
        scope = record.scope
        request = scope.label if scope is not None else "no request"
        return f"{base[:-1]} [geventctx: {request}, spawned at {format_site(record.site)}]>"


class _Spawned(Greenlet):
    # What spawn() returns (made and handed off by spawn() itself).
    __slots__ = ()


class _HandedOver:
    """Mixed into a child handed over from another thread (its class is
    swapped once made): that thread may ``join``/``get`` it, waiting on a
    native lock the child's end releases."""

    _geventctx_handed: tuple[t.Any, int]

    def join(self, timeout: float | None = None) -> None:
        lock, hub_thread = self._geventctx_handed
        if hub_thread != _get_ident():
            _wait_native(lock, timeout)
            return
        super().join(timeout)  # type: ignore[misc]

    def get(self, block: bool = True, timeout: float | None = None) -> t.Any:
        lock, hub_thread = self._geventctx_handed
        if hub_thread != _get_ident():
            if not _wait_native(lock, timeout if block else 0):
                raise gevent.Timeout(timeout)
            if self.successful():  # type: ignore[attr-defined]
                return self.value  # type: ignore[attr-defined]
            raise self.exception  # type: ignore[attr-defined]
        return super().get(block, timeout)  # type: ignore[misc]


_handed_classes: dict[type, type] = {}


def hand_over_class(child: t.Any) -> None:
    """Make ``child`` (just made on the request's hub for another thread)
    joinable from that thread."""
    cls = type(child)
    handed = _handed_classes.get(cls)
    if handed is None:
        handed = _handed_classes[cls] = type(f"HandedOver{cls.__name__}", (_HandedOver, cls), {})
    done = _threads.allocate_lock()
    done.acquire()
    child.__class__ = handed
    child._geventctx_handed = (done, _get_ident())
    child.rawlink(lambda _child: done.release())


def _wait_native(lock: t.Any, timeout: float | None) -> bool:
    acquired = bool(lock.acquire(True, -1 if timeout is None else max(timeout, 0)))
    if acquired:
        lock.release()  # for every other waiter
    return acquired


def spawn(function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> Greenlet:
    """Like :func:`gevent.spawn`, but the child runs in this greenlet's context.

    The child sees every context variable (Flask's request, ``g``, session,
    app, your own) as of this call; its own writes stay its own. Inside a
    request scope, the request's teardown waits until the child ends.

    .. versionadded:: 0.1
    """
    # take() and bind(), inlined: this is the hot path of the P1 budget.
    # The site is read lazily from the stack gevent records for every
    # greenlet (spawning_stack), when a log or the registry asks for it.
    current = _SCOPE.get()
    if current is None and _PENDING.get() is not None:
        current = scope_for_handoff()  # the request's first hand-off makes its scope
    if current is not None and current.thread != _get_ident():
        # In another thread (a ThreadPool task): made on the request's hub.
        return _threads.on_owner_hub(current.hub, _spawn_at, caller_site(_getframe(1)), function, args, kwargs)
    child = _Spawned(function, *args, **kwargs)
    child._geventctx_site = _LAZY_SITE if child.spawning_stack is not None else caller_site(_getframe(1))
    # pin_current_scope(), inlined (the scope and its thread are known).
    if current is None:
        check_unmanaged(None, child)
        scope = None
        _note_thread_child(child)
        _unscoped[id(child)] = _ref(child)
    elif current.acquire_for_handoff():
        scope = current
        current.children[id(child)] = child
    else:
        _late(current, registry.site_of_child(child))
        scope = None
        _unscoped[id(child)] = _ref(child)
    # forks.handoff_context(), inlined (P1: a call less per spawn).
    context = copy_context()
    ending = None
    if _forks:
        ends = context.run(_run_forks)
        if ends is not None:
            ending = child._run = Ending(function, ends, context, child._geventctx_site)
    child._geventctx_ending = ending  # always set: _finished reads the slot without a default
    child.gr_context = context
    child._geventctx_scope = scope
    child._geventctx_function = function
    child._geventctx_started = _monotonic()
    child.rawlink(_finished)
    _base_start(child)
    return child


def _note_thread_child(child: gevent.Greenlet) -> None:
    # Outside a request, in a geventctx ThreadPool task: the worker checks
    # at the task's end that the child could run (its hub runs only while
    # the task waits on it).
    orphans = getattr(getcurrent(), "geventctx_children", None)
    if orphans is not None:
        orphans.append(child)


def _spawn_at(site: Site | None, function: t.Callable[..., t.Any], args: t.Any, kwargs: t.Any) -> Greenlet:
    # spawn(), on the request's hub, for a thread that handed it over: that
    # thread may wait for the child natively (join, get).
    child = _Spawned(function, *args, **kwargs)
    hand_over_class(child)
    attach(child, site, function)
    _base_start(child)
    return child


def spawn_later(
    seconds: float, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any
) -> Greenlet:
    """Like :func:`gevent.spawn_later`, with the context of this call.

    The snapshot is taken now, not when the child starts running; inside a
    request scope the request's teardown waits for the delayed child too.

    .. versionadded:: 0.1
    """
    child = _Spawned(function, *args, **kwargs)
    attach(child, site_of(_getframe(1)), function)
    _base_start_later(child, seconds)
    return child
