"""Each example in examples/ runs, over a real server, and does what it says."""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import gevent.pool
import pytest
from httpkit import multipart, wait_for

import geventctx
from examples import background_email, background_upload, fanout_pool

ROOT = Path(__file__).resolve().parent.parent


def test_background_email_after_the_response(serve):
    background_email.OUTBOX.clear()
    background_email.CLOSED_SESSIONS.clear()
    server = serve(background_email.create_app())
    body = b"name=ada&email=ada%40example.org"
    response = server.request(
        "POST", "/signup", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 201
    assert background_email.OUTBOX == []  # the response did not wait for the mail
    wait_for(lambda: background_email.CLOSED_SESSIONS, message="teardown")
    assert background_email.OUTBOX == [{"to": "ada@example.org", "name": "ada", "via": "/signup"}]
    assert background_email.CLOSED_SESSIONS == ["session-for-ada"]  # once, after the mail


def test_fanout_pool_carries_the_request_id_into_logs(serve, caplog):
    server = serve(fanout_pool.create_app())
    with caplog.at_level(logging.INFO, logger="examples.fanout"):
        response = server.request("GET", "/product/7", headers={"X-Request-Id": "req-99"})
    assert response.status == 200
    parts = response.json()["parts"]
    assert [p["backend"] for p in parts] == fanout_pool.BACKENDS
    assert {p["request_id"] for p in parts} == {"req-99"}
    stamped = [r.request_id for r in caplog.records if r.name == "examples.fanout"]
    assert stamped == ["req-99"] * 3


def test_fanout_with_gevents_own_pool_loses_the_id_control():
    # The id is set where map is called: gevent's own pool runs the calls in
    # greenlets of a context of their own, so they say "-"; geventctx's
    # Pool, beside it, passes "req-1" on.
    def view(pool: gevent.pool.Pool) -> list[str]:
        fanout_pool.request_id.set("req-1")
        return pool.map(lambda _: fanout_pool.request_id.get(), range(3))

    assert contextvars.Context().run(view, gevent.pool.Pool(3)) == ["-", "-", "-"]
    assert contextvars.Context().run(view, geventctx.Pool(3)) == ["req-1"] * 3


@pytest.mark.parametrize("size", [1_000, 300_000])
def test_background_upload_processed_after_the_response(serve, size):
    background_upload.PROCESSED.clear()
    content = os.urandom(size)
    body, ctype = multipart({}, {"file": ("scan.bin", content)})
    server = serve(background_upload.create_app())
    response = server.request("POST", "/upload", body=body, headers={"Content-Type": ctype}, piece=16_384, delay=0.001)
    assert response.status == 202
    wait_for(lambda: "scan.bin" in background_upload.PROCESSED, message="background processing")
    assert background_upload.PROCESSED["scan.bin"] == (size, hashlib.sha256(content).hexdigest())


def test_celery_app_carries_each_requests_values_to_its_task():
    # Self-contained: it starts a real `celery worker -P gevent` on a
    # filesystem broker, serves, asks twice, prints, stops what it started.
    out = subprocess.run(
        [sys.executable, "-m", "examples.celery_app"], cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stdout + out.stderr
    seen = [json.loads(line) for line in out.stdout.splitlines()]
    assert seen == [
        {"title": "q1", "request_id": "req-1", "user_id": 7, "child_saw": "req-1"},
        {"title": "q2", "request_id": "req-2", "user_id": 8, "child_saw": "req-2"},
    ]


def test_observability_wires_sentry_opentelemetry_and_logging(capsys):
    pytest.importorskip("sentry_sdk", reason="sentry-sdk is a test dependency")
    from examples import observability

    report = observability.main()
    assert report["statuses"] == {"1": 200, "2": 500, "3": 200}
    spans = report["spans"]
    roots = {s.context.span_id: s for s in spans if s.parent is None}
    assert len(roots) == 3
    trace_of_order = {}
    for span in spans:
        if span.parent is not None:  # a child's span, in its request's trace
            root = roots[span.parent.span_id]
            assert span.context.trace_id == root.context.trace_id
            trace_of_order[span.name.split()[1]] = f"{root.context.trace_id:032x}"[:8]
    assert sorted(trace_of_order) == sorted(sum(observability.ITEMS.values(), []))
    source = Path(observability.__file__).read_text().splitlines()
    map_line = next(i for i, text in enumerate(source, 1) if "pool.map(price" in text)
    children = [line for line in report["lines"] if "priced" in line]
    assert len(children) == 4
    [failed] = [line for line in report["lines"] if "failed" in line]
    assert failed.startswith(f"GET /orders/2 | {observability.__file__}:{map_line} | trace {trace_of_order['broken']}")
    for line in children:
        request, site, trace, message = line.split(" | ")
        item, order = message.split()[1], message.split()[-1]
        assert request == f"GET /orders/{order}", line
        assert site == f"{observability.__file__}:{map_line}", line
        assert trace == f"trace {trace_of_order[item]}", line
    [event] = report["events"]  # the broken item, once although the view re-raised it
    assert event["exception"]["values"][-1]["value"] == "no price for 'broken'"
    assert event["tags"] == {"order": "2", "item": "broken"}
    assert event["request"]["url"].endswith("/orders/2")
    assert "one event per failed item" in capsys.readouterr().out


def test_taskgroup_fanout_answers_with_what_each_backend_gave_and_leaves_nothing_running(serve):
    from examples import taskgroup_fanout as fanout

    backends = serve(fanout.create_backends(), spawn=gevent.pool.Pool(16))  # (a pool: stop() kills)
    app = serve(fanout.create_app(("127.0.0.1", backends.port)))

    def ask(product: int) -> tuple[int, dict]:
        response = app.request("GET", f"/product/{product}", headers={"X-Request-Id": f"req-{product}"})
        assert geventctx.registry.live() == []  # every call ended with the view
        return response.status, response.json()

    status, page = ask(1)
    assert status == 200 and page["errors"] is None
    assert {name: part["ok"]["request_id"] for name, part in page["parts"].items()} == dict.fromkeys(
        fanout.BACKENDS, "req-1"
    )

    # pricing fails: the group stops reviews at once and raises the failure
    status, page = ask(13)
    assert status == 502
    assert page["errors"] == ['pricing answered 503: {"error":"no price for product 13"}\n']
    assert page["parts"]["inventory"]["ok"]["request_id"] == "req-13"
    assert page["parts"]["pricing"] == {"failed": page["errors"][0]}
    assert page["parts"]["reviews"] == {"stopped": True}

    # reviews are slow: the deadline stops them, long before they would answer
    status, page = ask(7)
    assert status == 504
    [timeout] = page["errors"]
    assert timeout.startswith(f"TaskGroup deadline of {fanout.DEADLINE:g} s passed; stopped: call_backend (spawned at ")
    assert timeout.count("call_backend") == 1
    assert page["parts"]["reviews"] == {"stopped": True}
    assert [page["parts"][name]["ok"]["backend"] for name in ("inventory", "pricing")] == ["inventory", "pricing"]
    backends.stop(timeout=0.1)  # the slow backend's own handler would sleep on


def test_django_fanout_children_see_the_views_request_and_language_and_keep_their_own(server):
    pytest.importorskip("django")
    from httpkit import request

    srv = server([sys.executable, "-m", "examples.django_fanout", "{port}"])
    response = request(srv.port, "GET", "/dashboard", headers={"Accept-Language": "de"})
    assert response is not None and response.status == 200, srv.context()
    page = response.json()
    assert page["language"] == "de"  # the French child did not change the view's
    assert [part["backend"] for part in page["parts"]] == ["news", "orders", "stock"]
    assert [part["language"] for part in page["parts"]] == ["de", "de", "fr"]
    assert {part["path"] for part in page["parts"]} == {"/dashboard"}
    assert [part["link"] for part in page["parts"]] == ["/parts/news", "/parts/orders", "/parts/stock"]
