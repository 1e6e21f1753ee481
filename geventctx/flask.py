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

import io
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
from . import _greenlet_locals, _servers, errorlog, stragglers
from ._flask_appcontext import fork_g, forked_g, unfork_g
from ._site import _INTERNAL_DIRS, Site, package_dirs, site_of
from .body import (
    BODY_MODES,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIMEOUT,
    ENVIRON_BODY,
    SharedBody,
    SharedFile,
    has_body,
    reader_key,
    share_wsgi_input,
)
from .errors import LateEffectWarning, MisuseWarning, SessionMutationError, SessionMutationWarning
from .isolation import IsolatedApp
from .request import SharedBodyRequest
from .request_end import after_response, owner_ended, response_closed
from .scope import _PENDING, ENVIRON_SCOPE, Scope, register_opener

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


# -- per-request state ---------------------------------------------------------------


class _Request:
    """What the adapter keeps of one managed request, in named fields.

    The rule (DESIGN, "Pay for what you use"): a request that never hands
    off is this object, the after-request seal and Flask's own teardown
    calls in place; its :class:`~geventctx.Scope`, shared body and
    straggler watch come into being at its first hand-off (:func:`_open`,
    the opener this adapter registers with :mod:`geventctx.scope`).
    """

    __slots__ = (
        "scope",  # the request's Scope, made at its first hand-off, else None
        "ctx",  # Flask's request context (3.2: the merged context)
        "app_ctx",  # the app context the request pushed for itself, or None
        "contexts",  # what a deferred teardown step makes current again
        "home",  # the request's own Context object
        "config",  # the app's config
        "late",  # the after-request list, sealed where Flask stops reading it
        "response",  # the response, once Flask made it (request_finished)
        "steps",  # the teardown calls taken over, by kind
        "stream",  # the response's stream_with_context generator (weakly), or None
        "last",  # the teardown call that ends the request itself
        "ended",  # True once the request itself ended
        "error",  # the first error of a teardown call run in place
        "token",  # the token of the scope entered in the request's Context
        "pending",  # the token of this state, pending in the request's Context
        "session_sealed",  # True once the session is sealed (G6)
        "thread",  # the request's thread, and its hub: where its socket is read
        "hub",
    )

    scope: Scope | None
    ctx: t.Any
    app_ctx: t.Any
    contexts: t.Any
    home: t.Any
    config: t.Any
    late: t.Any
    response: t.Any
    steps: dict[str, _Step]
    stream: t.Any
    last: str
    ended: bool
    error: BaseException | None
    token: t.Any
    pending: t.Any
    session_sealed: bool
    thread: int
    hub: t.Any

    @property
    def label(self) -> str:
        scope = self.scope
        if scope is not None:
            return scope.label
        ctx = self.ctx
        if ctx is None:
            return "the request"
        return f"{ctx.request.method} {ctx.request.path}"

    def stream_popping(self) -> bool:
        stream = self.stream() if self.stream is not None else None
        return stream is not None and bool(stream.gi_running)


_ENVIRON_STATE = "geventctx.flask"
_cv_app = compat._cv_app
_cv_request = compat._cv_request
_STREAM_CODE = compat._STREAM_CODE


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

    def __iter__(self) -> t.Iterator[t.Any]:
        index = 0
        while index < len(self):
            yield self[index]
            index += 1
        self.sealed = True

    def append(self, function: t.Any) -> None:
        if self.sealed:
            name = getattr(function, "__qualname__", function)
            ctx = _request_ctx_now()
            label = f"{ctx.request.method} {ctx.request.path}" if ctx is not None else "the request"
            _late(
                self.policy,
                LateEffectWarning,
                f"after_this_request({name}) was called after Flask ran the "
                f"after-request functions of {label}: it will never run",
                _user_site(),
            )
        super().append(function)


def _seal_session(session: t.Any, state: _Request, policy: str) -> None:
    """From now on, a change to ``session`` cannot reach the client."""
    if policy == "ignore" or state.session_sealed:
        return
    state.session_sealed = True
    message = (
        f"the session of {state.label} was changed after it was saved in the response; "
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

        scope = _open(state, handoff=False)
        if scope is not None:
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
        # The app's own bound method is held weakly (no cycle); a middleware
        # the user put there before us is kept as it is.
        own = getattr(app.wsgi_app, "__self__", None) is app
        app.wsgi_app = IsolatedApp(app.wsgi_app, _end_of_request, after=after_response, weak=own)  # type: ignore[method-assign]
        # A request reads its body as plain Werkzeug until its first
        # hand-off; then (or at request.shared_body()) every body consumer
        # reads the shared body (its class is swapped: _open).
        app.request_class = _unshared_class(app.request_class)

    # -- teardown, deferred until the last child ends -------------------------------
    #
    # The rule: Flask's teardown calls for a managed request become steps of
    # its scope (teardown_request, request.close(), teardown_appcontext;
    # then the response's close()), taken over once each and run in Flask's
    # order when the request and its children are done, with the exception
    # Flask settled on. A call made while nothing waits (no scope, or no
    # child holds the request, no step is deferred, no stream is still to
    # run) is Flask's own, in place: what a request that never handed off
    # pays is one check per call. The request itself ends at the last teardown call of
    # Flask's last pop of its contexts (teardown_appcontext of the app
    # context it pushed, else request.close()) — for a stream_with_context
    # response at the stream's end — or at the latest when the response is
    # closed. A call from the stream's own pop is the same end (Flask
    # 3.1.2-3.1.3 would run teardown twice): it only hands over the stream's
    # exception. Any other repeat — the test client popping the contexts it
    # preserved, at the end of ``with client:`` — runs as without geventctx,
    # after the request's own teardown.

    def _teardown_request(
        self, state: _Request, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> None:
        scope = t.cast(Scope, state.scope)
        ctx, exc = compat.teardown_call(args, kwargs)
        if not scope.done and "teardown_request" not in state.steps:
            state.late.sealed = True
            body = state.ctx.request.environ.get(ENVIRON_BODY)
            if isinstance(body, SharedBody):
                # request.max_content_length needs the request's context,
                # which a capture after the response no longer has.
                body.settle_limits()
        _take_over(state, "teardown_request", original, args, kwargs, exc)

    def _teardown_appctx(
        self, state: _Request, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> None:
        ctx, exc = compat.teardown_call(args, kwargs)
        _take_over(state, "teardown_appcontext", original, args, kwargs, exc)


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
    state: _Request, kind: str, original: t.Callable[..., None], args: tuple[t.Any, ...], kwargs: dict[str, t.Any],
    exc: t.Any,
) -> None:
    """A teardown call of ``kind`` for the managed request of ``state``, whose scope exists."""
    scope = t.cast(Scope, state.scope)
    steps = state.steps
    step = steps.get(kind)
    if step is None and scope.done:
        original(*args, **kwargs)  # the request's teardown ran: Flask's own call
        return
    if step is None and _nothing_to_wait_for(state):
        # No child holds the request and no step waits: Flask's own call,
        # now, in place (what it raises reaches Flask's pop as without
        # geventctx). A hand-off it makes holds the request: the later
        # teardown calls then wait for it.
        steps[kind] = _RAN_IN_PLACE
        _run_in_place(state, original, *args, **kwargs)
        if kind == state.last:
            _maybe_end_owner(state)
        return
    if exc is compat.MISSING:
        exc = compat.exception_in_flight()
    if step is None:
        step = steps[kind] = _Step(state.contexts, original, args, exc)
        scope.defer(step)
    elif state.stream_popping():
        if exc is not None and not step.ran:
            step.exc = exc  # the stream's exception: what teardown gets
    elif step.ran or scope.done:
        original(*args, **kwargs)  # Flask's own repeat, after the request's teardown ran
        return
    else:
        # Flask's own repeat before the request's teardown ran (children
        # still run): it runs after it.
        scope.defer(_Step(state.contexts, original, args, exc))
    if kind == state.last:
        _maybe_end_owner(state)


def _nothing_to_wait_for(state: _Request) -> bool:
    """True if a teardown call of ``state``'s request may run now, in place:
    nothing holds the request but the request itself, no deferred step
    waits, and no ``stream_with_context`` stream is still to run."""
    scope = state.scope
    return (scope is None or scope.idle) and not compat.stream_pending(state.response)


def _run_in_place(state: _Request, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> None:
    # What a step run in place raises is raised when the request ends,
    # after every later step ran (as for deferred steps: G4), not now
    # (Flask's pop would skip request.close()).
    try:
        function(*args, **kwargs)
    except BaseException as exc:
        if state.error is None:
            state.error = exc


def _maybe_end_owner(state: _Request) -> None:
    # The last teardown call of Flask's pop: the request itself is done,
    # unless its stream_with_context stream is still to run.
    if not state.ended and not compat.stream_pending(state.response):
        _end_owner(state)


def _with_exc(args: tuple[t.Any, ...], exc: t.Any) -> tuple[t.Any, ...]:
    """A teardown call's arguments with its exception settled: ``(exc,)``
    on Flask 2.3-3.1, ``(ctx, exc)`` on 3.2."""
    return (args[0], exc) if compat.MERGED else (exc,)


class _Teardown:
    """``app.do_teardown_request``/``do_teardown_appcontext`` of a managed
    app: defers Flask's own method (looked up on the app's class at each
    call, so subclass overrides count) for managed requests whose scope
    exists, and calls it in place otherwise. Holds the app weakly: no
    reference cycle."""

    __slots__ = ("_app", "_name", "_request")

    def __init__(self, app: Flask, name: str) -> None:
        self._app = weakref.ref(app)
        self._name = name
        self._request = name == "do_teardown_request"

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> None:
        # Every line runs for every request: its context's state looked up
        # inline (no compat call), Flask's own call in place when the
        # request never handed off (the call budget: DESIGN, "Pay for what
        # you use").
        app = self._app()
        if app is None:
            raise RuntimeError("the app of this teardown method is gone")
        original = getattr(type(app), self._name).__get__(app)
        if compat.MERGED:
            ctx = args[0] if args else kwargs.get("ctx")
        else:
            ctx = _cv_request.get(None) if self._request else _cv_app.get(None)
        state: _Request | None = getattr(ctx, "_geventctx", None)
        if state is None or (state.scope is None and state.ended):
            original(*args, **kwargs)  # not a managed request, or after its end: Flask's own call
            return
        scope = state.scope
        kind = "teardown_request" if self._request else "teardown_appcontext"
        if scope is None or (
            kind not in state.steps and state.stream is None and not scope.done and scope.idle
        ):
            # Never handed off, or nothing waits (no child holds the request,
            # no step is deferred, no stream is to run): Flask's own call, in
            # place; what it raises is raised at the request's end (after
            # every later call ran). _take_over()'s first case, inlined (P4).
            if self._request:
                state.late.sealed = True
                if scope is not None:
                    body = state.ctx.request.environ.get(ENVIRON_BODY)
                    if isinstance(body, SharedBody):
                        body.settle_limits()  # see _teardown_request
            state.steps[kind] = _RAN_IN_PLACE
            try:
                original(*args, **kwargs)
            except BaseException as exc:
                if state.error is None:
                    state.error = exc
            if state.scope is not None:
                # A teardown function handed off: the request waits for it now.
                if kind == state.last:
                    _maybe_end_owner(state)
            elif kind == state.last or (self._request and state.last == "request_close"):
                # The request itself ends here (request.close(), when it is
                # the last call, is Flask's own: nothing to wait for); a
                # hand-off after it is not the request's. What a call
                # raised is raised now, as Flask's pop would.
                state.ended = True
                token, state.pending = state.pending, None
                if token is not None and getcurrent().gr_context is state.home:
                    _PENDING.reset(token)
                error, state.error = state.error, None
                # _forget(state), inlined (the call budget): nothing of the
                # request in a reference cycle.
                state.ctx = state.app_ctx = state.contexts = state.response = state.late = None
                if error is not None:
                    raise error
            return
        ext = app.extensions.get("geventctx")
        if not isinstance(ext, GeventContext):
            original(*args, **kwargs)
        elif self._request:
            ext._teardown_request(state, original, args, kwargs)
        else:
            ext._teardown_appctx(state, original, args, kwargs)


def _leave_pending(state: _Request) -> None:
    # A hand-off after the request's end is not the request's (as before
    # its scope was left): its pending state goes, where it was set.
    token, state.pending = state.pending, None
    if token is not None and getcurrent().gr_context is state.home:
        _PENDING.reset(token)


# -- request start and finish (one receiver each, one call each) ----------------


def _request_ctx_now() -> t.Any:
    if compat.MERGED:
        ctx = _cv_app.get(None)
        return ctx if ctx is not None and ctx.has_request else None
    return _cv_request.get(None)


def _on_request_started(sender: t.Any, **_: t.Any) -> None:
    # Every line runs for every request (the call budget): no scope, no
    # body wrapper, no compat call — a state object, the after-request
    # seal, and the state left pending for the first hand-off.
    if not isinstance(getattr(sender, "extensions", {}).get("geventctx"), GeventContext):
        return
    if compat.MERGED:
        ctx = _cv_app.get(None)
        if ctx is None or not ctx.has_request:
            return
        app_ctx = ctx
        contexts: tuple[t.Any, t.Any] = (None, ctx)
    else:
        ctx = _cv_request.get(None)
        if ctx is None:
            return
        tokens = ctx._cv_tokens  # compat.app_ctx_of_request(), inlined
        app_ctx = tokens[-1][1] if tokens else None
        contexts = (_cv_app.get(None), ctx)
    if getattr(ctx, "_geventctx", None) is not None:
        return
    config = sender.config
    state = _Request()
    state.scope = state.response = state.stream = state.error = state.token = None
    state.ctx = ctx
    state.app_ctx = app_ctx
    state.contexts = contexts
    state.home = getcurrent().gr_context
    state.thread = _get_ident()
    state.hub = get_hub()
    state.config = config
    state.steps = {}
    # The request itself ends with the teardown of the app context it
    # pushed; else (one was active already) with request.close().
    state.last = "teardown_appcontext" if app_ctx is not None else "request_close"
    state.ended = state.session_sealed = False
    late = _AfterRequestList(ctx._after_request_functions)
    late.policy = config["GEVENTCTX_LATE_EFFECTS"]
    ctx._after_request_functions = late
    state.late = late
    ctx._geventctx = state
    if app_ctx is not None:
        app_ctx._geventctx = state
    environ = ctx.request.environ
    environ[_ENVIRON_STATE] = state
    state.pending = _PENDING.set(state)
    if ENVIRON_SCOPE in environ:
        # Inside the WSGI middleware, whose scope is current already: the
        # request's own scope now, nested in it, and current.
        state.token = _make_scope(state).enter()


def _on_request_finished(sender: t.Any, response: t.Any = None, **_: t.Any) -> None:
    ctx = _request_ctx_now() if compat.MERGED else _cv_request.get(None)
    state: _Request | None = getattr(ctx, "_geventctx", None)
    if state is None or not isinstance(getattr(sender, "extensions", {}).get("geventctx"), GeventContext):
        return
    state.late.sealed = True
    state.response = response
    scope = state.scope
    stream = getattr(response, "response", None)
    if _STREAM_CODE is not None and getattr(stream, "gi_code", None) is _STREAM_CODE:
        # A stream_with_context response: its generator pops the contexts
        # again at its end; what runs in between is the scope's.
        scope = _open(state, handoff=False)
        state.stream = weakref.ref(stream)
    if scope is not None:
        scope.response_started = True
    # Flask saved the session just now (process_response, unless it is
    # a null session), whatever the app's session interface is: from
    # here on a change cannot reach the client (G6).
    # (compat.session_if_open(), inlined.)
    opened = vars(ctx)
    session = opened["_session"] if "_session" in opened else opened.get("session")
    if session is not None and not sender.session_interface.is_null_session(session):
        _seal_session(session, state, sender.config["GEVENTCTX_SESSION_AFTER_RESPONSE"])


def _connect_signals() -> None:
    # One receiver per signal for the process, whatever the number of apps
    # (blinker keeps module functions; they look the extension up on the
    # sender), so an app factory's apps leave nothing behind.
    request_started.connect(_on_request_started)
    request_finished.connect(_on_request_finished)


# -- the first hand-off ------------------------------------------------------------------


def _open(state: _Request, handoff: bool = True) -> Scope | None:
    """The request's scope, made now if it has none (its first hand-off, a
    ``stream_with_context`` response, ``current_scope()``,
    ``request.shared_body()``): its body shared, its request's class swapped
    to read through the shared body and defer ``close()``. At the first
    hand-off (``handoff``) it is entered in the request's own Context and,
    in ``"buffer"`` mode, the whole body read. ``None`` after the request's
    end, or outside the request's own Context."""
    scope = state.scope
    if scope is None:
        if state.ended or getcurrent().gr_context is not state.home:
            return None
        scope = _make_scope(state)
    if not handoff or state.token is not None or state.ended or getcurrent().gr_context is not state.home:
        return scope
    state.token = scope.enter()
    config = state.config
    body = state.ctx.request.environ.get(ENVIRON_BODY)
    if isinstance(body, SharedBody) and config["GEVENTCTX_BODY"] == "buffer" and body.length is not None:
        # "buffer": the parent reads the whole body at its first hand-off
        # (interrupted, the hand-off does not happen: it has no hold yet).
        if body.length <= config["GEVENTCTX_BODY_BUFFER_LIMIT"]:
            try:
                body.read_whole()
            except Exception:
                pass  # kept for the readers
    return scope


def _make_scope(state: _Request) -> Scope:
    ctx = state.ctx
    request = ctx.request
    environ = request.environ
    scope = Scope(f"{request.method} {request.path}")
    scope.response_started = state.response is not None
    outer = environ.get(ENVIRON_SCOPE)
    if isinstance(outer, Scope):
        scope.hold_parent(outer)  # the WSGI middleware's request
    state.scope = scope
    if not isinstance(request, _ManagedRequest):
        request.__class__ = _managed_class(type(request))
    if state.config["GEVENTCTX_LOG_CHILD_ERRORS"]:
        errorlog.install()
    else:
        scope.extras[errorlog.OPT_OUT] = True
    _share_body(state, request, environ)
    return scope


register_opener(_Request, _open)


def _share_body(state: _Request, request: t.Any, environ: dict[str, t.Any]) -> SharedBody | None:
    """Put the request's body behind the shared body, from where Werkzeug
    left it: what it read before the first hand-off (``get_data``'s cache,
    a parsed form, a stream read in part) is what every consumer reads."""
    config = state.config
    mode = config["GEVENTCTX_BODY"]
    if mode == "off" or not has_body(environ):
        return None
    existing = environ.get(ENVIRON_BODY)
    if isinstance(existing, SharedBody):
        # The WSGI middleware shares it already: add Flask's limit.
        return share_wsgi_input(environ, lambda: request.max_content_length)
    if existing is not None:
        return None  # gone
    read = request.__dict__
    source: tuple[t.Any, int | None] | None = None
    partial = False
    if "_cached_data" in read:
        data = read["_cached_data"]
        source = (data, len(data))  # read whole: kept as it is, nothing to read
    elif "form" in read or "stream" in read:
        stream = read.get("stream")
        given, left = (None, None) if "form" in read or stream is None else _servers.progress(stream)
        if "form" in read or left == 0:
            source = (io.BytesIO(b""), 0)  # consumed: what Werkzeug gives now
        else:
            # The rest, where the view left it: the view's only, unless the
            # stream says nothing was read (G5: a child gets BodyReadError).
            source = (stream, left)
            partial = given != 0
    body = share_wsgi_input(
        environ,
        lambda: request.max_content_length,
        memory_limit=config["GEVENTCTX_BODY_MEMORY_LIMIT"],
        timeout=config["GEVENTCTX_BODY_TIMEOUT"],
        directory=config["GEVENTCTX_BODY_SPOOL_DIR"],
        scope=state.scope,
        owner=(get_hub(), _get_ident()),
        source=source,
    )
    if partial:
        body.partial_reader = reader_key()  # the view (G5: a child gets BodyReadError)
    files = read.get("files")
    if files is not None:
        for _name, upload in files.items(multi=True):
            if not isinstance(upload.stream, SharedFile):
                at = upload.stream.tell()  # the view's own position stays its own
                upload.stream = SharedFile(upload.stream)
                if at:
                    upload.stream.seek(at)
    return body


class _UnsharedRequest:
    """Mixed into the app's request class: until its scope exists a request
    is plain Werkzeug; :meth:`shared_body` makes both."""

    environ: dict[str, t.Any]

    def shared_body(self) -> SharedBody | None:
        """The request's shared body, made now (its scope too), or ``None``."""
        state = self.environ.get(_ENVIRON_STATE)
        if isinstance(state, _Request):
            _open(state, handoff=False)
        if isinstance(self, SharedBodyRequest):
            return self.shared_body()
        return None

    @property
    def stream(self) -> t.Any:
        # Werkzeug's every body read goes through here: plain Werkzeug, but
        # for a reader in another thread than the request's (given the
        # request by hand, not handed off): the socket is the request hub's,
        # read through a shared body that hands its reads over there.
        environ = self.environ
        body = environ.get(ENVIRON_BODY)
        if isinstance(body, SharedBody):
            return body
        state = environ.get(_ENVIRON_STATE)
        if (
            body is None and isinstance(state, _Request) and state.thread != _get_ident()
            and state.config["GEVENTCTX_BODY"] != "off" and has_body(environ)
        ):
            config = state.config
            return share_wsgi_input(
                environ,
                lambda: self.max_content_length,  # type: ignore[attr-defined]
                memory_limit=config["GEVENTCTX_BODY_MEMORY_LIMIT"],
                timeout=config["GEVENTCTX_BODY_TIMEOUT"],
                directory=config["GEVENTCTX_BODY_SPOOL_DIR"],
                owner=(state.hub, state.thread),
            )
        return super().stream  # type: ignore[misc]

    def close(self) -> None:
        """Close the request once, at the request's own pop: the pop of a
        copy (``copy_current_request_context``) shares the request the view
        still uses, and leaves it open. (Once the request has a scope, its
        class defers the close: :class:`_ManagedRequest`.)"""
        state = self.environ.get(_ENVIRON_STATE)
        if isinstance(state, _Request) and state.scope is None:
            attrs = self.__dict__
            if attrs.get("_geventctx_closed"):
                return
            current = (_cv_app if compat.MERGED else _cv_request).get(None)  # no call: the budget
            if not state.ended and state.ctx is not None and current is not state.ctx:
                return  # a copy's pop, under the view
            attrs["_geventctx_closed"] = True
        super().close()  # type: ignore[misc]


class _ManagedRequest(SharedBodyRequest):
    """The class of a managed request once its scope exists: every body
    consumer reads the shared body; ``close()`` waits for the children."""

    def close(self) -> None:
        if not _defer_request_close(self):
            self.close_now()


def _unshared_class(cls: type) -> type:
    if issubclass(cls, (_UnsharedRequest, SharedBodyRequest)):
        return cls
    made: type | None = cls.__dict__.get("_geventctx_unshared_class")
    if made is None:
        made = type(cls.__name__, (_UnsharedRequest, cls), {"__module__": cls.__module__})
        cls._geventctx_unshared_class = made  # type: ignore[attr-defined]
    return made


def _managed_class(cls: type) -> type:
    made: type | None = cls.__dict__.get("_geventctx_managed_class")
    if made is None:
        made = type(cls.__name__, (_ManagedRequest, cls), {"__module__": cls.__module__})
        cls._geventctx_managed_class = made  # type: ignore[attr-defined]
    return made


def _defer_request_close(request: t.Any) -> bool:
    """``request.close()`` of a managed request with a scope: a step of its
    scope, once for ever (Flask's pop calls it, and so does the pop of
    every copy made by ``copy_current_request_context``: the same request
    object). ``False``: close now."""
    state: _Request | None = request.environ.get(_ENVIRON_STATE)
    scope = state.scope if state is not None else None
    if state is None or scope is None:
        return False
    attrs = request.__dict__
    if not attrs.get("_geventctx_close_deferred"):
        if scope.done:
            return False
        attrs["_geventctx_close_deferred"] = True
        if _nothing_to_wait_for(state) and compat.request_ctx() is state.contexts[1]:
            # The request's own pop (not a copy's, copy_current_request_context:
            # the view still uses the request), and nothing waits: in place.
            _run_in_place(state, request.close_now)
        else:
            scope.defer(compat.run_in_contexts, state.contexts, request.close_now)
    if state.last == "request_close":
        _maybe_end_owner(state)
    return True


# -- the end of the request -------------------------------------------------------


def _end_owner(state: _Request) -> None:
    """The request itself is done (in its own Context): the one end path
    (:func:`geventctx.request_end.owner_ended`), then nothing of it stays
    pending."""
    scope = t.cast(Scope, state.scope)
    state.ended = True
    token, state.token = state.token, None
    error, state.error = state.error, None
    config = state.config
    try:
        owner_ended(scope, token, config["GEVENTCTX_STRAGGLER_TIMEOUT"], config["GEVENTCTX_STRAGGLER_POLICY"], error)
    finally:
        if not scope.done:
            _warn_left_sessions(scope)
        _leave_pending(state)
        scope.on_close(_forget, state)  # after the request's teardown steps


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


def _end_of_request(environ: dict[str, t.Any], close: t.Callable[[], t.Any] | None) -> None:
    # The response was written and is being closed (or the app call raised).
    # Its close() (Werkzeug's call_on_close hooks) comes after
    # teardown_request, request.close() and teardown_appcontext, which were
    # deferred when Flask popped the request context. Then the body: what
    # children may still read is captured now, never before the response.
    state: _Request | None = environ.get(_ENVIRON_STATE)
    scope = state.scope if state is not None else None
    if scope is None:
        # Never handed off: nothing waits, and nobody can read the body
        # through geventctx any more (no scope can be made now).
        if state is not None:
            state.ended = True
        try:
            if close is not None:
                close()
        finally:
            body = environ.get(ENVIRON_BODY)
            if isinstance(body, SharedBody) and body.owner is None:
                # Made by a thread's first read (no scope): settled now.
                body.end_response(children=False)
                body.release()
        return
    state = t.cast(_Request, state)
    if not state.ended:
        # A stream_with_context response closed before it ran: the request
        # ends with its response.
        _end_owner(state)
    response_closed(scope, environ, close)


def _forget(state: _Request) -> None:
    # The request's scope is done: keep nothing of the request (no
    # reference cycle through its contexts; Flask's repeats find it ended).
    state.ctx = state.app_ctx = state.contexts = state.response = state.late = None


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
