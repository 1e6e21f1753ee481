"""The Flask extension: a request scope per request, wired to Flask's lifecycle.

.. code-block:: python

    from geventctx.flask import GeventContext

    app = Flask(__name__)
    GeventContext(app)          # or: ext = GeventContext(); ext.init_app(app)

With the extension, a child handed a request's context (``geventctx.spawn``,
the pools, the executor):

- sees the parent's ``request``, ``session``, ``g`` and ``current_app``
  objects, not copies (G3);
- delays ``teardown_request``, ``request.close()`` and
  ``teardown_appcontext`` until it ends; they run once, in Flask's order,
  with the view's exception, seeing ``request`` and ``g`` (G4). The response
  is not delayed;
- reads the same body as everyone else (G5), and is warned when it changes
  the session, or calls ``after_this_request``, too late (G6, G7);
- has its exception logged once with the request and spawn site (G11).

Configuration (``app.config``), with defaults:

``GEVENTCTX_BODY = "tee"``
    ``"tee"``: the body is read off the socket once, as consumers ask for
    it, into a spool; every consumer in every greenlet and thread task reads
    it through its own cursor as it arrives and gets the complete, identical
    body (``"lock"`` is the old name of this mode). ``"buffer"``: the same,
    and the parent reads the whole body at its first hand-off if
    ``Content-Length`` is at most ``GEVENTCTX_BODY_BUFFER_LIMIT``. ``"off"``:
    Werkzeug's own behaviour (streaming; unsafe to share).
``GEVENTCTX_BODY_BUFFER_LIMIT = 10 * 1024 * 1024``
    Largest body ``"buffer"`` reads eagerly, in bytes.
``GEVENTCTX_BODY_MEMORY_LIMIT = 1024 * 1024``
    Bytes of a body kept in memory; the rest is spooled to an unnamed
    temporary file, freed at teardown.
``GEVENTCTX_BODY_TIMEOUT = 30.0``
    Seconds a body read may wait without a byte arriving; then every reader
    gets :class:`~geventctx.BodyTimeout` (408) and the connection is closed
    after the response. ``None`` or ``0``: wait for ever.
``GEVENTCTX_BODY_SPOOL_DIR = None``
    Directory of the spool files (``None``: the system's temporary directory).
``GEVENTCTX_SESSION_AFTER_RESPONSE = "warn"``
    A session change after the session was saved: ``"warn"``
    (:class:`~geventctx.SessionMutationWarning` at the changing line),
    ``"error"`` (raise :class:`~geventctx.SessionMutationError`) or
    ``"ignore"``.
``GEVENTCTX_LATE_EFFECTS = "warn"``
    ``after_this_request`` after the response was processed: ``"warn"``
    (:class:`~geventctx.LateEffectWarning`), ``"error"`` or ``"ignore"``.
``GEVENTCTX_STRAGGLER_TIMEOUT = 30.0``
    Seconds after the response after which children still running are
    logged with their spawn site; ``None`` or ``0`` turns it off.
``GEVENTCTX_STRAGGLER_POLICY = "wait"``
    What happens to stragglers after they were logged: ``"wait"`` (teardown
    keeps waiting for them) or ``"kill"``.
``GEVENTCTX_LOG_CHILD_ERRORS = True``
    Log request children's exceptions through ``logging.getLogger("geventctx")``
    instead of gevent's stderr printing.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import typing as t
import warnings

from flask import Flask
from flask.globals import _cv_app, _cv_request
from flask.sessions import SessionInterface
from flask.signals import request_finished, request_started
from gevent import get_hub
from gevent.monkey import get_original
from werkzeug.datastructures import CallbackDict

from . import errorlog, stragglers
from ._site import _INTERNAL_DIRS, Site, package_dirs, site_of
from .body import (
    BODY_MODES,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIMEOUT,
    ENVIRON_BODY,
    SharedBody,
    end_of_response,
    has_body,
    share_wsgi_input,
)
from .errors import LateEffectWarning, SessionMutationError, SessionMutationWarning
from .isolation import IsolatedApp
from .request import ENVIRON_BODY_PLAN, SharedBodyRequest, shared_body_request_class
from .scope import ENVIRON_SCOPE, Scope

__all__ = ["GeventContext", "DEFAULTS"]

_get_ident = get_original("_thread", "get_ident")

#: Every configuration key and its default.
DEFAULTS: dict[str, t.Any] = {
    "GEVENTCTX_BODY": "tee",
    "GEVENTCTX_BODY_BUFFER_LIMIT": 10 * 1024 * 1024,
    "GEVENTCTX_BODY_MEMORY_LIMIT": DEFAULT_MEMORY_LIMIT,
    "GEVENTCTX_BODY_TIMEOUT": DEFAULT_TIMEOUT,
    "GEVENTCTX_BODY_SPOOL_DIR": None,
    "GEVENTCTX_SESSION_AFTER_RESPONSE": "warn",
    "GEVENTCTX_LATE_EFFECTS": "warn",
    "GEVENTCTX_STRAGGLER_TIMEOUT": 30.0,
    "GEVENTCTX_STRAGGLER_POLICY": "wait",
    "GEVENTCTX_LOG_CHILD_ERRORS": True,
}
_POLICIES = ("warn", "error", "ignore")


_sentinel: t.Any = object()


# -- Flask internals, in one place --------------------------------------------
# Flask 2.3-3.1 keep a RequestContext and an AppContext in two context
# variables; the request context remembers the app context it pushed. Flask
# 3.2 merges the two: only these helpers should need to change.


def _request_ctx() -> t.Any:
    return _cv_request.get(None)


def _app_ctx() -> t.Any:
    return _cv_app.get(None)


def _app_ctx_pushed_by(ctx: t.Any) -> t.Any:
    """The app context ``ctx`` pushed for itself (None if one was active)."""
    tokens = getattr(ctx, "_cv_tokens", None)
    return tokens[-1][1] if tokens else None


def _in_contexts(app_ctx: t.Any, req_ctx: t.Any, function: t.Callable[..., t.Any], *args: t.Any) -> None:
    """``function(*args)`` with the request's contexts current, as Flask runs
    teardown: a deferred step runs after Flask popped them. The variables are
    set and reset in the running Context (the request's own)."""
    if _cv_request.get(None) is req_ctx:
        function(*args)
        return
    app_token = _cv_app.set(app_ctx) if app_ctx is not None else None
    req_token = _cv_request.set(req_ctx)
    try:
        function(*args)
    finally:
        _cv_request.reset(req_token)
        if app_token is not None:
            _cv_app.reset(app_token)


def _stream_generator_code() -> t.Any:
    from flask import helpers

    for const in helpers.stream_with_context.__code__.co_consts:
        if getattr(const, "co_name", None) == "generator":
            return const
    return None


#: The code of the generator ``stream_with_context`` wraps a stream in.
_STREAM_CODE = _stream_generator_code()


def _stream_of(response: t.Any) -> t.Any:
    """The ``stream_with_context`` generator of ``response``, or ``None``."""
    stream = getattr(response, "response", None)
    if _STREAM_CODE is not None and getattr(stream, "gi_code", None) is _STREAM_CODE:
        return stream
    return None


def _stream_pending(response: t.Any) -> bool:
    """True if ``response`` streams with context and its generator has not
    run yet: Flask 3.1.2-3.1.3 push the contexts again only when the stream
    starts, after the view's pop (earlier and later versions push them in
    the view, so the view's pop is not their last)."""
    stream = _stream_of(response)
    return stream is not None and stream.gi_frame is not None and not stream.gi_running


def _stream_popping(response: t.Any) -> bool:
    """True while ``response``'s ``stream_with_context`` generator runs: a
    teardown call now comes from its own pop of the contexts."""
    stream = _stream_of(response)
    return stream is not None and stream.gi_running


# -- warnings at the user's line -------------------------------------------------


def _user_site() -> Site | None:
    skip = _INTERNAL_DIRS + package_dirs("flask", "werkzeug")
    return site_of(sys._getframe(2), skip)


def _late(policy: str, category: type[Warning], message: str, site: Site | None) -> None:
    if policy == "ignore":
        return
    if policy == "error":
        raise (SessionMutationError if category is SessionMutationWarning else RuntimeError)(message)
    if site is None:
        warnings.warn(message, category, stacklevel=3)
    else:
        warnings.warn_explicit(message, category, site[0], site[1])


# -- per-request guards ----------------------------------------------------------


class _AfterRequestList(list):  # type: ignore[type-arg]
    """``ctx._after_request_functions`` that notices appends made too late."""

    sealed = False
    policy = "warn"
    label = ""

    def append(self, function: t.Any) -> None:
        if self.sealed:
            name = getattr(function, "__qualname__", function)
            _late(
                self.policy,
                LateEffectWarning,
                f"after_this_request({name}) was called after the response of "
                f"{self.label} was processed: it will never run",
                _user_site(),
            )
        super().append(function)


def _seal_session(session: t.Any, scope: Scope, policy: str) -> None:
    """From now on, a change to ``session`` cannot reach the client."""
    if policy == "ignore" or scope.extras.get("session_sealed"):
        return
    scope.extras["session_sealed"] = True
    message = (
        f"the session of {scope.label} was changed after it was saved in the response; "
        "the change is lost (change it before the view returns, or store it elsewhere)"
    )
    if isinstance(session, CallbackDict):
        before = session.on_update

        def on_update(changed: t.Any) -> None:
            if before is not None:
                before(changed)
            _late(policy, SessionMutationWarning, message, _user_site())

        session.on_update = on_update
    else:
        # Not a CallbackDict: compare at teardown, when every child is done.
        saved = dict(session)

        def compare() -> None:
            if dict(session) != saved:
                _late(policy, SessionMutationWarning, message + " (noticed at teardown)", None)

        scope.on_close(compare)


class _GuardedSessionInterface(SessionInterface):
    """Delegates to the app's session interface; seals the session once saved."""

    def __init__(self, inner: SessionInterface) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self.inner, name)

    def make_null_session(self, app: Flask) -> t.Any:
        return self.inner.make_null_session(app)

    def is_null_session(self, obj: object) -> bool:
        return self.inner.is_null_session(obj)

    def open_session(self, app: Flask, request: t.Any) -> t.Any:
        return self.inner.open_session(app, request)

    def save_session(self, app: Flask, session: t.Any, response: t.Any) -> None:
        self.inner.save_session(app, session, response)
        ctx = _request_ctx()
        scope = getattr(ctx, "_geventctx_scope", None)
        if scope is not None:
            _seal_session(session, scope, app.config["GEVENTCTX_SESSION_AFTER_RESPONSE"])


# -- the extension ---------------------------------------------------------------


class GeventContext:
    """Manage each request of a Flask app as a geventctx request scope.

    .. versionadded:: 0.1
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register with ``app``: config defaults, signals and teardown deferral."""
        if "geventctx" in app.extensions:
            return
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        _check_config(app.config)
        app.extensions["geventctx"] = self
        app.extensions[_PLAN_KEY] = _BodyPlan(app.config)
        request_started.connect(self._request_started, app, weak=False)
        request_finished.connect(self._request_finished, app, weak=False)
        # Flask calls these on the app during RequestContext/AppContext.pop;
        # instance attributes let us defer them for this app only.
        original_request = app.do_teardown_request
        original_appctx = app.do_teardown_appcontext
        app.do_teardown_request = lambda exc=_sentinel: self._teardown_request(original_request, exc)  # type: ignore[method-assign]
        app.do_teardown_appcontext = lambda exc=_sentinel: self._teardown_appctx(original_appctx, exc)  # type: ignore[method-assign]
        if not isinstance(app.session_interface, _GuardedSessionInterface):
            app.session_interface = _GuardedSessionInterface(app.session_interface)
        # Each request in a context of its own: a contextvar one request sets
        # must not reach the next request on a keep-alive connection (G2).
        # The response iterable's close() (Werkzeug's call_on_close hooks) is
        # the last step of a request's teardown: it waits for the children
        # too (G4).
        app.wsgi_app = IsolatedApp(app.wsgi_app, _end_of_request)  # type: ignore[method-assign]
        # Every body consumer of the app's requests reads the shared body
        # (made at the first read or hand-off, never before).
        app.request_class = shared_body_request_class(app.request_class)

    # -- request start ----------------------------------------------------------

    def _request_started(self, app: Flask, **_: t.Any) -> None:
        ctx = _request_ctx()
        if ctx is None or getattr(ctx, "_geventctx_scope", None) is not None:
            return
        config = app.config
        request = ctx.request
        environ = request.environ
        scope = Scope(f"{request.method} {request.path}")
        outer = environ.get(ENVIRON_SCOPE)
        if isinstance(outer, Scope):
            scope.hold_parent(outer)  # the WSGI middleware's request
        ctx._geventctx_scope = scope
        environ[_ENVIRON_FLASK_SCOPE] = scope
        scope.extras["token"] = scope.enter()
        app_ctx = _app_ctx_pushed_by(ctx)
        if app_ctx is not None:
            app_ctx._geventctx_scope = scope
        # A deferred teardown step runs with these current again.
        scope.extras["contexts"] = (_app_ctx(), ctx)
        scope.extras["config"] = config

        mode = config["GEVENTCTX_BODY"]
        if mode != "off" and has_body(environ):
            if not isinstance(request, SharedBodyRequest):
                # app.request_class was replaced after init_app.
                request.__class__ = shared_body_request_class(type(request))
            if ENVIRON_BODY in environ:
                # The WSGI middleware shares it already: add Flask's limit.
                share_wsgi_input(environ, lambda: request.max_content_length)
            else:
                environ[ENVIRON_BODY_PLAN] = app.extensions[_PLAN_KEY]
                # The body may be made in a thread later; its socket is this hub's.
                environ[_ENVIRON_OWNER] = (get_hub(), _get_ident())
            eager = mode == "buffer"
            limit = config["GEVENTCTX_BODY_BUFFER_LIMIT"]

            def share_at_first_handoff() -> None:
                # wsgi.input goes behind the shared body too, for children
                # that read the environ directly; "buffer" reads it now.
                scope.on_handoff = None
                body = request.shared_body()
                if eager and body is not None and body.length is not None and body.length <= limit:
                    try:
                        body.read_whole()
                    except Exception:
                        pass  # kept for the readers

            scope.on_handoff = share_at_first_handoff

        late = _AfterRequestList(ctx._after_request_functions)
        late.policy = config["GEVENTCTX_LATE_EFFECTS"]
        late.label = scope.label
        ctx._after_request_functions = late
        scope.extras["after_request"] = late

        close = getattr(request, "close", None)
        if close is not None:
            # Flask calls it with the request context still pushed; a deferred
            # close must see it too (request, g), like teardown functions.
            deferred: list[bool] = []

            def deferred_close() -> None:
                # Flask's pop calls it; so does the pop of every copy made by
                # copy_current_request_context (same request object). Close
                # once, when the scope closes.
                if not deferred:
                    deferred.append(True)
                    contexts = scope.extras["contexts"]
                    scope.defer(_in_contexts, contexts[0], contexts[1], close)

            request.close = deferred_close

        if config["GEVENTCTX_LOG_CHILD_ERRORS"]:
            errorlog.install()
        else:
            scope.extras[errorlog.OPT_OUT] = True

    def _request_finished(self, app: Flask, response: t.Any = None, **_: t.Any) -> None:
        scope = getattr(_request_ctx(), "_geventctx_scope", None)
        if scope is not None:
            scope.response_started = True
            scope.extras["after_request"].sealed = True
            scope.extras["response"] = response

    # -- teardown, deferred until the last child ends -------------------------------
    #
    # The rule: Flask's teardown calls for a managed request become steps of
    # its scope, deferred once each (teardown_request, request.close(),
    # teardown_appcontext; then the response's close()), run in Flask's
    # order when the request and its children are done. The request itself
    # ends at Flask's last pop of its contexts — for a stream_with_context
    # response at the stream's end — or at the latest when the response is
    # closed. A call that comes from the stream's own pop is not run again
    # (Flask 3.1.2-3.1.3 would run teardown twice); a call after the
    # request's teardown ran (the test client popping the contexts it
    # preserved, at the end of ``with client:``) runs, as without geventctx.

    def _teardown_request(self, original: t.Callable[[t.Any], None], exc: t.Any) -> None:
        ctx = _request_ctx()
        scope: Scope | None = getattr(ctx, "_geventctx_scope", None)
        if scope is None:
            original(exc)
            return
        if exc is _sentinel:
            exc = sys.exc_info()[1]
        state = scope.extras
        response = state.get("response")
        if "teardown_request" not in state:
            state["teardown_request"] = True
            state["after_request"].sealed = True
            body = ctx.request.environ.get(ENVIRON_BODY)
            if isinstance(body, SharedBody):
                # request.max_content_length needs the request's context,
                # which a capture after the response no longer has.
                body.settle_limits()
            app_ctx, req_ctx = state["contexts"]
            scope.defer(_in_contexts, app_ctx, req_ctx, original, exc)
            if _stream_pending(response):
                return  # the stream continues the request: it ends there
        elif scope.owner_done and not _stream_popping(response):
            original(exc)  # Flask's own repeat, after the request's teardown ran
            return
        if not scope.owner_done:
            _end_owner(scope, ctx.app.config)

    def _teardown_appctx(self, original: t.Callable[[t.Any], None], exc: t.Any) -> None:
        app_ctx = _app_ctx()
        scope: Scope | None = getattr(app_ctx, "_geventctx_scope", None)
        if scope is None:
            original(exc)
            return
        if exc is _sentinel:
            exc = sys.exc_info()[1]
        state = scope.extras
        if "teardown_appcontext" not in state:
            state["teardown_appcontext"] = True
            contexts = state["contexts"]
            scope.defer(_in_contexts, contexts[0], contexts[1], original, exc)
        elif not _stream_popping(state.get("response")) and scope.done:
            original(exc)  # Flask's own repeat, after the request's teardown ran


def _end_owner(scope: Scope, config: t.Mapping[str, t.Any]) -> None:
    """The request itself is done (in its own Context): watch the children
    that outlive it, release its hold (with no child, the teardown steps run
    now) and leave the scope."""
    stragglers.outliving_response(scope, config["GEVENTCTX_STRAGGLER_TIMEOUT"], config["GEVENTCTX_STRAGGLER_POLICY"])
    token = scope.extras.pop("token", None)
    try:
        scope.finish()
    finally:
        if token is not None:
            Scope.exit(token)


_ENVIRON_FLASK_SCOPE = "geventctx.flask.scope"


def _end_of_request(environ: dict[str, t.Any], close: t.Callable[[], t.Any] | None) -> None:
    # The response was written and is being closed (or the app call raised).
    # Its close() (Werkzeug's call_on_close hooks) comes after
    # teardown_request, request.close() and teardown_appcontext, which were
    # deferred when Flask popped the request context. Then the body: what
    # children may still read is captured now, never before the response.
    scope: Scope | None = environ.get(_ENVIRON_FLASK_SCOPE)
    if scope is None:
        if close is not None:
            close()
        return
    if not scope.owner_done:
        # A stream_with_context response closed before it ran: the request
        # ends with its response.
        _end_owner(scope, scope.extras["config"])
    if close is not None:
        scope.defer(close)
    end_of_response(environ, scope)


class _BodyPlan:
    """How an app's managed request makes its shared body, at its first read
    or hand-off (kept once per app: it holds the app's config, not the app)."""

    __slots__ = ("config",)

    def __init__(self, config: t.Mapping[str, t.Any]) -> None:
        self.config = config

    def __call__(self, environ: dict[str, t.Any], request: t.Any) -> SharedBody:
        config = self.config
        return share_wsgi_input(
            environ,
            lambda: request.max_content_length,
            memory_limit=config["GEVENTCTX_BODY_MEMORY_LIMIT"],
            timeout=config["GEVENTCTX_BODY_TIMEOUT"],
            directory=config["GEVENTCTX_BODY_SPOOL_DIR"],
            scope=environ.get(_ENVIRON_FLASK_SCOPE),
            owner=environ.get(_ENVIRON_OWNER),
        )


_PLAN_KEY = "geventctx.body_plan"
_ENVIRON_OWNER = "geventctx.body_owner"


def _check_config(config: t.Mapping[str, t.Any]) -> None:
    checks = {
        "GEVENTCTX_BODY": BODY_MODES,
        "GEVENTCTX_SESSION_AFTER_RESPONSE": _POLICIES,
        "GEVENTCTX_LATE_EFFECTS": _POLICIES,
        "GEVENTCTX_STRAGGLER_POLICY": stragglers.POLICIES,
    }
    for key, allowed in checks.items():
        if config[key] not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, not {config[key]!r}")
