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

from gevent import get_hub

from . import registry
from .scope import Scope

log = logging.getLogger("geventctx")

POLICIES = ("wait", "kill")


def watch(scope: Scope, timeout: float | None, policy: str = "wait") -> None:
    """Check ``scope`` for stragglers ``timeout`` seconds from now."""
    if not timeout or timeout <= 0 or scope.closed:
        return
    timer = get_hub().loop.timer(timeout)

    def check() -> None:
        timer.close()
        if scope.closed:
            return
        records = registry.for_scope(scope)
        done_at = scope.owner_done_at
        since = time.monotonic() - done_at if done_at is not None else timeout
        for record in records:
            log.warning(
                "straggler: child %s of request %s (spawned at %s) still runs %.1fs after the response%s",
                getattr(record.function, "__qualname__", None) or repr(record.function),
                scope.label,
                record.spawn_site,
                since,
                "; killing it" if policy == "kill" else "; teardown keeps waiting",
            )
        if policy == "kill":
            for record in records:
                child = record.greenlet
                if child is not None:
                    child.kill(block=False)

    timer.start(check)
    scope.on_close(timer.close)
