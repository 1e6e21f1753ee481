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

The rule: a child's error is logged in the child's context (a greenlet's in
the greenlet as it ends, a ThreadPool task's in a copy of the task's), so a
log handler, filter or error reporter sees the request's state there.

.. versionadded:: 0.1

.. versionchanged:: 0.2
    A ThreadPool task's error is logged in the task's context (it was
    logged in the hub's, where no request is).
"""

from __future__ import annotations

import logging
import typing as t
from contextvars import copy_context

from gevent import get_hub
from greenlet import greenlet

from . import registry
from ._site import format_site, site_of
from .scope import _SCOPE

log = logging.getLogger("geventctx")

_MARK = "_geventctx_error_hook"

#: Set this key in a scope's ``extras`` to leave its children's errors to
#: gevent: the hook is per hub, the choice is per app (or per scope).
OPT_OUT = "errorlog.off"

#: Attribute marking an exception instance that was logged already.
_LOGGED = "_geventctx_logged"


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
            entry = registry.entry_of(child)
            if (
                entry is not None
                and entry[2] is not None
                and not entry[2].extras.get(OPT_OUT)
            ):
                if getattr(value, _LOGGED, False):
                    # The error of a child this one waited on, re-raised
                    # (Pool.map's helper): already logged, with the same site.
                    return
                try:
                    setattr(value, _LOGGED, True)
                except Exception:  # an exception type without attributes
                    pass
                function = getattr(entry[3], "__qualname__", None) or repr(entry[3])
                log.error(
                    "child %s of request %s (spawned at %s) failed",
                    function,
                    entry[2].label,
                    format_site(entry[4]),
                    exc_info=(type_, value, tb),
                )
                return
            if entry is None and _log_inheriting(context, type_, value, tb):
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
    if scope is None or scope.extras.get(OPT_OUT) or getattr(value, _LOGGED, False):
        return False
    try:
        setattr(value, _LOGGED, True)  # a joiner re-raising it: logged already
    except Exception:  # an exception type without attributes
        pass
    function = getattr(child, "_run", None)
    log.error(
        "greenlet %s of request %s (spawned at %s, inherited the request's context) failed",
        getattr(function, "__qualname__", None) or repr(function),
        scope.label,
        format_site(site_of(getattr(child, "spawning_stack", None))),
        exc_info=(type_, value, tb),
    )
    return True


#: Attribute of a ThreadPool task's exception held back for its hand-off.
_DEFERRED = "_geventctx_task_error"


def report_task(entry: t.Any, error: BaseException) -> None:
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
    scope = entry[2]
    if scope is not None and not scope.extras.get(OPT_OUT):
        try:
            setattr(error, _LOGGED, True)  # a helper re-raising it: logged already
        except Exception:
            pass
        function = getattr(entry[3], "__qualname__", None) or repr(entry[3])
        # Logged in (a copy of) the task's context, as a greenlet child's
        # error is logged in the child: a handler sees the request's state.
        task_context = entry[6] if len(entry) > 6 else copy_context()
        task_context.copy().run(
            log.error,
            "child %s of request %s (spawned at %s) failed",
            function,
            scope.label,
            format_site(entry[4]),
            exc_info=(type_, error, tb),
        )
        return
    original(context, type_, error, tb)
