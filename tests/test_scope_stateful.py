"""The request scope's lifecycle under random orders of events (hypothesis).

A state machine drives one :class:`geventctx.Scope` through random
sequences of: hand-offs from the request (``geventctx.spawn``), hand-offs
from a live child (grandchildren), children that return, raise, are killed
(blocking or not) or are killed before they ever ran (``spawn`` and
``spawn_later``), hand-offs interrupted in the adapter's hook before their
child started, and the request's own end (``scope.finish()``, sometimes
twice). Children are real greenlets blocked on a queue of commands, so
each one ends exactly when a rule says so.

Checked by every close callback, at the moment it runs (no settling): it
runs at most once, never before ``finish()``, never while a child that
pinned the scope is alive or still listed in the registry, and callbacks
run in registration order. Checked after letting the hub run (the
``settle`` rule at random moments, and at the end of every example): the
holders count is exactly "the request, until it finished" plus the live
pinned children; the scope is closed (and its callbacks ran exactly once)
if and only if the request finished and no pinned child is alive.

Without the holders count, the deferred close, or the release on every
ending, one of these fails: teardown too early, twice, or never.
"""

from __future__ import annotations

import typing as t
import warnings

import gevent
import pytest
from gevent.queue import Queue
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

import geventctx
from geventctx import Scope, registry

JOIN_TIMEOUT = 5  # every wait is bounded


class Boom(Exception):
    """What a child raises when told to."""


class _Return(Exception):
    """Tells a child's command loop to return."""


def _return() -> None:
    raise _Return


def _raise() -> None:
    raise Boom("child raised on purpose")


def child_loop(inbox: Queue) -> str:
    """A child that runs the commands (callables) it is sent, until told to end."""
    while True:
        command = inbox.get()
        try:
            command()
        except _Return:
            return "returned"


class Child:
    """The machine's handle on one child greenlet."""

    _numbers = iter(range(1, 1 << 30))

    def __init__(self, greenlet: gevent.Greenlet, inbox: Queue, pinned: bool, origin: str) -> None:
        self.greenlet = greenlet
        self.inbox = inbox
        self.pinned = pinned  # does it hold the scope (spawned while it was open)?
        self.name = f"child{next(self._numbers)}<{origin}{'' if pinned else ', late'}>"

    def __repr__(self) -> str:
        return self.name


class ScopeLifecycle(RuleBasedStateMachine):
    children = Bundle("children")

    def __init__(self) -> None:
        super().__init__()
        self.scope = Scope("GET /machine")
        self.token = self.scope.enter()  # this greenlet plays the request
        self.finished = False  # the model: did the request end?
        self.alive: list[Child] = []  # the model: children not ended yet
        self.calls: list[str] = []  # close callbacks that ran, in order
        self.violations: list[str] = []
        self.scope.on_close(self._close_callback, "first")
        self.scope.on_close(self._close_callback, "second")

    # -- the model -------------------------------------------------------------

    def _pinned_alive(self) -> list[Child]:
        return [c for c in self.alive if c.pinned]

    def _should_be_closed(self) -> bool:
        """Closed iff the request finished and no pinned child is left."""
        return self.finished and not self._pinned_alive()

    def _close_callback(self, which: str) -> None:
        # Runs when the scope closes: check the order of events right now.
        if not self.finished:
            self.violations.append(f"{which} close callback ran before finish()")
        if which in self.calls:
            self.violations.append(f"{which} close callback ran twice")
        if which == "second" and "first" not in self.calls:
            self.violations.append("close callbacks ran out of order")
        holding = [c for c in self.alive if c.pinned and not c.greenlet.ready()]  # the last runs this at its end
        if holding:
            self.violations.append(f"{which} close callback ran while {holding} still ran")
        listed = registry.for_scope(self.scope)
        if listed:
            self.violations.append(f"{which} close callback ran while the registry listed {listed}")
        self.calls.append(which)

    def _spawn(self, origin: str, spawner: Child | None = None) -> Child:
        inbox: Queue = Queue()
        pinned = not self.scope.closed
        holder: list[gevent.Greenlet] = []

        def start() -> None:
            holder.append(geventctx.spawn(child_loop, inbox))

        if spawner is None:
            if pinned:
                start()
            else:
                # A hand-off after the request's teardown started cannot
                # delay it: geventctx says so, and the child does not pin.
                with pytest.warns(geventctx.LateEffectWarning, match="already ended"):
                    start()
        else:
            spawner.inbox.put(start)  # the child itself hands its context on
            deadline = gevent.get_hub().loop.now() + JOIN_TIMEOUT
            while not holder:
                assert gevent.get_hub().loop.now() < deadline, f"{spawner} never spawned"
                gevent.sleep(0.001)
        child = Child(holder[0], inbox, pinned, origin)
        self.alive.append(child)
        return child

    def _ended(self, child: Child) -> None:
        assert child.greenlet.dead, f"{child} should have ended"
        self.alive.remove(child)

    def _settle(self) -> None:
        """Let the hub run link callbacks and close runners, with a bound."""
        deadline = gevent.get_hub().loop.now() + JOIN_TIMEOUT

        def quiet() -> bool:
            if any(registry.record_of(c.greenlet) for c in self.alive if c.greenlet.dead):
                return False  # a dead child's release is still pending
            if self.scope.closed and not self.scope.wait_closed(0):
                return False  # the close callbacks are still running
            return True

        gevent.sleep(0)
        while not quiet():
            assert gevent.get_hub().loop.now() < deadline, "the hub never settled"
            gevent.sleep(0.001)

    # -- rules -------------------------------------------------------------------

    @rule(target=children)
    def spawn_from_request(self) -> Child:
        return self._spawn("request")

    @rule(target=children, parent=children)
    def spawn_from_child(self, parent: Child) -> Child:
        if parent.greenlet.dead:  # killed without blocking, not yet consumed
            return self._spawn("request")
        return self._spawn(f"from {parent.name}")

    @rule(child=consumes(children))
    def child_returns(self, child: Child) -> None:
        if not child.greenlet.dead:
            child.inbox.put(_return)
            child.greenlet.join(JOIN_TIMEOUT)
            assert child.greenlet.successful(), child.greenlet.exception
        self._ended(child)

    @rule(child=consumes(children))
    def child_raises(self, child: Child) -> None:
        if not child.greenlet.dead:
            child.inbox.put(_raise)
            child.greenlet.join(JOIN_TIMEOUT)
            assert isinstance(child.greenlet.exception, Boom)
        self._ended(child)

    @rule(child=consumes(children), block=st.booleans(), from_other=st.booleans())
    def kill_child(self, child: Child, block: bool, from_other: bool) -> None:
        if from_other:
            # Killed by some other greenlet (a watchdog), not by the request.
            gevent.spawn(child.greenlet.kill).join(JOIN_TIMEOUT)
        else:
            child.greenlet.kill(block=block, timeout=JOIN_TIMEOUT)
        if not block and not from_other:
            gevent.sleep(0)  # the kill is delivered by the hub
            child.greenlet.join(JOIN_TIMEOUT)
        self._ended(child)

    @rule(later=st.booleans())
    def kill_before_start(self, later: bool) -> None:
        pinned = not self.scope.closed
        ran: list[bool] = []
        with warnings.catch_warnings():
            if not pinned:
                warnings.simplefilter("ignore", geventctx.LateEffectWarning)
            if later:
                child = geventctx.spawn_later(30, ran.append, True)
            else:
                child = geventctx.spawn(ran.append, True)
        if pinned:
            assert self.scope.holders >= 1
        child.kill()  # before it ever ran
        assert child.dead and not ran

    @rule(twice=st.booleans())
    def request_ends(self, twice: bool) -> None:
        self.finished = True  # set first: finish() may run the callbacks at once
        self.scope.finish()
        if twice:
            self.scope.finish()  # idempotent

    @rule()
    def settle(self) -> None:
        self._settle()
        self._check_settled()

    # -- checks ------------------------------------------------------------------

    def _check_settled(self) -> None:
        expected_holders = (0 if self.finished else 1) + len(self._pinned_alive())
        if self._should_be_closed():
            assert self.scope.closed and self.scope.wait_closed(0)
            assert self.calls == ["first", "second"], self.calls
            assert self.scope.holders == 0
        else:
            assert not self.scope.closed and self.calls == []
            assert self.scope.holders == expected_holders, (self.scope.holders, expected_holders, self.alive)

    @invariant()
    def close_callbacks_never_misbehave(self) -> None:
        # Holds at every step, whatever the hub still has pending.
        assert self.violations == []
        assert self.calls in ([], ["first"], ["first", "second"])
        # The holders are the request (until it finished) and one per child
        # in the scope's own index, at every step: a hold is taken with its
        # index entry and given back with it, in the same hub callback.
        held = (0 if self.finished else 1) + len(self.scope.children)
        assert self.scope.holders == held, (self.scope.holders, held, self.alive)
        if self.calls:
            assert self.finished

    def teardown(self) -> None:
        # End the example: settle what it left, check, then end everything.
        try:
            self._settle()
            self._check_settled()
            assert self.violations == []
        finally:
            for child in list(self.alive):
                child.greenlet.kill(block=True, timeout=JOIN_TIMEOUT)
            self.alive.clear()
            self.finished = True
            self.scope.finish()
            Scope.exit(self.token)
        # Whatever the order was, the request's teardown ran once, after all.
        self._settle()
        assert self.scope.closed and self.scope.wait_closed(0)
        assert self.calls == ["first", "second"] and self.violations == []


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,  # greenlets and the hub: wall time is not the point
        database=None,  # nothing written into the work tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture
def quiet_child_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children raising on purpose: keep gevent's tracebacks off stderr."""
    hub = gevent.get_hub()
    original = hub.handle_error

    def handle_error(context: t.Any, type_: t.Any, value: t.Any, tb: t.Any) -> None:
        if isinstance(type_, type) and issubclass(type_, Boom):
            return
        original(context, type_, value, tb)

    monkeypatch.setattr(hub, "handle_error", handle_error)


def test_scope_lifecycle_in_random_orders(quiet_child_errors: None) -> None:
    run_state_machine_as_test(ScopeLifecycle, settings=_settings(examples=50, steps=30))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scope_lifecycle_in_random_orders_soak(quiet_child_errors: None) -> None:
    run_state_machine_as_test(ScopeLifecycle, settings=_settings(examples=1500, steps=60))
