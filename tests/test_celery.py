"""G14: declared context travels with Celery tasks, over a real broker, to a
real ``celery worker`` (``-P gevent``, ``-P threads``, prefork).

One worker per pool for the whole module on kombu's filesystem transport
(celerykit), and one ``-P gevent`` worker on a real ``redis-server`` when the
binary is on PATH. Tasks report what they saw through the ``file://`` result
backend (celeryapp). No mocks: the publishing side is a real Flask app on
gevent.pywsgi with :class:`~geventctx.flask.GeventContext`, or plain code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import typing as t
import uuid
from contextvars import ContextVar, copy_context
from datetime import datetime, timedelta, timezone
from pathlib import Path

import celery
import gevent
import pytest
from celeryapp import WORKER_LEVEL_TENANT, User, define_tasks, make_app, request_id, seen, tenant, undeclared, user
from celerykit import Worker, close_all, redis_server
from flask import Flask, jsonify, request

import geventctx
from geventctx import CarryError, CarryWarning
from geventctx.celery import HEADER, carry, install
from geventctx.flask import GeventContext

TIMEOUT = 30.0


class Deployment:
    """A running worker and the app that publishes to it (same broker)."""

    def __init__(self, worker: Worker, installed: bool = True) -> None:
        self.worker = worker
        self.app = make_app(worker.config, installed=installed)

    def send(self, name: str, *, options: dict[str, t.Any] | None = None, **kwargs: t.Any) -> t.Any:
        return self.app.signature(name, kwargs=kwargs).apply_async(**(options or {}))

    def get(self, result: t.Any, propagate: bool = True) -> t.Any:
        # Polled with gevent.sleep: the test's own hub (a server, children
        # that publish after the response) runs meanwhile.
        if not ready(result):
            pytest.fail(f"task {result.id} lost: no result in {TIMEOUT} s{self.worker.context()}")
        return result.get(timeout=TIMEOUT, interval=0.02, propagate=propagate)

    def result(self, task_id: str) -> t.Any:
        return self.get(self.app.AsyncResult(task_id))

    def postrun(self, task_id: str) -> dict[str, t.Any]:
        """What the worker's own Context held after the task ended."""
        path = self.worker.workdir / "postrun" / f"{task_id}.json"
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            if time.monotonic() > deadline:
                pytest.fail(f"no task_postrun for {task_id}{self.worker.context()}")
            gevent.sleep(0.02)
        data: dict[str, t.Any] = json.loads(path.read_text())
        return data


def ready(result: t.Any, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not result.ready():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True


NOTHING = {"request_id": None, "tenant": None, "user": None, "undeclared": None, "task_id": None,
           "parent_task_id": None}


def assert_nothing_left(after: dict[str, t.Any]) -> None:
    """What the worker's own Context holds after a task: nothing of the task
    (the worker's own value of ``tenant``, in prefork, is the worker's)."""
    assert (after["request_id"], after["user"], after["task_id"]) == (None, None, None)
    assert after["tenant"] in (None, WORKER_LEVEL_TENANT)


def declared(rid: str, who: int = 7) -> None:
    """Set the declared variables (and one undeclared) in the current Context."""
    request_id.set(rid)
    tenant.set(f"tenant-of-{rid}")
    user.set(User(who, f"user-{who}"))
    undeclared.set("must-not-travel")


def expected(rid: str, who: int = 7) -> dict[str, t.Any]:
    return {"request_id": rid, "tenant": f"tenant-of-{rid}", "user": [who, f"user-{who}"], "undeclared": None}


def carried_part(seen_: dict[str, t.Any]) -> dict[str, t.Any]:
    return {k: seen_[k] for k in ("request_id", "tenant", "user", "undeclared")}


def in_context(fn: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
    """Run ``fn`` in a Context of its own (each caller a separate 'request')."""
    return copy_context().run(fn, *args)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[dict[str, Deployment]]:
    base = tmp_path_factory.mktemp("celery")
    started = {
        "gevent": Worker("gevent", 20, base / "gevent"),
        "threads": Worker("threads", 1, base / "threads"),  # one thread, reused by every task
        "prefork": Worker("prefork", 1, base / "prefork"),  # one child, reused by every task
    }
    try:
        for worker in started.values():  # started together, waited for together
            worker.wait_ready()
        yield {name: Deployment(worker) for name, worker in started.items()}
    finally:
        close_all(started.values())
        assert all(w.proc.proc.returncode is not None for w in started.values())


@pytest.fixture(scope="module")
def on_redis(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Deployment]:
    base = tmp_path_factory.mktemp("celery-redis")
    server = redis_server(base)
    worker = None
    try:
        worker = Worker("gevent", 20, base / "worker", broker=f"{server.url}/0")
        worker.wait_ready()
        yield Deployment(worker)
    finally:
        if worker is not None:
            worker.close()
        server.stop()
        assert server.proc.proc.returncode is not None


@pytest.fixture(params=["filesystem", "redis"])
def broker(request: pytest.FixtureRequest) -> Deployment:
    """The ``-P gevent`` worker, on each real broker."""
    if request.param == "redis":
        deployment: Deployment = request.getfixturevalue("on_redis")
        return deployment
    return t.cast(dict[str, Deployment], request.getfixturevalue("workers"))["gevent"]


@pytest.fixture
def gevent_worker(workers: dict[str, Deployment]) -> Deployment:
    return workers["gevent"]


# -- 1. what travels ---------------------------------------------------------


def test_only_declared_vars_travel_through_their_codecs(broker):
    def publish():
        declared("r-declared", who=3)
        return broker.send("observe", tag="one")

    out = broker.get(in_context(publish))
    assert carried_part(out["seen"]) == expected("r-declared", who=3)  # undeclared stayed behind


def test_delay_apply_async_signature_and_send_task_all_carry(gevent_worker):
    app = gevent_worker.app
    observe = app.tasks["observe"]

    def publish():
        declared("r-api")
        return [observe.delay(tag="delay"), observe.apply_async(kwargs={"tag": "apply_async"}),
                observe.s(tag="signature").apply_async(), app.send_task("observe", kwargs={"tag": "send_task"})]

    for result in in_context(publish):
        assert carried_part(gevent_worker.get(result)["seen"]) == expected("r-api")


def test_without_install_nothing_travels_control(workers):
    # The control: the same publish from an app without install() carries nothing.
    plain = Deployment(workers["gevent"].worker, installed=False)

    def publish():
        declared("r-plain")
        return plain.send("observe")

    out = plain.get(in_context(publish))
    assert carried_part(out["seen"]) == carried_part(NOTHING)


def test_a_value_json_cannot_encode_raises_at_publish_and_sends_nothing(gevent_worker):
    broker_dir = gevent_worker.worker.workdir / "broker"
    before = sorted(os.listdir(broker_dir))

    def publish():
        request_id.set(object())  # type: ignore[arg-type]
        with pytest.raises(CarryError, match="'request_id' cannot travel"):
            gevent_worker.send("observe")

    in_context(publish)
    assert sorted(os.listdir(broker_dir)) == before  # no message went out


def test_a_codec_that_raises_is_a_publish_error(gevent_worker):
    def publish():
        user.set("not a User")  # type: ignore[arg-type]  # its dumps reads .id
        with pytest.raises(CarryError, match="'user' cannot travel.*dumps raised"):
            gevent_worker.send("observe")

    in_context(publish)


def test_a_header_over_the_limit_raises_at_publish(gevent_worker):
    app = make_app(gevent_worker.worker.config)
    install(app, max_header_bytes=100)

    def publish():
        request_id.set("x" * 200)
        with pytest.raises(CarryError, match="over the 100-byte limit"):
            app.signature("observe").apply_async()
        request_id.set("short")
        return app.signature("observe").apply_async()

    out = gevent_worker.get(in_context(publish))
    assert out["seen"]["request_id"] == "short"


def test_on_error_warn_sends_the_task_without_what_cannot_travel(gevent_worker):
    app = make_app(gevent_worker.worker.config)
    install(app, on_error="warn")

    def publish():
        declared("r-warn")
        tenant.set(object())  # type: ignore[arg-type]
        with pytest.warns(CarryWarning, match="'tenant_name' cannot travel"):
            return app.signature("observe").apply_async()

    out = gevent_worker.get(in_context(publish))
    assert out["seen"]["request_id"] == "r-warn"
    assert out["seen"]["tenant"] is None


@pytest.mark.parametrize(
    "header, why",
    [
        ("not json {", "is not JSON"),
        ('["a list"]', "holds a list"),
        ('{"user": 5}', "loads refused"),
        ({"request_id": "another library's"}, "is a dict"),  # foreign: someone else's header of that name
    ],
)
def test_a_malformed_header_runs_the_task_without_values_and_warns_once(gevent_worker, header, why):
    def publish():
        declared("r-malformed")
        # An explicit header wins over the one install() makes (a foreign or broken publisher).
        return gevent_worker.send("observe", options={"headers": {HEADER: header}})

    result = in_context(publish)
    out = gevent_worker.get(result)
    assert carried_part(out["seen"]) == carried_part(NOTHING)
    lines = [line for line in gevent_worker.worker.output().splitlines() if result.id in line and "carried" in line]
    assert len(lines) == 1 and why in lines[0], gevent_worker.worker.context()


def test_a_name_the_worker_does_not_declare_is_ignored(gevent_worker):
    result = gevent_worker.send("observe", options={"headers": {HEADER: '{"newer_var": 1, "request_id": "r-n"}'}})
    out = gevent_worker.get(result)
    assert out["seen"]["request_id"] == "r-n"
    assert result.id not in gevent_worker.worker.output()


def test_install_is_idempotent(gevent_worker):
    app = make_app(gevent_worker.worker.config)
    task_class, amqp_class = app.Task, app.amqp_cls
    install(app)
    install(app)
    assert (app.Task, app.amqp_cls) == (task_class, amqp_class)
    send = app.amqp.send_task_message
    install(app)
    assert app.amqp.send_task_message is send

    def publish():
        request_id.set("r-idem")
        return app.signature("observe").apply_async()

    assert gevent_worker.get(in_context(publish))["seen"]["request_id"] == "r-idem"


def test_carry_refuses_what_it_cannot_declare():
    with pytest.raises(TypeError):
        carry("request_id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already declared"):
        carry(ContextVar("request_id"))  # the name is taken by another variable
    assert carry(request_id) is request_id  # the same one again: fine


def test_geventctx_imports_without_celery():
    code = (
        "import sys; sys.modules['celery'] = None\n"
        "import geventctx, geventctx.flask\n"
        "try:\n    import geventctx.celery\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "geventctx[celery]" in out.stdout


# -- 2. where a publish can be made -----------------------------------------


def publishing_app(deployment: Deployment, threadpool: geventctx.ThreadPool) -> Flask:
    app = Flask(__name__)
    GeventContext(app)

    def send(tag: str, task_id: str | None = None, pause: float = 0.0) -> str:
        return str(deployment.send("observe", tag=tag, pause=pause, options={"task_id": task_id}).id)

    @app.before_request
    def set_context() -> None:
        declared(request.headers["X-Request-Id"], int(request.headers.get("X-User", "7")))

    @app.get("/everywhere")
    def everywhere() -> t.Any:
        after = str(uuid.uuid4())

        scope = geventctx.current_scope()

        def after_the_response() -> None:
            while not scope.response_started:
                gevent.sleep(0.005)
            send("after", task_id=after)

        geventctx.spawn(after_the_response)
        return jsonify(
            view=send("view"),
            after=after,
            pool=geventctx.Pool(2).map(lambda i: send(f"pool-{i}"), range(2)),
            threadpool=threadpool.apply(send, ("threadpool",)),
        )

    @app.get("/load")
    def load() -> t.Any:
        after = str(uuid.uuid4())
        geventctx.spawn(send, "after", after, 0.01)  # publishes after the response, most of the time
        return jsonify(view=send("view", pause=0.01), after=after)

    return app


@pytest.fixture
def threadpool() -> t.Iterator[geventctx.ThreadPool]:
    pool = geventctx.ThreadPool(1)
    yield pool
    pool.kill()


def test_publish_from_view_child_pool_and_threadpool_carries_the_request(gevent_worker, serve, threadpool):
    server = serve(publishing_app(gevent_worker, threadpool))
    response = server.request("GET", "/everywhere", headers={"X-Request-Id": "r-web", "X-User": "11"})
    assert response.status == 200, response.body
    ids = response.json()
    for task in [ids["view"], ids["after"], *ids["pool"], ids["threadpool"]]:
        assert carried_part(gevent_worker.result(task)["seen"]) == expected("r-web", 11)


def test_a_task_that_publishes_carries_its_own_context_on(gevent_worker):
    def publish():
        declared("r-outer")
        return gevent_worker.send("publish_inner", tag="p"), gevent_worker.send("publish_inner", set_tenant="t-new")

    plain, changed = in_context(publish)
    outer = gevent_worker.get(plain)
    inner = gevent_worker.result(outer["inner"])
    assert carried_part(inner["seen"]) == expected("r-outer")
    assert inner["seen"]["parent_task_id"] == outer["seen"]["task_id"] == plain.id
    inner_changed = gevent_worker.result(gevent_worker.get(changed)["inner"])
    assert inner_changed["seen"]["tenant"] == "t-new"  # the task's own value, as of its publish
    assert inner_changed["seen"]["request_id"] == "r-outer"


# -- 3. the worker side -----------------------------------------------------


def test_concurrent_tasks_in_one_gevent_worker_see_only_their_own(gevent_worker):
    results = [in_context(lambda i=i: (declared(f"r-c{i}", i), gevent_worker.send("observe", pause=0.05))[1])
               for i in range(40)]
    outs = [gevent_worker.get(r) for r in results]
    assert [carried_part(o["seen"]) for o in outs] == [expected(f"r-c{i}", i) for i in range(40)]
    assert all(o["stable"] for o in outs)  # nothing changed while other tasks ran meanwhile
    assert [o["seen"]["task_id"] for o in outs] == [r.id for r in results]


@pytest.mark.parametrize("pool", ["gevent", "threads", "prefork"])
def test_each_pool_runs_tasks_with_their_values_and_resets_after_every_outcome(workers, pool):
    deployment = workers[pool]

    def publish(tag: str, name: str, **kwargs: t.Any) -> t.Any:
        def go() -> t.Any:
            declared(f"r-{pool}-{tag}")
            return deployment.send(name, tag=tag, **kwargs)

        return in_context(go)

    returned = publish("return", "overwrite")
    raised = publish("raise", "fail")
    retried = publish("retry", "retry_once")
    nothing = deployment.send("observe", tag="bare")  # published with no values at all

    assert deployment.get(returned)["seen"]["request_id"] == "overwritten-by-return"
    with pytest.raises(ValueError, match=f"with r-{pool}-raise"):
        deployment.get(raised)
    assert carried_part(deployment.get(retried)["seen"]) == expected(f"r-{pool}-retry")
    # The one thread / process of threads and prefork ran the others first:
    # nothing of theirs, not the "worker-level" tenant the worker set itself.
    assert carried_part(deployment.get(nothing)["seen"]) == carried_part(NOTHING)
    for result in (returned, raised, retried, nothing):
        assert_nothing_left(deployment.postrun(result.id))


def test_a_revoked_task_killed_in_a_gevent_worker_leaves_nothing_behind(gevent_worker):
    def publish():
        declared("r-revoked")
        return gevent_worker.send("slow", tag="revoked", seconds=30)

    result = in_context(publish)
    started = gevent_worker.worker.workdir / "started" / result.id
    deadline = time.monotonic() + TIMEOUT
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    result.revoke(terminate=True)
    assert_nothing_left(gevent_worker.postrun(result.id))  # its greenlet was killed; the tracer's finally ran
    gevent_worker.get(result, propagate=False)
    assert result.state == "REVOKED"


def test_a_time_limit_in_a_gevent_worker_leaves_nothing_behind(gevent_worker):
    def publish():
        declared("r-limited")
        return gevent_worker.send("slow", tag="limited", seconds=30, options={"time_limit": 0.3})

    result = in_context(publish)
    with pytest.raises(celery.exceptions.TimeLimitExceeded):
        gevent_worker.get(result)
    assert_nothing_left(gevent_worker.postrun(result.id))


def test_a_soft_time_limit_in_prefork_keeps_the_values_until_the_task_ends(workers):
    deployment = workers["prefork"]

    def publish():
        declared("r-soft")
        return deployment.send("slow", tag="soft", seconds=30, options={"soft_time_limit": 0.3})

    result = in_context(publish)
    out = deployment.get(result)
    assert out["soft_limited"] is True
    assert carried_part(out["then"]) == expected("r-soft")  # still the task's while it handles the limit
    assert_nothing_left(deployment.postrun(result.id))


@pytest.mark.parametrize("pool", ["gevent", "threads", "prefork"])
def test_geventctx_spawn_inside_a_task_hands_the_task_context_to_children(workers, pool):
    deployment = workers[pool]

    def publish():
        declared("r-kids")
        return deployment.send("children")

    out = deployment.get(in_context(publish))
    assert [carried_part(c) for c in out["children"]] == [expected("r-kids")] * 3
    assert {c["task_id"] for c in out["children"]} == {out["seen"]["task_id"]}


# -- 4. canvas --------------------------------------------------------------


def test_chain_links_published_by_the_worker_carry_the_chains_values(broker):
    app = broker.app

    def publish():
        declared("r-chain")
        flow = app.signature("observe", kwargs={"tag": "c1"}) | app.signature("observe", kwargs={"tag": "c2"})
        return (flow | app.signature("observe", kwargs={"tag": "c3"})).apply_async()

    last = broker.get(in_context(publish))
    assert last["tag"] == "c3" and last["prev"][0]["tag"] == "c2"
    assert carried_part(last["seen"]) == expected("r-chain")
    assert carried_part(last["prev"][0]["seen"]) == expected("r-chain")


def test_link_callbacks_carry_the_values(gevent_worker):
    app = gevent_worker.app
    callback_id = str(uuid.uuid4())

    def publish():
        declared("r-link")
        callback = app.signature("observe", kwargs={"tag": "callback"}, task_id=callback_id)
        return app.signature("observe", kwargs={"tag": "first"}).apply_async(link=callback)

    gevent_worker.get(in_context(publish))
    assert carried_part(gevent_worker.result(callback_id)["seen"]) == expected("r-link")


def test_group_and_chord_carry_the_values(gevent_worker):
    app = gevent_worker.app

    def publish():
        declared("r-group")
        members = [app.signature("observe", kwargs={"tag": f"g{i}"}) for i in range(3)]
        grouped = celery.group(members).apply_async()
        chorded = celery.chord(members, app.signature("collect", kwargs={"tag": "body"})).apply_async(
            interval=0.05, countdown=0.05)  # chord_unlock's polling (the file backend has no native chords)
        return grouped, chorded

    grouped, chorded = in_context(publish)
    for out in gevent_worker.get(grouped):
        assert carried_part(out["seen"]) == expected("r-group")
    body = gevent_worker.get(chorded)
    assert carried_part(body["seen"]) == expected("r-group")
    assert [carried_part(r["seen"]) for r in body["results"]] == [expected("r-group")] * 3


def test_countdown_and_eta_carry_the_values_as_of_the_call(gevent_worker):
    def publish():
        declared("r-later")
        later = gevent_worker.send("observe", options={"countdown": 0.2})
        at = gevent_worker.send("observe", options={"eta": datetime.now(timezone.utc) + timedelta(seconds=0.2)})
        request_id.set("changed-after-the-call")
        return later, at

    later, at = in_context(publish)
    assert gevent_worker.get(later)["seen"]["request_id"] == "r-later"
    assert gevent_worker.get(at)["seen"]["request_id"] == "r-later"


# -- eager mode (task_always_eager): nothing is published ------------------


@pytest.fixture
def eager_app(tmp_path: Path) -> celery.Celery:
    app = celery.Celery("eager", set_as_current=False)
    app.conf.update(broker_url="memory://", task_always_eager=True, task_eager_propagates=True)
    install(app)
    define_tasks(app)
    return app


def test_eager_tasks_see_the_values_and_cannot_leak_writes_back(eager_app):
    def call():
        declared("r-eager")
        out = eager_app.signature("observe").delay().get()
        overwritten = eager_app.signature("overwrite", kwargs={"tag": "e"}).apply_async().get()
        return out, overwritten, request_id.get(), tenant.get()

    out, overwritten, rid_after, tenant_after = in_context(call)
    # (The caller's process is the worker: its undeclared values are there too.)
    assert carried_part(out["seen"]) == dict(expected("r-eager"), undeclared="must-not-travel")
    assert overwritten["seen"]["request_id"] == "overwritten-by-e"
    assert (rid_after, tenant_after) == ("r-eager", "tenant-of-r-eager")  # the caller's, untouched


def test_eager_values_go_through_their_codecs_and_refuse_at_the_call(eager_app):
    def call():
        declared("r-codec", 5)
        out = eager_app.tasks["children"].delay().get()  # reads user.get() in the task: a User again
        request_id.set(object())  # type: ignore[arg-type]
        with pytest.raises(CarryError):
            eager_app.signature("observe").delay()
        return out

    out = in_context(call)
    assert out["seen"]["user"] == [5, "user-5"]

    def identity():
        sent = User(9, "ada")
        user.set(sent)
        got = eager_app.tasks["user_object"].delay().get()
        return sent, got

    sent, got = in_context(identity)
    assert got == sent and got is not sent  # User -> dumps -> loads -> a User again, as in a worker


def test_eager_canvas_carries_the_values(eager_app):
    app = eager_app

    def call():
        declared("r-eager-canvas")
        chained = (app.signature("observe", kwargs={"tag": "1"}) | app.signature("observe", kwargs={"tag": "2"}))()
        grouped = celery.group(app.signature("observe", kwargs={"tag": f"g{i}"}) for i in range(2))()
        chorded = celery.chord([app.signature("observe")] * 2, app.signature("collect"))()
        return chained.get(), grouped.get(), chorded.get()

    chained, grouped, chorded = in_context(call)
    want = dict(expected("r-eager-canvas"), undeclared="must-not-travel")
    assert carried_part(chained["seen"]) == carried_part(chained["prev"][0]["seen"]) == want
    assert [carried_part(g["seen"]) for g in grouped] == [want] * 2
    assert carried_part(chorded["seen"]) == want


def test_a_task_from_another_base_class_carries_too(gevent_worker, eager_app):
    def publish():
        declared("r-foreign")
        result = gevent_worker.send("foreign_base")
        eager_app.finalize()
        eager = eager_app.tasks["foreign_base"].delay().get()
        return result, eager, request_id.get()

    result, eager, after = in_context(publish)
    assert carried_part(gevent_worker.get(result)["seen"]) == expected("r-foreign")
    assert eager["seen"]["request_id"] == "r-foreign" and after == "r-foreign"  # and no write leaked back


def test_a_task_called_directly_is_a_plain_call(eager_app):
    def call():
        declared("r-direct")
        eager_app.tasks["overwrite"]("direct")
        return request_id.get()

    # No task run, no Context of its own: like calling the function.
    assert in_context(call) == "overwritten-by-direct"
    assert seen()["task_id"] is None


# -- 5. the load case -------------------------------------------------------


def load_case(broker: Deployment, serve: t.Any, threadpool: geventctx.ThreadPool, n: int) -> tuple[int, int]:
    """``n`` concurrent requests, each publishing from its view and from a
    child after the response, with its own ids: (mismatches, lost tasks)."""
    server = serve(publishing_app(broker, threadpool))

    def client(i: int) -> t.Any:
        response = server.request("GET", "/load", headers={"X-Request-Id": f"load-{i}", "X-User": str(i)})
        assert response is not None and response.status == 200
        return response.json()

    clients = [gevent.spawn(client, i) for i in range(n)]
    gevent.joinall(clients, raise_error=True)
    mismatches, lost = 0, 0
    for i, c in enumerate(clients):
        for key in ("view", "after"):
            result = broker.app.AsyncResult(c.value[key])
            if not ready(result):
                lost += 1
                continue
            mismatches += carried_part(result.get()["seen"]) != expected(f"load-{i}", i)
    return mismatches, lost


def test_200_concurrent_requests_each_see_only_their_own_values(broker, serve, threadpool):
    assert load_case(broker, serve, threadpool, 200) == (0, 0), broker.worker.context()


@pytest.mark.slow
def test_2000_concurrent_requests_each_see_only_their_own_values(broker, serve, threadpool):
    assert load_case(broker, serve, threadpool, 2000) == (0, 0), broker.worker.context()


# -- next to OpenTelemetry's own Celery propagation ------------------------


def test_opentelemetry_celery_spans_still_parent_inside_a_carrying_task(eager_app, caplog):
    otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is a test dependency")
    celery_otel = pytest.importorskip("opentelemetry.instrumentation.celery", reason="a test dependency")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("geventctx-test")

    @eager_app.task(name="traced", shared=False)
    def traced() -> str | None:
        with tracer.start_as_current_span("inside"):
            return request_id.get(None)

    instrumentor = celery_otel.CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        def call() -> t.Any:
            request_id.set("r-otel")
            return traced.delay().get()

        with caplog.at_level(logging.ERROR):
            assert in_context(call) == "r-otel"
    finally:
        instrumentor.uninstrument()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    run = next(span for name, span in spans.items() if name.startswith("run/"))
    assert spans["inside"].parent.span_id == run.context.span_id  # their span is current in the task body
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]
