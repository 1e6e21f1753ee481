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

A fork may return an *end*: a callable ``end(error)`` the hand-off runs in
the child itself when the child ends — in its greenlet or thread, after its
function returned or raised and before its result is reported, with what it
raised (``None`` if it returned; the kill's exception if it was killed) —
once; for a child that never ran (killed before it started, an executor
task cancelled while queued), in a greenlet of its own, in the child's
Context, when the hand-off is dropped. A child with no end runs its
function with no wrapper frame; one with ends runs it inside one. An end
that raises is logged with the child's spawn site and does not change the
child's result. (The Flask adapter's fork returns the end that tears down
the child's own app context: DESIGN G3, G4.)

.. code-block:: python

    from geventctx import forks

    @forks.register
    def fork_baggage():
        baggage.set(dict(baggage.get()))   # the child changes its own copy

.. versionchanged:: 0.2
    A fork may return an end, run at the child's end.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
from contextvars import Context, copy_context

__all__ = ["register", "unregister", "registered", "snapshot", "handoff_context", "End", "Ends"]

log = logging.getLogger("geventctx")

#: What a fork may return: run once at the child's end, with what it raised.
End = t.Callable[[BaseException | None], None]
Fork = t.Callable[[], End | None]

#: The registered forks, in registration order (read on every hand-off).
_forks: list[Fork] = []
#: The same, as a tuple made at each change: run_forks iterates it without a copy.
_forks_now: tuple[Fork, ...] = ()


def register(fork: Fork) -> Fork:
    """Run ``fork()`` in every child's snapshot before the child starts;
    returns ``fork`` (usable as a decorator). Registering twice is once."""
    global _forks_now
    if fork not in _forks:
        _forks.append(fork)
        _forks_now = tuple(_forks)
    return fork


def unregister(fork: Fork) -> None:
    """Stop running ``fork`` for new children (nothing if it was not registered)."""
    global _forks_now
    if fork in _forks:
        _forks.remove(fork)
        _forks_now = tuple(_forks)


def registered() -> list[Fork]:
    """The registered forks, in the order they run."""
    return list(_forks)


class Ends(list):  # type: ignore[type-arg]
    """The ends of one hand-off when more than one fork returned one."""


def run_forks() -> End | None:
    """Run every fork in the current Context (a child's snapshot); what to
    run at the child's end: the one end a fork returned, an :class:`Ends`
    of several in registration order, or ``None``. (One end is kept as it
    is: no list per hand-off, P5.)"""
    ends: t.Any = None
    for fork in _forks_now:
        try:
            end = fork()
        except Exception:
            log.exception("the hand-off fork %r failed; the child shares what it would fork", fork)
            continue
        if end is None:
            continue
        if ends is None:
            ends = end
        elif type(ends) is Ends:
            ends.append(end)
        else:
            ends = Ends((ends, end))
    return t.cast("End | None", ends)


def handoff_context() -> tuple[Context, End | None]:
    """A child's Context (a copy of the current one, with every fork run in
    it) and the ends the forks returned (``None``: nothing to run at the end)."""
    context = copy_context()
    if _forks:
        return context, context.run(run_forks)
    return context, None


def snapshot() -> Context:
    """A child's Context: a copy of the current one, with every fork run in
    it, for a hand-off that runs no ends (what they returned is dropped)."""
    return handoff_context()[0]
