"""Example: the request id and user travel from a Flask view to a Celery task.

The view sets two context variables declared with ``geventctx.celery.carry``
and calls ``build_report.delay()``; a real ``celery worker -P gevent`` runs
the task with the view's values set (and nothing of any other request), and
a child the task hands off with ``geventctx.spawn`` sees them too. Flask's
``request`` and ``g`` stay in the web process: only declared variables
travel.

Self-contained: ``python -m examples.celery_app`` starts a worker on kombu's
filesystem transport in a temporary folder (no broker service needed),
serves the app on a free port, sends two requests, prints what each task
saw, stops everything and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from contextvars import ContextVar
from pathlib import Path

from celery import Celery, signals
from flask import Flask, jsonify, request
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

import geventctx
from geventctx.celery import carry, install, task_id
from geventctx.flask import GeventContext

request_id: ContextVar[str] = carry(ContextVar("request_id", default="-"))
user_id: ContextVar[int] = carry(ContextVar("user_id"))


class AtomicChannel(filesystem.Channel):  # type: ignore[misc]
    # kombu's filesystem transport opens a message file, then writes it: a
    # worker in another process may take the file before its bytes are
    # there and lose the task. Write under another name, then rename.
    def _put(self, queue: str, payload: t.Any, **kwargs: t.Any) -> None:
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f"part-{uuid.uuid4()}")
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.rename(partial, os.path.join(self.data_folder_out, name))


class AtomicFilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport, each message whole or not at all."""

    Channel = AtomicChannel


def make_celery(folder: Path) -> Celery:
    for name in ("queue", "processed", "control", "results"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    app = Celery("examples.celery_app", set_as_current=False)
    app.conf.update(
        broker_url="filesystem://",
        broker_transport=f"{__name__}:AtomicFilesystemTransport",
        broker_transport_options={
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": True,
            "polling_interval": 0.05,
        },
        result_backend=f"file://{folder / 'results'}",
        broker_connection_retry_on_startup=True,
    )
    install(app)  # in the web process and in the worker

    @app.task(name="build_report", shared=False)
    def build_report(title: str) -> dict[str, t.Any]:
        time.sleep(0.05)  # under -P gevent other tasks run meanwhile
        helper = geventctx.spawn(lambda: request_id.get())  # a child of the task sees it too
        return {"title": title, "request_id": request_id.get(), "user_id": user_id.get(None),
                "child_saw": helper.get(timeout=5), "task_id": task_id.get()}

    return app


def create_app(celery_app: Celery) -> Flask:
    app = Flask(__name__)
    GeventContext(app)

    @app.get("/report/<title>")
    def report(title: str) -> t.Any:
        request_id.set(request.headers.get("X-Request-Id", "-"))
        user_id.set(int(request.headers.get("X-User-Id", "0")))
        result = celery_app.tasks["build_report"].delay(title)
        return jsonify(task=result.id)

    return app


def get_json(port: int, path: str, headers: dict[str, str]) -> t.Any:
    """A plain HTTP/1.0 GET over a gevent socket; the JSON body."""
    from gevent import socket

    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n{head}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def main() -> int:
    import gevent
    from gevent.pywsgi import WSGIServer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        celery_app = make_celery(folder)
        env = dict(os.environ, EXAMPLE_CELERY_FOLDER=str(folder), PYTHONUNBUFFERED="1")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.celery_app", "worker", "-P", "gevent", "-c", "4",
             "--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "warning"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        server = WSGIServer(("127.0.0.1", 0), create_app(celery_app), log=None)
        server.start()
        try:
            deadline = time.monotonic() + 30
            while not (folder / "ready").exists():
                if worker.poll() is not None or time.monotonic() > deadline:
                    print("the worker did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            asks = [("q1", "req-1", 7), ("q2", "req-2", 8)]
            calls = [gevent.spawn(get_json, server.server_port, f"/report/{title}",
                                  {"X-Request-Id": rid, "X-User-Id": str(uid)}) for title, rid, uid in asks]
            gevent.joinall(calls, raise_error=True)
            for call in calls:
                result = celery_app.AsyncResult(call.value["task"])
                while not result.ready():
                    gevent.sleep(0.02)
                print(json.dumps({k: v for k, v in result.get().items() if k != "task_id"}))
        finally:
            server.stop()
            worker.terminate()
            worker.wait(30)
    return 0


folder = os.environ.get("EXAMPLE_CELERY_FOLDER")
if folder:  # in the worker: `celery -A examples.celery_app worker` finds this app
    app = make_celery(Path(folder))
    signals.worker_ready.connect(lambda **_: (Path(folder) / "ready").write_text("ok"), weak=False)

if __name__ == "__main__":
    sys.exit(main())
