"""Log a request child's exception once, with its request and spawn site.

gevent prints every greenlet's uncaught exception to stderr through the
hub's ``handle_error``. For hand-offs that hold a request scope, the hook
installed here logs the error through ``logging.getLogger("geventctx")``
instead, naming the request (method and path) and the user's spawn line —
once, not twice. So does a plain gevent greenlet whose context holds a
request scope (it inherited it through :func:`geventctx.patch`). Other
greenlets, and system errors, go to gevent as before.
The hook uses gevent's documented per-hub ``handle_error`` override.

A ThreadPool task's error reaches the hub as ``(worker, function)``, which
does not tell which task failed (one worker runs task after task, and the
report arrives after the worker moved on): the hook keeps it on the
exception, and the task's hand-off reports it when it ends
(:func:`report_task`), where the task is known.

The rules:

* A child's error is logged in the child's context (a greenlet's in the
  greenlet as it ends, or in a copy of its context when it is reported from
  elsewhere — killed before it ran; a ThreadPool task's in a copy of the
  task's), so a log handler, filter or error reporter sees *its* request.
* An exception object is reported once per request: the first child that
  fails with it is reported, a child or helper that fails with it again —
  ``Pool.map``'s helper re-raising a worker's error, a child re-raising a
  grandchild's through ``get()`` — is not. (Raising an object again
  continues its traceback: a re-raise and a second raise of one shared
  instance cannot be told apart.) The scope keeps what it reported
  (``extras``; nothing is written on the exception), so the same object
  raised in a later request is reported again.

A :class:`~geventctx.TaskGroup` task's error is its group's: the group
raises it, and reports it here (:func:`report_claimed`) only when it cannot.

Reporters (:func:`add_reporter`, e.g. Sentry's integration) are called with
each reported error, right after it is logged, in the same context.

.. versionadded:: 0.1

.. versionchanged:: 0.2
    Logged in the child's context; once per request and exception object
    (was: once per exception object, marked on it, which hid the same
    object raised in later requests); reporters.
"""

from __future__ import annotations

import logging
import typing as t
from contextvars import copy_context

from gevent import get_hub
from greenlet import getcurrent, greenlet

from . import registry
from ._site import format_site, site_of
from .scope import _SCOPE

if t.TYPE_CHECKING:
    from .scope import Scope

log = logging.getLogger("geventctx")

_MARK = "_geventctx_error_hook"

#: Set this key in a scope's ``extras`` to leave its children's errors to
#: gevent: the hook is per hub, the choice is per app (or per scope).
OPT_OUT = "errorlog.off"

#: The ``extras`` key of a scope's reported errors: ``{id(error): error}``
#: (the error is held, so its id is not reused while the request lives).
REPORTED = "errorlog.reported"

Reporter = t.Callable[["Scope", t.Any], None]

#: Called as ``reporter(scope, exc_info)`` for each reported error.
_reporters: list[Reporter] = []


def add_reporter(reporter: Reporter) -> None:
    """Call ``reporter(scope, exc_info)`` for every child error reported from
    now on, in the child's context, after it is logged (adding twice is once)."""
    if reporter not in _reporters:
        _reporters.append(reporter)


def remove_reporter(reporter: Reporter) -> None:
    """Stop calling ``reporter`` (nothing if it was not added)."""
    if reporter in _reporters:
        _reporters.remove(reporter)


def reported(scope: Scope, error: BaseException) -> bool:
    """Whether ``error`` was reported as a child's error of ``scope``."""
    held = scope.extras.get(REPORTED)
    return held is not None and held.get(id(error)) is error


def _report(scope: Scope, context: t.Any, exc_info: t.Any, message: str, *args: t.Any) -> None:
    """Log ``exc_info`` and call the reporters, in ``context`` (``None``: the
    current one is the child's), unless the request reported that exception
    object already."""
    error = exc_info[1]
    if reported(scope, error):
        return
    scope.extras.setdefault(REPORTED, {})[id(error)] = error
    if context is None:
        _emit(scope, exc_info, message, args)
    else:
        context.copy().run(_emit, scope, exc_info, message, args)


def _emit(scope: Scope, exc_info: t.Any, message: str, args: tuple[t.Any, ...]) -> None:
    log.error(message, *args, exc_info=exc_info)
    for reporter in list(_reporters):
        try:
            reporter(scope, exc_info)
        except Exception:
            log.exception("the error reporter %r failed", reporter)


def _context_of(child: t.Any) -> t.Any:
    """``None`` when ``child`` is the running greenlet (its context is the
    current one), else the child's own context if it has one."""
    if child is getcurrent() or not isinstance(child, greenlet):
        return None
    return child.gr_context


def install(hub: t.Any = None) -> None:
    """Install the hook on ``hub`` (default: this thread's), once."""
    hub = hub if hub is not None else get_hub()
    if getattr(hub, _MARK, False):
        return
    original = hub.handle_error

    def handle_error(context: t.Any, type_: t.Any, value: t.Any, tb: t.Any) -> None:
        if context is not None and isinstance(type_, type) and not issubclass(
            type_, hub.SYSTEM_ERROR + hub.NOT_ERROR
        ):
            child = context
            if isinstance(context, tuple) and len(context) == 2 and getattr(context[0], "geventctx_worker", False):
                # A geventctx ThreadPool task: its hand-off reports it.
                try:
                    # A list: two tasks may raise the same exception object.
                    held = getattr(value, _DEFERRED, None)
                    if held is None:
                        held = []
                        setattr(value, _DEFERRED, held)
                    held.append((original, context, type_, tb))
                    return
                except Exception:  # an exception type without attributes
                    pass
            if getattr(child, "_geventctx_claimed", False):
                # A TaskGroup task: its group raises it, or reports it
                # through report_claimed() when it cannot.
                return
            record = registry.record_of(child)
            if record is not None and record.scope is not None and not record.scope.extras.get(OPT_OUT):
                function = getattr(record.function, "__qualname__", None) or repr(record.function)
                _report(
                    record.scope,
                    _context_of(child),
                    (type_, value, tb),
                    "child %s of request %s (spawned at %s) failed",
                    function,
                    record.scope.label,
                    format_site(record.site),
                )
                return
            if record is None and _log_inheriting(context, type_, value, tb):
                return
        original(context, type_, value, tb)

    hub.handle_error = handle_error
    setattr(hub, _MARK, True)


def _log_inheriting(child: t.Any, type_: t.Any, value: t.Any, tb: t.Any) -> bool:
    """A plain gevent greenlet (not a hand-off) whose context holds a request
    scope — it inherited the request's context through :func:`geventctx.patch`,
    or was given it by hand — is logged like a hand-off, once; ``False`` for
    any other greenlet (gevent prints it, as before)."""
    if not isinstance(child, greenlet):
        return False
    context = child.gr_context
    scope = context.get(_SCOPE) if context is not None else None
    if scope is None or scope.extras.get(OPT_OUT):
        return False
    function = getattr(child, "_run", None)
    _report(
        scope,
        _context_of(child),
        (type_, value, tb),
        "greenlet %s of request %s (spawned at %s, inherited the request's context) failed",
        getattr(function, "__qualname__", None) or repr(function),
        scope.label,
        format_site(site_of(getattr(child, "spawning_stack", None))),
    )
    return True


def report_claimed(child: t.Any, error: BaseException) -> None:
    """Report ``error`` of the ended hand-off ``child`` whose owner claimed it
    (a :class:`~geventctx.TaskGroup` task: its group raises it) but cannot
    raise it (the greenlet running the block was killed): as the hook would
    have when the child ended — with its request and spawn site, in its
    context, once — or through gevent's own ``handle_error`` outside a
    request."""
    hub = get_hub()
    if isinstance(error, hub.SYSTEM_ERROR + hub.NOT_ERROR):
        return  # never claimed: gevent had it when the child ended
    exc_info = (type(error), error, error.__traceback__)
    scope = getattr(child, "_geventctx_scope", None)
    if scope is not None and not scope.extras.get(OPT_OUT):
        function = getattr(child, "_geventctx_function", None)
        _report(
            scope,
            _context_of(child),
            exc_info,
            "child %s of request %s (spawned at %s) failed",
            getattr(function, "__qualname__", None) or repr(function),
            scope.label,
            format_site(registry.site_of_child(child)),
        )
        return
    child._geventctx_claimed = False
    hub.handle_error(child, *exc_info)


#: Attribute of a ThreadPool task's exception held back for its hand-off.
_DEFERRED = "_geventctx_task_error"


def report_task(record: registry.HandOff, error: BaseException) -> None:
    """A ThreadPool task ended with ``error``: log it once with its request
    and spawn site, or hand it to gevent's own ``handle_error``."""
    held = getattr(error, _DEFERRED, None)
    if not held:
        return  # not held back: gevent (or the hook) reported it already
    original, context, type_, tb = held.pop(0)  # one report per failed task
    if not held:
        try:
            delattr(error, _DEFERRED)
        except AttributeError:
            pass
    scope = record.scope
    if scope is not None and not scope.extras.get(OPT_OUT):
        function = getattr(record.function, "__qualname__", None) or repr(record.function)
        _report(
            scope,
            record.context if record.context is not None else copy_context(),  # the task's context
            (type_, error, tb),
            "child %s of request %s (spawned at %s) failed",
            function,
            scope.label,
            format_site(record.site),
        )
        return
    original(context, type_, error, tb)
