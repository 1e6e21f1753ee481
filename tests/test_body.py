"""G5 for the shared body as a unit, over the inputs other WSGI servers hand
an app: gunicorn, uWSGI and wsgiref answer ``b""`` when the client went away
before the announced length (gevent.pywsgi raises instead). The readers are
real greenlets on the test's hub; the server side is the input alone."""

from __future__ import annotations

import io
import typing as t

import gevent
from werkzeug.exceptions import ClientDisconnected

from geventctx.body import SharedBody

WAIT = 5.0


class EndsEarly:
    """A server input for a body announced as 10 bytes that ends after 3:
    ``read`` returns what there is, then ``b""``."""

    def __init__(self) -> None:
        self.data = io.BytesIO(b"abc")
        self.asked: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.asked.append(size)
        return self.data.read(size)


def test_an_input_that_ends_early_fails_every_reader_with_the_same_client_disconnected():
    # No partial data: a reader never gets the 3 bytes as if they were the
    # body; every reader, however it reads, gets one and the same error.
    raw = EndsEarly()
    body = SharedBody(raw, 10)
    readers: dict[str, t.Callable[[], t.Any]] = {
        "read(10)": lambda: body.read(10),
        "read_whole": body.read_whole,
        "readline": body.readline,
        "cursor.read(4)": lambda: body.cursor().read(4),
        "cursor.read()": lambda: body.cursor().read(),
    }
    children = {name: gevent.spawn(read) for name, read in readers.items()}
    gevent.joinall(list(children.values()), timeout=WAIT)
    assert all(child.dead for child in children.values()), "a reader hung"
    outcomes = {name: child.exception or child.value for name, child in children.items()}
    first = outcomes["read(10)"]
    assert isinstance(first, ClientDisconnected), outcomes
    assert all(outcome is first for outcome in outcomes.values()), outcomes
    assert "3 of 10" in str(first)
    assert body.error is first and body.broken
    assert raw.data.tell() == 3  # it read what there was, once
    # A reader that comes later for more than arrived gets the same error too.
    late = gevent.spawn(body.read, 4)
    late.join(WAIT)
    assert late.exception is first
