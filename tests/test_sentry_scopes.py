"""geventctx.integrations.sentry next to Sentry's scope managers
(``push_scope``, ``configure_scope``, ``new_scope``, ``isolation_scope``)
around and inside hand-offs, and span parentage through nested hand-offs
(a child span started after its parent's span ended joins the span active at
its hand-off). Written as an attack by a reviewer who did not write the
integration; real sentry-sdk over a real gevent.pywsgi server."""

from __future__ import annotations

import typing as t
import warnings

import flask
import gevent
import pytest

import geventctx
from geventctx.flask import GeventContext

pytest.importorskip("sentry_sdk")
import sentry_sdk  # noqa: E402
from test_sentry import sentry  # noqa: E402,F401


def test_scope_managers_around_and_inside_children(sentry: t.Any, serve: t.Any) -> None:  # noqa: F811
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)

    def child(name: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with sentry_sdk.push_scope() as pushed:  # deprecated, still used
                pushed.set_tag("pushed", name)
                sentry_sdk.capture_message(f"{name} pushed")
            with sentry_sdk.configure_scope() as configured:
                configured.set_tag("configured", name)
        with sentry_sdk.new_scope() as new:
            new.set_tag("new", name)
            gevent.sleep(0.005)
            sentry_sdk.capture_message(f"{name} new")
        with sentry_sdk.isolation_scope() as iso:
            iso.set_tag("iso", name)
            gevent.sleep(0.005)
        sentry_sdk.capture_message(f"{name} after")

    @app.get("/m")
    def view() -> str:
        sentry_sdk.set_tag("req", "1")
        with sentry_sdk.new_scope() as new:
            new.set_tag("parent_new", "1")
            a = geventctx.spawn(child, "a")
        with sentry_sdk.isolation_scope() as iso:
            iso.set_tag("parent_iso", "1")
            b = geventctx.spawn(child, "b")
        c = gevent.spawn(child, "c")
        gevent.joinall([a, b, c], raise_error=True)
        sentry_sdk.capture_message("parent")
        return "ok"

    geventctx.patch()
    try:
        assert serve(app).request("GET", "/m").status == 200
    finally:
        geventctx.unpatch()
    tags = {e["message"]: e.get("tags", {}) for e in transport.events()}
    base = {"a": {"req": "1", "parent_new": "1"}, "b": {"req": "1", "parent_iso": "1"}, "c": {"req": "1"}}
    for name, inherited in base.items():
        assert tags[f"{name} pushed"] == inherited | {"pushed": name}
        assert tags[f"{name} new"] == inherited | {"configured": name, "new": name}
        assert tags[f"{name} after"] == inherited | {"configured": name}
    assert tags["parent"] == {"req": "1"}



def test_span_tree_through_nested_hand_offs(sentry: t.Any, serve: t.Any) -> None:  # noqa: F811
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)
    pool = geventctx.Pool(50)
    threads = geventctx.ThreadPool(2)
    executor = geventctx.Executor(max_workers=50)

    def leaf(name: str) -> None:
        with sentry_sdk.start_span(op="leaf", name=name):
            gevent.sleep(0.001)

    def mid(kind: str) -> None:
        with sentry_sdk.start_span(op="mid", name=kind):
            if kind == "threadpool":
                geventctx.spawn(leaf, f"{kind}/spawn").get()
            else:
                geventctx.spawn(leaf, f"{kind}/spawn").get()
                list(pool.imap_unordered(leaf, [f"{kind}/imap"]))
                executor.submit(leaf, f"{kind}/executor").result()
                threads.apply(leaf, (f"{kind}/threadpool",))
                gevent.spawn(leaf, f"{kind}/patched").get()
        # The mid span ended; a grandchild started now is the child of the
        # span active at its hand-off: the transaction (mid's parent).
        geventctx.spawn(leaf, f"{kind}/after").get()

    @app.get("/s")
    def view() -> str:
        with sentry_sdk.start_span(op="outer", name="outer"):
            started = [geventctx.spawn(mid, "spawn"), pool.spawn(mid, "pool")]
            r = threads.spawn(mid, "threadpool")
            f = executor.submit(mid, "executor")
        gevent.joinall(started, raise_error=True)
        r.get()
        f.result()
        with sentry_sdk.start_span(op="last", name="last"):
            pass
        return "ok"

    geventctx.patch()
    try:
        assert serve(app).request("GET", "/s").status == 200
    finally:
        geventctx.unpatch()
        executor.shutdown()
        threads.kill()
    (event,) = transport.transactions()
    root = event["contexts"]["trace"]["span_id"]
    by_name = {s["description"]: s for s in event["spans"]}
    assert by_name["outer"]["parent_span_id"] == root
    assert by_name["last"]["parent_span_id"] == root
    for kind in ("spawn", "pool", "threadpool", "executor"):
        mid_span = by_name[kind]
        assert mid_span["parent_span_id"] == by_name["outer"]["span_id"], kind
        leaves = [n for n in by_name if n.startswith(f"{kind}/") and n != f"{kind}/after"]
        assert leaves, kind
        for leaf_name in leaves:
            assert by_name[leaf_name]["parent_span_id"] == mid_span["span_id"], leaf_name
        assert by_name[f"{kind}/after"]["parent_span_id"] == by_name["outer"]["span_id"]
