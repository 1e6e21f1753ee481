"""Three promises a mutation audit found unguarded (issue 25): each test here
fails against the mutant it names, and passes on the code as it should be."""

from __future__ import annotations

import contextvars
import gc
import threading
import weakref

import gevent
import gevent.event
import gevent.threadpool
import pytest

import geventctx
from geventctx import registry

WAIT = 5.0
MARK: contextvars.ContextVar[str] = contextvars.ContextVar("test_unguarded_promises.mark", default="-")


def test_registry_lists_executor_and_thread_pool_tasks_blocked_outside_any_request():
    # G10. Mutant: live() kept only hand-offs of request scopes and greenlets
    # (dropping the _live records of tasks made outside any request).
    executor = geventctx.Executor()
    threads = geventctx.ThreadPool(1)
    greenlet_gate = gevent.event.Event()
    thread_gate = threading.Event()

    def blocked_in_a_thread() -> str:
        thread_gate.wait(WAIT)
        return "thread"

    def blocked_on_the_hub() -> str:
        greenlet_gate.wait(WAIT)
        return "greenlet"

    try:
        assert geventctx.current_scope() is None
        future = executor.submit(blocked_on_the_hub)
        task = threads.spawn(blocked_in_a_thread)
        gevent.sleep(0.05)
        functions = {record.function for record in registry.live()}
        assert blocked_on_the_hub in functions and blocked_in_a_thread in functions
        records = [r for r in registry.live() if r.function in (blocked_on_the_hub, blocked_in_a_thread)]
        assert all(r.scope is None and "test_unguarded_promises.py" in r.spawn_site for r in records)
    finally:
        greenlet_gate.set()
        thread_gate.set()
    assert future.result(timeout=WAIT) == "greenlet" and task.get(timeout=WAIT) == "thread"
    gevent.sleep(0.05)
    assert not [r for r in registry.live() if r.function in (blocked_on_the_hub, blocked_in_a_thread)]
    threads.kill()


@pytest.mark.parametrize("kind", ["Pool.map", "Group.map", "Pool.map_async", "Group.map_async"])
def test_map_returns_results_in_input_order_when_later_items_finish_first(kind):
    # G8. Mutant: results gathered as workers finish (completion order).
    cls_name, method = kind.split(".")
    group = geventctx.Pool(10) if cls_name == "Pool" else geventctx.Group()
    finished: list[int] = []

    def slow_first(i: int) -> str:
        gevent.sleep(0.01 * (5 - i))  # item 4 ends first, item 0 last
        finished.append(i)
        return f"{i}:{MARK.get()}"

    MARK.set("caller")
    if method == "map":
        result = group.map(slow_first, range(5))
    else:
        result = group.map_async(slow_first, range(5)).get(timeout=WAIT)
    assert finished == [4, 3, 2, 1, 0]  # they really finished in reverse
    assert result == [f"{i}:caller" for i in range(5)]


class Held:
    """An object only a request's Context holds."""


def test_a_thread_pool_worker_keeps_nothing_of_the_last_tasks_context():
    # G8. Mutant: the worker keeps the last task's Context after the task.
    # A plain gevent.threadpool task run next on the same worker must not see
    # the previous request's values, and what only that Context held is freed.
    threads = geventctx.ThreadPool(1)
    plain_next = gevent.threadpool.ThreadPool.spawn  # gevent's own spawn, same worker
    held = Held()
    witness = weakref.ref(held)
    holder: contextvars.ContextVar[Held | None] = contextvars.ContextVar("holder", default=None)

    def in_request() -> tuple[str, int]:
        return MARK.get(), threading.get_ident()

    def request(value: Held) -> tuple[str, int]:
        MARK.set("request-1")
        holder.set(value)
        return threads.apply(in_request)

    try:
        seen, worker = contextvars.copy_context().run(request, held)
        assert seen == "request-1"
        del held
        # The next task on that worker, submitted by gevent's own API with no
        # context of geventctx's (a plain gevent.threadpool task).
        after, same_worker = plain_next(threads, lambda: (MARK.get(), threading.get_ident())).get(timeout=WAIT)
        assert same_worker == worker  # one worker: the same thread ran both
        assert after == "-"
        gc.collect()
        assert witness() is None, "the worker still holds the previous task's Context"
    finally:
        threads.kill()
