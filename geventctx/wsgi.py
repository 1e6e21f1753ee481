"""WSGI middleware: a request scope for any WSGI application.

.. code-block:: python

    from geventctx.wsgi import ContextMiddleware

    application = ContextMiddleware(application)

For plain Werkzeug apps (``Request.application``) and frameworks without a
Flask-style context, the middleware gives each request what the Flask
extension gives a Flask request:

- a request scope, entered while the app runs and while its response is
  iterated, so ``geventctx.spawn`` and the pools pin the request;
- ``wsgi.input`` behind the request's shared body (:mod:`geventctx.body`):
  read off the socket once, as readers ask, into a spool; every greenlet
  and thread task reads it through its own position as it arrives and gets
  the complete body; what children may still read after the response is
  captured after the response was written, never before;
- its own ``contextvars`` context (and, under uWSGI, its own environ), so
  nothing a request sets bleeds into the next one on a keep-alive
  connection;
- "response started" tracking (:attr:`Scope.response_started` once the app
  called ``start_response``);
- the response iterable's ``close()`` — WSGI's end-of-request hook, where
  frameworks put their teardown — deferred until every child handed the
  request's context has ended, and run exactly once. Streaming responses
  keep streaming: only ``close()`` waits.

It can sit around a Flask app that also has
:class:`geventctx.flask.GeventContext`: Flask's request then nests inside the
middleware's, sharing its body, and each layer tears down once.

.. versionadded:: 0.1
"""

from __future__ import annotations

import typing as t
from contextvars import Token

from . import errorlog, stragglers
from .body import BODY_MODES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, has_body, share_wsgi_input
from .isolation import IsolatedApp
from .request_end import after_response, owner_ended, response_closed
from .scope import ENVIRON_SCOPE, Scope

__all__ = ["ContextMiddleware"]

StartResponse = t.Callable[..., t.Any]
WSGIApp = t.Callable[[t.Dict[str, t.Any], StartResponse], t.Iterable[bytes]]


class ContextMiddleware:
    """Manage each request of ``app`` as a geventctx request scope.

    :param body: ``"tee"`` (default; ``"lock"`` is its old name) puts
        ``wsgi.input`` behind the shared body; ``"off"`` leaves it alone.
    :param body_memory_limit: bytes of a body kept in memory; the rest is
        spooled to an unnamed temporary file.
    :param body_timeout: seconds a body read may wait without a byte
        arriving (then :class:`~geventctx.BodyTimeout`, 408, for every
        reader); ``None`` or ``0``: for ever.
    :param body_spool_dir: directory of the spool files (system default).
    :param max_content_length: largest body readers may get, in bytes
        (``RequestEntityTooLarge`` beyond), or ``None``.
    :param straggler_timeout: seconds after the response after which live
        children are logged with their spawn site; ``None`` or ``0``: never.
    :param straggler_policy: ``"wait"`` or ``"kill"``, as for Flask.
    :param log_child_errors: log children's exceptions once through
        ``logging.getLogger("geventctx")`` with the request and spawn site.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        body: str = "tee",
        max_content_length: int | None = None,
        body_memory_limit: int = DEFAULT_MEMORY_LIMIT,
        body_timeout: float | None = DEFAULT_TIMEOUT,
        body_spool_dir: str | None = None,
        straggler_timeout: float | None = 30.0,
        straggler_policy: str = "wait",
        log_child_errors: bool = True,
    ) -> None:
        if body not in ("tee", "lock", "off"):
            raise ValueError(f"body must be 'tee' or 'off', not {body!r} (of {BODY_MODES})")
        if straggler_policy not in stragglers.POLICIES:
            raise ValueError(f"straggler_policy must be one of {stragglers.POLICIES}, not {straggler_policy!r}")
        self.app = app
        self.body = body
        self.max_content_length = max_content_length
        self.body_memory_limit = body_memory_limit
        self.body_timeout = body_timeout
        self.body_spool_dir = body_spool_dir
        self.straggler_timeout = straggler_timeout
        self.straggler_policy = straggler_policy
        self.log_child_errors = log_child_errors

    def __call__(self, environ: dict[str, t.Any], start_response: StartResponse) -> t.Iterable[bytes]:
        if isinstance(environ.get(ENVIRON_SCOPE), Scope):
            # Another ContextMiddleware already manages this request.
            return self.app(environ, start_response)
        # The whole request (call, iteration, close) runs in a context of its
        # own: nothing it sets bleeds into the next request on the connection.
        return IsolatedApp(self._manage, after=after_response)(environ, start_response)

    def _manage(self, environ: dict[str, t.Any], start_response: StartResponse) -> t.Iterable[bytes]:
        scope = Scope(f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}")
        environ[ENVIRON_SCOPE] = scope
        if self.body != "off" and has_body(environ):
            limit = self.max_content_length
            share_wsgi_input(
                environ,
                lambda: limit,
                memory_limit=self.body_memory_limit,
                timeout=self.body_timeout,
                directory=self.body_spool_dir,
                scope=scope,
            )
        if self.log_child_errors:
            errorlog.install()
        else:
            scope.extras[errorlog.OPT_OUT] = True

        def tracking_start_response(*args: t.Any, **kwargs: t.Any) -> t.Any:
            scope.response_started = True
            return start_response(*args, **kwargs)

        token = scope.enter()
        try:
            result = self.app(environ, tracking_start_response)
        except BaseException:
            _RequestEnd(self, scope, token, None, environ).close()
            raise
        return _RequestEnd(self, scope, token, result, environ)

    def own_end(self, environ: dict[str, t.Any]) -> None:
        """The request's own part is over (the server's ``close()``, or the
        app call raised): called first, in the request's greenlet and
        Context, before the rest of its end waits for the children. Does
        nothing; an adapter on top of the middleware (the Django one)
        releases here what only the request's own greenlet can release.

        .. versionadded:: 0.2
        """


class _RequestEnd:
    """The app's response iterable, whose ``close()`` waits for the children."""

    def __init__(
        self,
        owner: ContextMiddleware,
        scope: Scope,
        token: Token[Scope | None],
        result: t.Iterable[bytes] | None,
        environ: dict[str, t.Any],
    ) -> None:
        self._owner = owner
        self._environ = environ
        self._scope = scope
        self._token: Token[Scope | None] | None = token
        self._result = result

    def __iter__(self) -> t.Iterator[bytes]:
        assert self._result is not None
        return iter(self._result)

    def close(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return  # WSGI servers call close() once; be safe anyway
        try:
            self._owner.own_end(self._environ)
        finally:
            self._end(token)

    def _end(self, token: Token[Scope | None]) -> None:
        scope = self._scope
        close = getattr(self._result, "close", None)
        # The one end path (geventctx.request_end), as the Flask extension's.
        try:
            owner_ended(scope, token, self._owner.straggler_timeout, self._owner.straggler_policy)
        finally:
            # The response was written: capture the body children may still
            # read, then leave the server's input in step (or close it).
            response_closed(scope, self._environ, close)
