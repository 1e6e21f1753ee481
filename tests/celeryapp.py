"""The Celery app of the Celery tests, in the worker and in the test process.

The worker imports this module (``celery -A celeryapp worker``) with
``CELERYAPP_CONFIG`` in its environment; the test makes the same app with
:func:`make_app` and the same settings to publish. Both declare the same
carried variables at import, as an application would.

Every task returns what it saw (:func:`seen`) through the ``file://``
result backend; ``task_postrun`` records what the worker's own Context holds
after the task ended (``postrun/<task id>.json``), which must be nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as t
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import celery
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

import geventctx
from geventctx.celery import carry, install, parent_task_id, task_id


@dataclass(frozen=True)
class User:
    id: int
    name: str


request_id: ContextVar[str] = carry(ContextVar("request_id"))
tenant: ContextVar[str] = carry(ContextVar("tenant"), name="tenant_name")
user: ContextVar[User] = carry(
    ContextVar("user"), dumps=lambda u: {"id": u.id, "name": u.name}, loads=lambda d: User(d["id"], d["name"])
)
#: What the worker itself sets ``tenant`` to at import (see the end).
WORKER_LEVEL_TENANT = "worker-level-tenant"
#: Set by the publisher too, but never declared: it must not travel.
undeclared: ContextVar[str] = ContextVar("undeclared")


def seen() -> dict[str, t.Any]:
    """The declared (and one undeclared) context as the caller sees it."""
    u = user.get(None)
    return {
        "request_id": request_id.get(None),
        "tenant": tenant.get(None),
        "user": None if u is None else [u.id, u.name],
        "undeclared": undeclared.get(None),
        "task_id": task_id.get(),
        "parent_task_id": parent_task_id.get(),
    }


def make_app(config: dict[str, str], installed: bool = True) -> celery.Celery:
    from celerykit import fs_broker

    workdir = Path(config["workdir"])
    app = celery.Celery("celeryapp", set_as_current=False)
    broker = config["broker"]
    settings: dict[str, t.Any] = fs_broker(workdir) if broker == "filesystem" else {"broker_url": broker}
    (workdir / "results").mkdir(parents=True, exist_ok=True)
    (workdir / "postrun").mkdir(parents=True, exist_ok=True)
    (workdir / "started").mkdir(parents=True, exist_ok=True)
    app.conf.update(
        settings,
        result_backend=f"file://{workdir / 'results'}",
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
    )
    if installed:
        install(app)
    define_tasks(app)
    return app


class PlainBase(celery.Task):  # type: ignore[misc]
    """A base of the user's made from celery.Task, not app.Task: install()
    gives its tasks the mixin when the app is finalized."""


def define_tasks(app: celery.Celery) -> None:
    @app.task(name="foreign_base", shared=False, base=PlainBase)
    def foreign_base() -> dict[str, t.Any]:
        out = {"seen": seen()}
        request_id.set("written-by-foreign-base")
        return out

    @app.task(name="observe", shared=False, bind=True)
    def observe(self: t.Any, *prev: t.Any, tag: str = "", pause: float = 0.0) -> dict[str, t.Any]:
        before = seen()
        if pause:
            time.sleep(pause)  # under -P gevent: monkey-patched, other tasks run meanwhile
        after = seen()
        return {"tag": tag, "prev": list(prev), "seen": before, "stable": before == after, "id": self.request.id}

    @app.task(name="overwrite", shared=False)
    def overwrite(tag: str = "") -> dict[str, t.Any]:
        # A task's own writes: they must not reach the next task.
        request_id.set(f"overwritten-by-{tag}")
        tenant.set("overwritten")
        return {"tag": tag, "seen": seen()}

    @app.task(name="children", shared=False)
    def children(tag: str = "") -> dict[str, t.Any]:
        kids = [geventctx.spawn(seen) for _ in range(3)]
        return {"tag": tag, "seen": seen(), "children": [k.get(timeout=10) for k in kids]}

    @app.task(name="publish_inner", shared=False, bind=True)
    def publish_inner(self: t.Any, tag: str = "", set_tenant: str | None = None) -> dict[str, t.Any]:
        if set_tenant is not None:
            tenant.set(set_tenant)
        inner = app.signature("observe", kwargs={"tag": f"{tag}-inner"}).apply_async()
        return {"tag": tag, "seen": seen(), "inner": inner.id}

    @app.task(name="fail", shared=False)
    def fail(tag: str = "") -> None:
        raise ValueError(f"fail {tag} with {request_id.get(None)}")

    @app.task(name="retry_once", shared=False, bind=True, max_retries=3)
    def retry_once(self: t.Any, tag: str = "") -> dict[str, t.Any]:
        if self.request.retries == 0:
            raise self.retry(countdown=0.05)
        return {"tag": tag, "seen": seen(), "retries": self.request.retries}

    @app.task(name="slow", shared=False, bind=True)
    def slow(self: t.Any, tag: str = "", seconds: float = 30.0) -> dict[str, t.Any]:
        first = seen()
        if _WORKDIR is not None:
            (Path(_WORKDIR) / "started" / str(self.request.id)).write_text("")
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            return {"tag": tag, "seen": first, "soft_limited": True, "then": seen()}
        return {"tag": tag, "seen": first, "soft_limited": False}

    @app.task(name="collect", shared=False)
    def collect(results: list[t.Any], tag: str = "") -> dict[str, t.Any]:
        return {"tag": tag, "seen": seen(), "results": results}

    @app.task(name="user_object", shared=False)
    def user_object() -> User | None:
        return user.get(None)  # eager only: the object itself comes back

    @app.task(name="where", shared=False)
    def where() -> dict[str, t.Any]:
        return {"pid": os.getpid(), "thread": threading.get_ident(), "seen": seen()}


def _postrun(task_id: str, **_: t.Any) -> None:
    # Runs after the body, in the Context the pool runs tasks in: a naive
    # var.set() in task_prerun would still show here.
    if _WORKDIR is None:
        return
    path = Path(_WORKDIR) / "postrun" / f"{task_id}.json"
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(seen()))
    os.rename(partial, path)


def _ready(**_: t.Any) -> None:
    if _WORKDIR is not None:
        (Path(_WORKDIR) / "ready").write_text(str(os.getpid()))


_WORKDIR: str | None = None
_config = os.environ.get("CELERYAPP_CONFIG")
if _config:  # in the worker
    _WORKDIR = json.loads(_config)["workdir"]
    app = make_app(json.loads(_config), installed=os.environ.get("CELERYAPP_INSTALL", "1") == "1")
    signals.task_postrun.connect(_postrun, weak=False)
    signals.worker_ready.connect(_ready, weak=False)
    # A worker-level value of a declared variable (prefork children and the
    # pool's threads start from it, or not): never a task's.
    tenant.set(WORKER_LEVEL_TENANT)
