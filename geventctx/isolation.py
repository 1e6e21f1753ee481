"""Run each WSGI request in a context of its own.

A WSGI server handles a keep-alive connection's requests in one greenlet,
one after the other, and that greenlet keeps one ``contextvars`` context. A
context variable one request sets and does not reset (a request id, a user,
a tracing span) is still set when the next request on the connection runs,
and the next request's children inherit it: context bleeds between
requests. Running the app call, the response's iteration and its
``close()`` in a fresh ``copy_context()`` per request keeps every request's
writes its own.

uWSGI by default also reuses one environ dict per core for the next request
(``wsgi-env-behavior = cheat``), so a child reading ``request.headers``
after the response could read the next request's headers; under uWSGI the
app gets a private copy of the environ.

.. versionadded:: 0.1
"""

from __future__ import annotations

import typing as t
from contextvars import Context, copy_context

__all__ = ["IsolatedApp", "own_environ"]

StartResponse = t.Callable[..., t.Any]
WSGIApp = t.Callable[[t.Dict[str, t.Any], StartResponse], t.Iterable[bytes]]
#: ``hook(environ, close)``: the end of a request, given the response's bound
#: ``close``, or ``None`` when the app call raised (the hook runs in the
#: ``except``, with the exception in flight).
EndHook = t.Callable[[t.Dict[str, t.Any], t.Callable[[], t.Any] | None], None]


def own_environ(environ: dict[str, t.Any]) -> dict[str, t.Any]:
    """``environ``, or a private copy where the server reuses the dict (uWSGI)."""
    if "uwsgi.version" in environ:
        return dict(environ)
    return environ


class IsolatedApp:
    """Wrap a WSGI app so each request runs in a fresh copy of the context.

    :param end: the adapter's end of the request (it defers the response's
        ``close()`` until the request's children have ended, and settles the
        body), run in the request's context when the response is closed or
        the app call raised; by default the response is closed at once.
    """

    def __init__(self, app: WSGIApp, end: EndHook | None = None) -> None:
        self.app = app
        self.end = end

    def __call__(self, environ: dict[str, t.Any], start_response: StartResponse) -> t.Iterable[bytes]:
        ctx = copy_context()
        environ = own_environ(environ)
        try:
            result = ctx.run(self.app, environ, start_response)
        except BaseException:
            if self.end is not None:
                ctx.run(self.end, environ, None)
            raise
        return IsolatedIterable(ctx, result, environ, self.end)


class IsolatedIterable:
    """A response iterable iterated and closed in its request's context."""

    def __init__(
        self,
        ctx: Context,
        result: t.Iterable[bytes] | None,
        environ: dict[str, t.Any],
        hook: EndHook | None = None,
    ) -> None:
        self._ctx = ctx
        self._result = result
        self._environ = environ
        self._hook = hook

    def __iter__(self) -> t.Iterator[bytes]:
        if self._result is None:
            return
        run = self._ctx.run
        iterator = run(iter, self._result)
        while True:
            try:
                chunk = run(next, iterator)
            except StopIteration:
                return
            yield chunk

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if self._hook is not None:
            self._ctx.run(self._hook, self._environ, close)
        elif close is not None:
            self._ctx.run(close)
