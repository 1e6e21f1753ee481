"""geventctx.integrations.sentry (written as an attack by a reviewer who did
not write it): Sentry's client lifecycle around the integration (re-init, init
without it, init without DSN, hand-offs outside requests and before init)."""

from __future__ import annotations

import typing as t

import flask
import gevent
import pytest

import geventctx
from geventctx import forks
from geventctx.flask import GeventContext

pytest.importorskip("sentry_sdk")
import sentry_sdk  # noqa: E402
from sentry_sdk.scope import Scope  # noqa: E402
from test_sentry import MemoryTransport  # noqa: E402

from geventctx.integrations.sentry import GeventctxIntegration  # noqa: E402


def _init(integration: bool) -> MemoryTransport:
    transport = MemoryTransport()
    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=transport, traces_sample_rate=1.0,
                    integrations=[GeventctxIntegration()] if integration else [])
    return transport


@pytest.fixture
def client_off() -> t.Iterator[None]:
    yield
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def _app() -> flask.Flask:
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/t")
    def view() -> str:
        geventctx.spawn(sentry_sdk.set_tag, "child", "1").join()
        sentry_sdk.capture_message("parent")
        return "ok"

    @app.get("/e")
    def fail() -> str:
        geventctx.spawn(_boom).get()
        return "not reached"

    return app


def _boom() -> None:
    raise LookupError("boom")


def _parent_tags(transport: MemoryTransport) -> dict[str, str]:
    return next(e for e in transport.events() if e.get("message") == "parent").get("tags", {})


def test_init_twice_with_then_without_then_with_again(serve: t.Any, client_off: None) -> None:
    server = serve(_app())
    _init(True)
    transport = _init(True)  # a second init with it
    assert server.request("GET", "/t").status == 200
    assert _parent_tags(transport) == {}
    assert server.request("GET", "/e").status == 500
    assert len([e for e in transport.events() if e.get("exception")]) == 1

    transport = _init(False)  # now inert: Sentry's own (shared) behaviour
    assert server.request("GET", "/t").status == 200
    assert _parent_tags(transport) == {"child": "1"}
    assert server.request("GET", "/e").status == 500
    # Without the integration nothing is dropped: the child's log line and Flask's capture.
    assert len([e for e in transport.events() if e.get("exception")]) == 2

    transport = _init(True)
    assert server.request("GET", "/t").status == 200
    assert _parent_tags(transport) == {}


def test_outside_any_request_children_fork_and_the_script_keeps_its_own(client_off: None) -> None:
    transport = _init(True)

    def script() -> None:
        sentry_sdk.set_tag("script", "1")
        sentry_sdk.add_breadcrumb(message="crumb script")

        def child(name: str) -> None:
            sentry_sdk.set_tag("child", name)
            sentry_sdk.add_breadcrumb(message=f"crumb {name}")
            gevent.sleep(0.01)
            sentry_sdk.capture_message(name)

        gs = [geventctx.spawn(child, "a"), gevent.spawn(child, "b")]
        sentry_sdk.set_tag("late", "1")
        gevent.joinall(gs)
        sentry_sdk.capture_message("script")

    geventctx.patch()
    try:
        geventctx.spawn(script).get()
    finally:
        geventctx.unpatch()
    events = {e["message"]: e for e in transport.events()}
    assert events["script"]["tags"] == {"script": "1", "late": "1"}
    assert events["a"]["tags"] == {"script": "1", "child": "a"}
    assert events["b"]["tags"] == {"script": "1", "child": "b"}


def test_one_trace_per_script_run_in_children_outside_a_request(client_off: None) -> None:
    # Outside a request the spawner has no *current* scope of its own until
    # something asks for it: the fork creates one in each child's snapshot,
    # with a new propagation context: each child its own trace id. Without
    # the integration each child would create its own lazily too, so this
    # only checks the parent's trace is shared once it exists.
    transport = _init(True)
    ids: list[str] = []

    def script() -> None:
        Scope.get_current_scope()  # the script's trace exists
        trace = sentry_sdk.get_traceparent()
        gs = [geventctx.spawn(lambda: ids.append(sentry_sdk.get_traceparent())) for _ in range(3)]
        gevent.joinall(gs)
        ids.append(trace)

    geventctx.spawn(script).get()
    assert len({i.split("-")[0] for i in ids}) == 1, ids
    del transport


def test_after_the_integrations_client_is_gone_hand_offs_stop_calling_into_sentry(client_off: None) -> None:
    # Once no current client has the integration, the first hand-off finds
    # that out and disarms the fork and the reporter: later hand-offs pay
    # geventctx.forks' empty-list test only. A new init with the
    # integration arms them again (its constructor).
    from geventctx import errorlog
    from geventctx.integrations.sentry import _capture_child_error, _fork_scopes

    _init(True)
    assert _fork_scopes in forks.registered() and _capture_child_error in errorlog._reporters
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)
    _init(False)
    geventctx.spawn(lambda: None).join()  # finds the integration gone
    calls = []
    original = sentry_sdk.get_client

    def counting() -> t.Any:
        calls.append(1)
        return original()

    sentry_sdk.get_client = counting
    try:
        for _ in range(3):
            geventctx.spawn(lambda: None).join()
    finally:
        sentry_sdk.get_client = original
    assert calls == [] and _fork_scopes not in forks.registered()
    assert _capture_child_error not in errorlog._reporters
    _init(True)
    assert _fork_scopes in forks.registered() and _capture_child_error in errorlog._reporters


def test_a_hand_off_from_a_spawner_without_sentry_scopes_builds_none(client_off: None) -> None:
    # Outside a request (a script, a CLI, a worker loop, a server's own
    # greenlets) the spawner usually has no Sentry scope in its context: the
    # fork forks only scopes that are set. (Asking
    # Scope.get_isolation_scope()/get_current_scope() constructed a Scope
    # each — environment reads, a new propagation context — only to copy it:
    # ~40 µs per hand-off, for children that could share nothing.)
    _init(True)
    made = []
    original = Scope.__init__

    def counting(self: Scope, *args: t.Any, **kwargs: t.Any) -> None:
        made.append(kwargs.get("ty"))
        original(self, *args, **kwargs)

    def spawner() -> None:  # an empty context: no Sentry scope set
        Scope.__init__ = counting  # type: ignore[method-assign]
        try:
            geventctx.spawn(lambda: None).join()
        finally:
            Scope.__init__ = original  # type: ignore[method-assign]

    g = gevent.Greenlet(spawner)
    g.start()
    g.join()
    assert made == [], f"{len(made)} Scope objects built for one hand-off: {made}"
