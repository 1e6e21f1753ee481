"""geventctx.integrations.sentry next to the real sentry-sdk.

Real parts: sentry-sdk 2.x with its default integrations (Flask, logging,
threading, dedupe) and an in-memory transport (no network), a Flask app
under GeventContext served by a real gevent.pywsgi server on 127.0.0.1, and
concurrent raw-socket clients. Each request hands off one child of each
kind: ``geventctx.spawn``, ``Pool``, ``ThreadPool`` and ``Executor``.
"""

from __future__ import annotations

import typing as t

import flask
import gevent
import pytest
from gevent.monkey import get_original

import geventctx
from geventctx.flask import GeventContext

sentry_sdk = pytest.importorskip("sentry_sdk", reason="sentry-sdk is a test dependency")
from sentry_sdk.envelope import Envelope  # noqa: E402
from sentry_sdk.transport import Transport  # noqa: E402

from geventctx.integrations.sentry import GeventctxIntegration  # noqa: E402

native_sleep = get_original("time", "sleep")

REQUESTS = 50
KINDS = ("spawn", "pool", "threadpool", "executor")


class MemoryTransport(Transport):
    """Keeps every envelope Sentry would send."""

    def __init__(self, options: t.Any = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, t.Any]]:
        """Error and message events."""
        return [e for e in (env.get_event() for env in self.envelopes) if e is not None]

    def transactions(self) -> list[dict[str, t.Any]]:
        return [e for e in (env.get_transaction_event() for env in self.envelopes) if e is not None]


@pytest.fixture
def sentry() -> t.Iterator[t.Callable[..., MemoryTransport]]:
    """``sentry(integration=True)`` initialises the real SDK with an
    in-memory transport; the client is removed again after the test."""

    def init(integration: bool = True) -> MemoryTransport:
        transport = MemoryTransport()
        sentry_sdk.init(
            dsn="http://public@127.0.0.1:9/1",
            transport=transport,
            traces_sample_rate=1.0,
            integrations=[GeventctxIntegration()] if integration else [],
        )
        return transport

    yield init
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


class Kinds:
    """One child of each hand-off kind, run side by side."""

    def __init__(self) -> None:
        self.pool = geventctx.Pool(4 * REQUESTS)
        self.threads = geventctx.ThreadPool(4)
        self.executor = geventctx.Executor(max_workers=4 * REQUESTS)

    def start(self, child: t.Callable[[str], t.Any]) -> list[t.Any]:
        """Start ``child(kind)`` once per kind."""
        return [
            geventctx.spawn(child, "spawn"),
            self.pool.spawn(child, "pool"),
            self.threads.spawn(child, "threadpool"),
            self.executor.submit(child, "executor"),
        ]

    @staticmethod
    def join(started: list[t.Any]) -> list[t.Any]:
        """Their results (errors re-raised)."""
        return [s.get() if hasattr(s, "get") else s.result() for s in started]

    def run(self, child: t.Callable[[str], t.Any]) -> list[t.Any]:
        return self.join(self.start(child))

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.threads.kill()


@pytest.fixture
def kinds() -> t.Iterator[Kinds]:
    kinds = Kinds()
    yield kinds
    kinds.close()


def pause(kind: str, seconds: float = 0.02) -> None:
    """Let every other child of every request run first."""
    (native_sleep if kind == "threadpool" else gevent.sleep)(seconds)


def _load(serve: t.Any, app: flask.Flask, path: str, n: int = REQUESTS) -> None:
    server = serve(app)
    clients = [gevent.spawn(server.request, "GET", f"{path}/{i}") for i in range(n)]
    gevent.joinall(clients, raise_error=True, timeout=60)
    statuses = [c.value.status for c in clients]
    assert statuses == [200] * n, statuses


def _tag_app(kinds: Kinds) -> flask.Flask:
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/tags/<int:n>")
    def tags(n: int) -> str:
        sentry_sdk.set_tag("request", str(n))
        sentry_sdk.set_user({"id": f"user-{n}"})

        def child(kind: str) -> None:
            sentry_sdk.set_tag("child", f"{n}.{kind}")
            sentry_sdk.add_breadcrumb(message=f"crumb {n}.{kind}")
            pause(kind)  # every sibling, and every other request's children, set theirs
            sentry_sdk.capture_message(f"child {n} {kind}")

        kinds.run(child)
        sentry_sdk.capture_message(f"parent {n}")
        return "ok"

    return app


def _crumbs(event: dict[str, t.Any]) -> list[str]:
    values = event.get("breadcrumbs", {}).get("values", [])
    return [b["message"] for b in values if str(b.get("message", "")).startswith("crumb")]


def test_a_childs_tags_and_breadcrumbs_stay_in_that_child_among_concurrent_requests(
    sentry: t.Any, kinds: Kinds, serve: t.Any
) -> None:
    transport = sentry()
    _load(serve, _tag_app(kinds), "/tags")
    events = transport.events()
    assert len(events) == REQUESTS * (len(KINDS) + 1)
    bleed = []
    for event in events:
        words = event["message"].split()
        n = words[1]
        own_child = {"child": f"{n}.{words[2]}"} if words[0] == "child" else {}
        expected = (dict(request=n, **own_child), [f"crumb {n}.{words[2]}"] if own_child else [])
        if (event.get("tags"), _crumbs(event)) != expected:
            bleed.append((event["message"], event.get("tags"), _crumbs(event)))
        # What the request set reaches each of its children's events.
        assert event["user"]["id"] == f"user-{n}", event["message"]
        assert event["request"]["url"].endswith(f"/tags/{n}"), event["message"]
        assert event["transaction"] == "tags", event["message"]
    assert bleed == []


def test_without_the_integration_sentry_scopes_are_shared_and_tags_bleed(
    sentry: t.Any, kinds: Kinds, serve: t.Any
) -> None:
    # The neighbour's behaviour the integration exists for: with sentry-sdk
    # alone, the children of one request share its scope objects.
    transport = sentry(integration=False)
    _load(serve, _tag_app(kinds), "/tags", n=5)
    parents = [e for e in transport.events() if e["message"].startswith("parent")]
    assert parents and all("child" in e.get("tags", {}) for e in parents)


def test_child_spans_are_children_of_the_request_transaction_and_never_of_each_other(
    sentry: t.Any, kinds: Kinds, serve: t.Any
) -> None:
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/spans/<int:n>")
    def spans(n: int) -> str:
        in_span: list[str] = []
        done: list[bool] = []

        def child(kind: str) -> None:
            with sentry_sdk.start_span(op="child", name=f"{n} {kind}"):
                in_span.append(kind)
                while not done:  # hold the span open while the parent starts one
                    pause(kind, 0.002)

        started = kinds.start(child)
        while len(in_span) < len(KINDS):
            gevent.sleep(0.002)
        # Without forks, the shared current scope's span is now the span
        # of whichever child started last.
        with sentry_sdk.start_span(op="parent", name=f"{n} after"):
            pass
        done.append(True)
        kinds.join(started)
        return "ok"

    _load(serve, app, "/spans", n=10)
    transactions = transport.transactions()
    assert len(transactions) == 10
    for event in transactions:
        root = event["contexts"]["trace"]["span_id"]
        n = event["request"]["url"].rsplit("/", 1)[1]
        names = {s["description"]: s["parent_span_id"] for s in event["spans"] if s["op"] in ("child", "parent")}
        assert names == {f"{n} {name}": root for name in (*KINDS, "after")}, names


def test_a_span_finished_after_the_transaction_is_not_sent_and_a_late_childs_own_transaction_is(
    sentry: t.Any, serve: t.Any, gates: t.Any
) -> None:
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)
    release = gates()
    ended = gates()

    def late() -> None:
        release.wait(5)  # the response is sent and the transaction finished
        with sentry_sdk.start_span(op="late", name="after the response"):
            pass
        with sentry_sdk.start_transaction(op="task", name="late work"):
            with sentry_sdk.start_span(op="late", name="in its own transaction"):
                pass
        ended.set()

    @app.get("/late/<int:n>")
    def view(n: int) -> str:
        sentry_sdk.set_tag("request", str(n))
        geventctx.spawn(late)
        return "ok"

    server = serve(app)
    assert server.request("GET", "/late/1").status == 200
    gevent.sleep(0.05)
    release.set()
    assert ended.wait(5)
    names = {e["transaction"]: [s["description"] for s in e.get("spans", [])] for e in transport.transactions()}
    assert names == {"view": [], "late work": ["in its own transaction"]}, names
    late_work = next(e for e in transport.transactions() if e["transaction"] == "late work")
    assert late_work["tags"] == {"request": "1"}


def _fail(n: int, kind: str) -> None:
    sentry_sdk.set_tag("child", kind)
    raise LookupError(f"boom {n} {kind}")


ERROR_KINDS = ["spawn_get", "pool_map", "threadpool_apply", "future_result", "fire_and_forget", "patched_spawn_get"]


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_a_childs_error_is_one_event_with_the_childs_scope_also_when_the_view_reraises_it(
    kind: str, sentry: t.Any, kinds: Kinds, serve: t.Any, gates: t.Any
) -> None:
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)
    ended = gates()

    @app.get("/fail/<int:n>")
    def view(n: int) -> str:
        sentry_sdk.set_tag("request", str(n))
        if kind == "spawn_get":
            geventctx.spawn(_fail, n, kind).get()
        elif kind == "pool_map":
            kinds.pool.map(lambda k: _fail(n, k), [kind])
        elif kind == "threadpool_apply":
            kinds.threads.apply(_fail, (n, kind))
        elif kind == "future_result":
            kinds.executor.submit(_fail, n, kind).result()
        elif kind == "fire_and_forget":
            geventctx.spawn(_fail, n, kind).rawlink(lambda _: ended.set())
        else:
            gevent.spawn(_fail, n, kind).get()
        return "not reached" if kind != "fire_and_forget" else "ok"

    if kind == "patched_spawn_get":
        geventctx.patch()
    try:
        server = serve(app)
        responses = [server.request("GET", f"/fail/{n}") for n in range(3)]
        if kind == "fire_and_forget":
            assert ended.wait(5)
    finally:
        if kind == "patched_spawn_get":
            geventctx.unpatch()
    assert [r.status for r in responses] == [200 if kind == "fire_and_forget" else 500] * 3
    errors = [e for e in transport.events() if e.get("exception")]
    booms = sorted(e["exception"]["values"][-1]["value"] for e in errors)
    assert booms == [f"boom {n} {kind}" for n in range(3)], booms
    for event in errors:
        n = event["exception"]["values"][-1]["value"].split()[1]
        # The Executor keeps the error in its future (concurrent.futures
        # does): the event is the view's, without the child's own tag.
        child = {} if kind == "future_result" else {"child": kind}
        assert event["tags"] == dict(request=n, **child), event["tags"]
        assert event["request"]["url"].endswith(f"/fail/{n}")


def test_an_exception_geventctx_never_logged_is_left_to_sentrys_own_rules(sentry: t.Any, serve: t.Any) -> None:
    # A child and then its view capture the same exception: Sentry's dedupe
    # keeps its last-seen error per context, so both are sent — the
    # integration drops only errors geventctx logged for a child.
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)
    error = LookupError("captured twice")

    @app.get("/twice")
    def view() -> str:
        geventctx.spawn(sentry_sdk.capture_exception, error).join()
        sentry_sdk.capture_exception(error)
        return "ok"

    assert serve(app).request("GET", "/twice").status == 200
    assert len([e for e in transport.events() if e.get("exception")]) == 2
