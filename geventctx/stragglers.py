"""Notice children that outlive their request by too long.

A child still holding its request scope ``timeout`` seconds after the
response is a *straggler*: it keeps the request's teardown (and everything
the teardown would release) waiting. The watcher logs each straggler with
its function and spawn site, once, and then applies the policy: ``"wait"``
keeps waiting (the default: killing user work is not ours to decide), or
``"kill"`` kills the stragglers so that teardown can run.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import time
import typing as t
import weakref

from gevent import get_hub

from . import registry
from .scope import Scope

log = logging.getLogger("geventctx")

POLICIES = ("wait", "kill")

#: Children already logged as stragglers: when two adapters watch the same
#: request (a Flask app inside the WSGI middleware), each child is logged
#: once as waited for; a watcher that kills it still says so.
_logged: weakref.WeakSet[object] = weakref.WeakSet()


def _children(scope: Scope) -> list[t.Any]:
    """The running hand-offs that hold ``scope``, directly or through a
    nested scope (the children of a Flask request inside the middleware's):
    each scope's own index, O(its children), never the process's registry."""
    children = list(scope.children.values())
    for ref in list(scope.nested):
        inner = ref()
        if inner is not None and not inner.done:
            children.extend(_children(inner))
    return children


def outliving_response(scope: Scope, timeout: float | None, policy: str) -> None:
    """The request itself has ended (and released its hold); watch the
    children that outlive it, if any still hold the scope.

    Adapters call this right after the request's ``finish()``. It never blocks: the body
    children may still read is captured later, after the response was
    written (:func:`geventctx.body.end_of_response`).
    """
    if not scope.done:
        watch(scope, timeout, policy)


def watch(scope: Scope, timeout: float | None, policy: str = "wait") -> None:
    """Check ``scope`` for stragglers ``timeout`` seconds from now, and again
    every ``timeout`` seconds until it is done: children started later (a
    grandchild, a child spawned by a straggler being killed) are stragglers
    too. Each check costs O(the scope's children) in the hub."""
    if not timeout or timeout <= 0 or scope.done:
        return
    loop = get_hub().loop
    timer = loop.timer(timeout, timeout)
    mine: weakref.WeakSet[object] | None = None  # children this watcher handled (made when needed)

    def check() -> None:
        nonlocal mine
        if scope.done:
            timer.close()
            return
        if mine is None:
            mine = weakref.WeakSet()
        done_at = scope.owner_done_at
        since = time.monotonic() - done_at if done_at is not None else timeout
        doomed = []
        for child in _children(scope):
            # A ThreadPool task (its AsyncResult) cannot be killed.
            kill = getattr(child, "kill", None) if policy == "kill" else None
            if child in mine:
                if kill is not None and not child.dead:
                    doomed.append(kill)  # still there: kill again, quietly
                continue
            mine.add(child)
            if kill is not None:
                doomed.append(kill)
            elif child in _logged:
                continue  # another adapter's watcher logged it already
            _logged.add(child)
            record = registry.record_of(child)
            if record is None:
                continue  # it ended meanwhile
            log.warning(
                "straggler: child %s of request %s (spawned at %s) still runs %.1fs after the response%s",
                getattr(record.function, "__qualname__", None) or repr(record.function),
                scope.label,
                record.spawn_site,
                since,
                "; killing it" if kill is not None else "; teardown keeps waiting",
            )
        for kill in doomed:
            kill(block=False)

    timer.start(check)
    scope.on_close(timer.close)
