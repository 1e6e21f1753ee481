"""Per-child state: what a hand-off forks instead of sharing.

A child gets a snapshot of its spawner's context: its own writes to context
variables stay its own. But a variable whose value is a shared mutable object
(Sentry keeps its scopes so) is the *same object* in the child: a change the
child makes to it reaches the parent and every sibling. A *fork* fixes that
for one such variable by setting it to a copy.

The rule: every fork registered with :func:`register` runs in each child's
snapshot (the copied Context), in the spawner, just before the child starts
— for every hand-off kind (``spawn``, the pools, the executor, the thread
pool) and for plain greenlets under :func:`geventctx.patch`. With no fork
registered a hand-off pays one test of an empty list. A fork that raises is
logged and the child starts anyway (sharing what that fork would have
forked).

.. code-block:: python

    from geventctx import forks

    @forks.register
    def fork_baggage():
        baggage.set(dict(baggage.get()))   # the child changes its own copy

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
from contextvars import Context, copy_context

__all__ = ["register", "unregister", "registered", "snapshot"]

log = logging.getLogger("geventctx")

Fork = t.Callable[[], None]

#: The registered forks, in registration order (read on every hand-off).
_forks: list[Fork] = []


def register(fork: Fork) -> Fork:
    """Run ``fork()`` in every child's snapshot before the child starts;
    returns ``fork`` (usable as a decorator). Registering twice is once."""
    if fork not in _forks:
        _forks.append(fork)
    return fork


def unregister(fork: Fork) -> None:
    """Stop running ``fork`` for new children (nothing if it was not registered)."""
    if fork in _forks:
        _forks.remove(fork)


def registered() -> list[Fork]:
    """The registered forks, in the order they run."""
    return list(_forks)


def run_forks() -> None:
    """Run every fork in the current Context (a child's snapshot)."""
    for fork in list(_forks):
        try:
            fork()
        except Exception:
            log.exception("the hand-off fork %r failed; the child shares what it would fork", fork)


def snapshot() -> Context:
    """A child's Context: a copy of the current one, with every fork run in it."""
    context = copy_context()
    if _forks:
        context.run(run_forks)
    return context
