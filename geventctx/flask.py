"""The Flask extension: a request scope per request, wired to Flask's lifecycle.

.. code-block:: python

    from geventctx.flask import GeventContext

    app = Flask(__name__)
    GeventContext(app)          # or: ext = GeventContext(); ext.init_app(app)

With the extension, a child handed a request's context (``geventctx.spawn``,
the pools, the executor):

- sees the parent's ``request``, ``session`` and ``current_app`` objects,
  not copies, in an app context of its own whose ``g`` reads through to
  the view's (G3; :mod:`geventctx._flask_appcontext` states the rule);
- has its own app context torn down when it ends, and delays the request's
  ``teardown_request``, ``request.close()`` and ``teardown_appcontext``
  until it ends; they run once, in Flask's order, with the view's
  exception, seeing ``request`` and ``g`` (G4). The response is not delayed;
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
    ``after_this_request`` after Flask ran the request's after-request
    functions (it would never run): ``"warn"``
    (:class:`~geventctx.LateEffectWarning` at the calling line), ``"error"``
    (raise ``RuntimeError`` there) or ``"ignore"``.
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
import weakref

try:
    from flask import Flask
    from flask.signals import request_finished, request_started
except ImportError as exc:  # pragma: no cover - depends on the environment
    # The adapter is the only part that needs Flask (DESIGN: framework imports
    # stay in their adapter); say which extra brings it.
    raise ImportError("geventctx.flask needs Flask: pip install 'geventctx[flask]'", name=exc.name) from exc
from gevent import get_hub
from gevent.monkey import get_original
from greenlet import getcurrent
from werkzeug.datastructures import CallbackDict

from . import _flask_compat as compat
from . import _greenlet_locals, errorlog, stragglers
from ._flask_appcontext import fork_g, forked_g, unfork_g
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
from .errors import LateEffectWarning, MisuseWarning, SessionMutationError, SessionMutationWarning
from .isolation import ENVIRON_CONTEXT, IsolatedApp, RequestContext
from .request import ENVIRON_BODY_PLAN, ENVIRON_CLOSE_HOOK, SharedBodyRequest, shared_body_request_class
from .scope import ENVIRON_SCOPE, Scope

__all__ = ["GeventContext", "DEFAULTS", "fork_g", "unfork_g", "forked_g"]

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
    """``ctx._after_request_functions`` that notices appends made too late.

    The rule: a function appended after Flask stopped reading the list can
    never run, so the list is sealed where Flask stops reading it — when
    ``process_response``'s loop takes past its last item (Flask 2.3 to
    main read it in that one loop). What runs after the loop and may yield
    (the app's ``after_request`` functions, ``save_session``, a
    ``request_finished`` receiver) then finds it sealed. Two later seals back
    this one up for a ``process_response`` that does not iterate the list:
    ``request_finished``, and teardown (the only one when the view raised
    with ``PROPAGATE_EXCEPTIONS``). The loop reads by index, as a list
    iterator does: a function appended while it runs (by an after-request
    function, or a child meanwhile) still runs.

    .. versionchanged:: 0.2
       Sealed at the end of Flask's loop, not at ``request_finished``: an
       ``after_this_request`` in between was silently dropped.
    """

    sealed = False
    policy = "warn"
    label = ""

    def __iter__(self) -> t.Iterator[t.Any]:
        index = 0
        while index < len(self):
            yield self[index]
            index += 1
        self.sealed = True

    def append(self, function: t.Any) -> None:
        if self.sealed:
            name = getattr(function, "__qualname__", function)
            _late(
                self.policy,
                LateEffectWarning,
                f"after_this_request({name}) was called after Flask ran the "
                f"after-request functions of {self.label}: it will never run",
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
        _connect_signals()
        # The rule for what init_app puts on the app: nothing that refers
        # back to the app strongly (an app dropped is freed at once, as Flask
        # promises), and nothing per request. Flask calls these two during
        # the contexts' pop; instance attributes defer them for this app.
        app.do_teardown_request = _Teardown(app, "do_teardown_request")  # type: ignore[method-assign]
        app.do_teardown_appcontext = _Teardown(app, "do_teardown_appcontext")  # type: ignore[method-assign]
        # Each request in a Context of its own (G2, and the Context rule of
        # geventctx.isolation); the response's close() (Werkzeug's
        # call_on_close hooks) is the last step of its teardown, after the
        # children (G4).
        app.wsgi_app = IsolatedApp(_weakly_bound(app, app.wsgi_app), _end_of_request)  # type: ignore[method-assign]
        # Every body consumer of the app's requests reads the shared body
        # (made at the first read or hand-off, never before).
        app.request_class = shared_body_request_class(app.request_class)

    # -- request start ----------------------------------------------------------

    def _request_started(self, app: Flask) -> None:
        ctx = compat.request_ctx()
        if ctx is None or getattr(ctx, "_geventctx_scope", None) is not None:
            return
        config = app.config
        request = ctx.request
        environ = request.environ
        home = environ.get(ENVIRON_CONTEXT)  # the request's, made by IsolatedApp
        if not isinstance(home, RequestContext) or home.context is not getcurrent().gr_context:
            home = None
        scope = Scope(f"{request.method} {request.path}", home)
        outer = environ.get(ENVIRON_SCOPE)
        if isinstance(outer, Scope):
            scope.hold_parent(outer)  # the WSGI middleware's request
        ctx._geventctx_scope = scope
        environ[_ENVIRON_FLASK_SCOPE] = scope
        scope.extras["token"] = scope.enter()
        app_ctx = compat.app_ctx_of_request(ctx)
        if app_ctx is not None:
            app_ctx._geventctx_scope = scope
        else:
            # An app context was active already: Flask's pop of the request
            # ends with request.close().
            _end_of(scope).last = "request_close"
        # A deferred teardown step runs with these current again.
        scope.extras["contexts"] = compat.contexts(ctx)
        scope.extras["config"] = config

        mode = config["GEVENTCTX_BODY"]
        if mode != "off" and has_body(environ):
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

        late = _AfterRequestList(compat.after_request_functions(ctx))
        late.policy = config["GEVENTCTX_LATE_EFFECTS"]
        late.label = scope.label
        compat.set_after_request_functions(ctx, late)
        scope.extras["after_request"] = late

        if not isinstance(request, SharedBodyRequest):
            # app.request_class was replaced after init_app.
            request.__class__ = shared_body_request_class(type(request))
        # request.close() (Flask calls it in its pop) waits for the children.
        environ[ENVIRON_CLOSE_HOOK] = _defer_request_close

        if config["GEVENTCTX_LOG_CHILD_ERRORS"]:
            errorlog.install()
        else:
            scope.extras[errorlog.OPT_OUT] = True

    def _request_finished(self, app: Flask, response: t.Any) -> None:
        ctx = compat.request_ctx()
        scope = getattr(ctx, "_geventctx_scope", None)
        if scope is None:
            return
        scope.response_started = True
        scope.extras["after_request"].sealed = True
        scope.extras["response"] = response
        stream = compat.stream_of(response)
        if stream is not None:
            _end_of(scope).stream = weakref.ref(stream)
        # Flask saved the session just now (process_response, unless it is
        # a null session), whatever the app's session interface is: from
        # here on a change cannot reach the client (G6).
        session = compat.session_if_open(ctx)
        if session is not None and not app.session_interface.is_null_session(session):
            _seal_session(session, scope, app.config["GEVENTCTX_SESSION_AFTER_RESPONSE"])

    # -- teardown, deferred until the last child ends -------------------------------
    #
    # The rule: Flask's teardown calls for a managed request become steps of
    # its scope (teardown_request, request.close(), teardown_appcontext;
    # then the response's close()), taken over once each and run in Flask's
    # order when the request and its children are done, with the exception
    # Flask settled on. A call made while nothing waits (no child holds the
    # request, no step is deferred, no stream is still to run) is Flask's
    # own, in place: what most requests pay is one check per call. The request itself ends at the last teardown call of
    # Flask's last pop of its contexts (teardown_appcontext of the app
    # context it pushed, else request.close()) — for a stream_with_context
    # response at the stream's end — or at the latest when the response is
    # closed. A call from the stream's own pop is the same end (Flask
    # 3.1.2-3.1.3 would run teardown twice): it only hands over the stream's
    # exception. Any other repeat — the test client popping the contexts it
    # preserved, at the end of ``with client:`` — runs as without geventctx,
    # after the request's own teardown.

    def _teardown_request(
        self, app: Flask, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> None:
        ctx, exc = compat.teardown_call(args, kwargs)
        if ctx is None:
            ctx = compat.request_ctx()
        scope: Scope | None = getattr(ctx, "_geventctx_scope", None)
        if scope is None:
            original(*args, **kwargs)  # not a managed request: Flask's own call
            return
        if not scope.done and "teardown_request" not in _end_of(scope).steps:
            scope.extras["after_request"].sealed = True
            body = ctx.request.environ.get(ENVIRON_BODY)
            if isinstance(body, SharedBody):
                # request.max_content_length needs the request's context,
                # which a capture after the response no longer has.
                body.settle_limits()
        _take_over(scope, "teardown_request", original, args, kwargs, exc)

    def _teardown_appctx(
        self, app: Flask, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> None:
        ctx, exc = compat.teardown_call(args, kwargs)
        app_ctx = ctx if ctx is not None else compat.app_ctx()
        scope: Scope | None = getattr(app_ctx, "_geventctx_scope", None)
        if scope is None:
            original(*args, **kwargs)
            return
        _take_over(scope, "teardown_appcontext", original, args, kwargs, exc)


class _Step:
    """One teardown call of Flask's, deferred: run once, in the request's
    contexts, with the exception it settled on (a stream's pop may still
    hand over its own)."""

    __slots__ = ("saved", "function", "args", "exc", "ran")

    def __init__(self, saved: t.Any, function: t.Callable[..., t.Any], args: tuple[t.Any, ...], exc: t.Any) -> None:
        self.saved = saved
        self.function = function
        self.args = args
        self.exc = exc
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        try:
            compat.run_in_contexts(self.saved, self.function, *_with_exc(self.args, self.exc))
        finally:
            # Ran: keep nothing of the request (the scope's record of its
            # steps outlives it by a little: no reference cycle through it).
            self.saved = self.exc = None
            self.function = _ran
            self.args = ()


def _ran(*_: t.Any) -> None:
    """What a :class:`_Step` keeps of its function once it ran."""


#: The step of a teardown call that ran in place (see _nothing_to_wait_for).
_RAN_IN_PLACE = _Step(None, _ran, (), None)
_RAN_IN_PLACE.ran = True


def _take_over(
    scope: Scope, kind: str, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any],
    exc: t.Any,
) -> None:
    """A teardown call of ``kind`` for the managed request of ``scope``."""
    end = _end_of(scope)
    step = end.steps.get(kind)
    if step is None and scope.done:
        original(*args, **kwargs)  # the request's teardown ran: Flask's own call
        return
    if step is None and _nothing_to_wait_for(scope):
        # No child holds the request and no step waits: Flask's own call,
        # now, in place (what it raises reaches Flask's pop as without
        # geventctx). A hand-off it makes holds the request: the later
        # teardown calls then wait for it.
        end.steps[kind] = _RAN_IN_PLACE
        _run_in_place(scope, original, *args, **kwargs)
        if kind == end.last:
            _maybe_end_owner(scope)
        return
    if exc is compat.MISSING:
        exc = compat.exception_in_flight()
    if step is None:
        step = end.steps[kind] = _Step(scope.extras["contexts"], original, args, exc)
        scope.defer(step)
    elif end.stream_popping():
        if exc is not None and not step.ran:
            step.exc = exc  # the stream's exception: what teardown gets
    elif step.ran or scope.done:
        original(*args, **kwargs)  # Flask's own repeat, after the request's teardown ran
        return
    else:
        # Flask's own repeat before the request's teardown ran (children
        # still run): it runs after it.
        scope.defer(_Step(scope.extras["contexts"], original, args, exc))
    if kind == end.last:
        _maybe_end_owner(scope)


def _nothing_to_wait_for(scope: Scope) -> bool:
    """True if a teardown call of ``scope``'s request may run now, in place:
    nothing holds the request but the request itself, no deferred step
    waits, and no ``stream_with_context`` stream is still to run."""
    return scope.idle and not compat.stream_pending(scope.extras.get("response"))


def _run_in_place(scope: Scope, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> None:
    # What a step run in place raises is raised when the request ends,
    # after every later step ran (as for deferred steps: G4), not now
    # (Flask's pop would skip request.close()).
    try:
        function(*args, **kwargs)
    except BaseException as exc:
        scope.extras.setdefault(_IN_PLACE_ERROR, exc)


_IN_PLACE_ERROR = "in_place_error"


def _maybe_end_owner(scope: Scope) -> None:
    # The last teardown call of Flask's pop: the request itself is done,
    # unless its stream_with_context stream is still to run.
    if not scope.owner_done and not compat.stream_pending(scope.extras.get("response")):
        _end_owner(scope, scope.extras["config"])


def _with_exc(args: tuple[t.Any, ...], exc: t.Any) -> tuple[t.Any, ...]:
    """A teardown call's arguments with its exception settled: ``(exc,)``
    on Flask 2.3-3.1, ``(ctx, exc)`` on 3.2."""
    return (args[0], exc) if compat.MERGED else (exc,)


class _Teardown:
    """``app.do_teardown_request``/``do_teardown_appcontext`` of a managed
    app: defers Flask's own method (looked up on the app's class at each
    call, so subclass overrides count) for managed requests and calls it
    unchanged otherwise. Holds the app weakly: no reference cycle."""

    __slots__ = ("_app", "_name")

    def __init__(self, app: Flask, name: str) -> None:
        self._app = weakref.ref(app)
        self._name = name

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> None:
        app = self._app()
        if app is None:
            raise RuntimeError("the app of this teardown method is gone")
        original = getattr(type(app), self._name).__get__(app)
        ext = app.extensions.get("geventctx")
        if not isinstance(ext, GeventContext):
            original(*args, **kwargs)
        elif self._name == "do_teardown_request":
            ext._teardown_request(app, original, args, kwargs)
        else:
            ext._teardown_appctx(app, original, args, kwargs)


class _WeakWsgiApp:
    """``app.wsgi_app`` (the method of the app itself) without a strong
    reference to the app: what ``app.wsgi_app = IsolatedApp(...)`` keeps."""

    __slots__ = ("_app", "_function")

    def __init__(self, app: Flask, function: t.Callable[..., t.Any]) -> None:
        self._app = weakref.ref(app)
        self._function = function

    def __call__(self, environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        app = self._app()
        if app is None:
            raise RuntimeError("the Flask app of this WSGI callable is gone")
        return self._function(app, environ, start_response)


def _weakly_bound(app: Flask, wsgi_app: t.Any) -> t.Any:
    # The app's own bound method would make a cycle; a middleware the user
    # put there before us is kept as it is (its references are its own).
    if getattr(wsgi_app, "__self__", None) is app:
        return _WeakWsgiApp(app, wsgi_app.__func__)
    return wsgi_app


def _on_request_started(sender: t.Any, **_: t.Any) -> None:
    ext = getattr(sender, "extensions", {}).get("geventctx")
    if isinstance(ext, GeventContext):
        ext._request_started(sender)


def _on_request_finished(sender: t.Any, response: t.Any = None, **_: t.Any) -> None:
    ext = getattr(sender, "extensions", {}).get("geventctx")
    if isinstance(ext, GeventContext):
        ext._request_finished(sender, response)


def _connect_signals() -> None:
    # One receiver per signal for the process, whatever the number of apps
    # (blinker keeps module functions; they look the extension up on the
    # sender), so an app factory's apps leave nothing behind.
    request_started.connect(_on_request_started)
    request_finished.connect(_on_request_finished)


def _defer_request_close(request: t.Any) -> bool:
    """``request.close()`` of a managed request: a step of its scope, once
    for ever (Flask's pop calls it, and so does the pop of every copy made
    by ``copy_current_request_context``: the same request object)."""
    scope: Scope | None = request.environ.get(_ENVIRON_FLASK_SCOPE)
    state = request.__dict__
    if not state.get("_geventctx_close_deferred"):
        if scope is None or scope.done:
            return False
        state["_geventctx_close_deferred"] = True
        if _nothing_to_wait_for(scope) and compat.request_ctx() is scope.extras["contexts"][1]:
            # The request's own pop (not a copy's, copy_current_request_context:
            # the view still uses the request), and nothing waits: in place.
            _run_in_place(scope, request.close_now)
        else:
            scope.defer(compat.run_in_contexts, scope.extras["contexts"], request.close_now)
    if scope is not None and _end_of(scope).last == "request_close":
        _maybe_end_owner(scope)
    return True


class _End:
    """What the adapter remembers of a request until its scope is gone: the
    teardown calls it took over, which call ends the request (``last``),
    and its ``stream_with_context`` generator (weakly), whose own pops of
    the contexts are the same end."""

    __slots__ = ("steps", "stream", "last")

    def __init__(self) -> None:
        self.steps: dict[str, _Step] = {}
        self.stream: t.Any = None
        self.last = "teardown_appcontext"

    def stream_popping(self) -> bool:
        stream = self.stream() if self.stream is not None else None
        return stream is not None and bool(stream.gi_running)


def _end_of(scope: Scope) -> _End:
    # Kept in the scope's adapter slot: it outlives the scope's extras,
    # for Flask's repeats after the request's teardown ran.
    end = scope.adapter
    if end is None:
        end = scope.adapter = _End()
    return t.cast(_End, end)


def _end_owner(scope: Scope, config: t.Mapping[str, t.Any]) -> None:
    """The request itself is done (in its own Context): release its hold
    (with no child, the teardown steps run now, and what they raise is
    raised here, as Flask's pop would), watch what outlives it, and leave
    the scope."""
    token = scope.extras.pop("token", None)
    in_place_error = scope.extras.pop(_IN_PLACE_ERROR, None)
    try:
        try:
            scope.finish()
        except BaseException:
            if in_place_error is None:
                raise
        if in_place_error is not None:
            raise in_place_error  # the first error of the request's teardown
    finally:
        if not scope.done:
            _warn_left_sessions(scope)
        # After the finish: a child spawned by a teardown function counts.
        stragglers.outliving_response(
            scope, config["GEVENTCTX_STRAGGLER_TIMEOUT"], config["GEVENTCTX_STRAGGLER_POLICY"]
        )
        if token is not None:
            Scope.exit(token)


def _warn_left_sessions(scope: Scope) -> None:
    """The request's teardown will run after its children, in another
    greenlet: a ``scoped_session`` with the default (greenlet-local) scope
    cannot release what this greenlet holds there, and the next request on
    this keep-alive connection would reuse it (DESIGN G4). Say so, once per
    line of the warning, where geventctx can see it: in this greenlet, now."""
    if _greenlet_locals.left_sessions(getcurrent()):
        warnings.warn(
            f"{scope.label}: a child outlives the view, so teardown_appcontext runs later in another "
            "greenlet, and a greenlet-local SQLAlchemy scoped_session of this greenlet will not be "
            "removed there (the next request on this connection would reuse it): key the "
            "scoped_session on the app context, scopefunc=lambda: id(flask.globals.app_ctx._get_current_object()) "
            "(docs: Databases and other resources in children)",
            MisuseWarning,
            stacklevel=2,
        )


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
