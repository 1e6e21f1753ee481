"""One request, one Context: where every piece of a request runs.

The rule: a request runs in one :class:`contextvars.Context` object — its
:class:`RequestContext` — from the app call to the last teardown step. The
app call, the response's iteration, its ``close()`` and every teardown step
deferred until the request's children ended run in that same object, so a
token is always reset in the Context that made it (OpenTelemetry's
``detach``, Flask's own context stack). A child gets a *copy* of it at
hand-off; no piece of the request runs in a copy.

Which Context: a fresh ``copy_context()`` of the caller's, per request. A
WSGI server handles a keep-alive connection's requests in one greenlet, one
after the other, in that greenlet's one Context; a context variable one
request set and did not reset (a request id, a user, a tracing span) would
still be set when the next request on the connection runs, and the next
request's children would inherit it. A Context per request keeps every
request's writes its own. One exception: when the caller will run pieces of
the request itself — Flask's test client inside ``with client:`` pushes the
request's preserved contexts in its own Context (it asks for that with
``werkzeug.debug.preserve_context``) — the request runs in the caller's
Context, as it does without geventctx.

Where the Context is busy: a Context can be entered by one greenlet at a
time. A teardown step that becomes due while the request's own greenlet is
inside its Context (iterating a streamed response, or in its ``close()``)
is queued and runs in that greenlet as soon as it leaves the Context — at
the end of the chunk or of the ``close()`` — never in a copy.

uWSGI by default also reuses one environ dict per core for the next request
(``wsgi-env-behavior = cheat``), so a child reading ``request.headers``
after the response could read the next request's headers; under uWSGI the
app gets a private copy of the environ.

.. versionchanged:: 0.2
    Deferred teardown runs in the request's own Context, not in a snapshot;
    under a test client that preserves the context, the caller's Context.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import typing as t
import weakref
from contextvars import Context, ContextVar, copy_context
from functools import partial
from itertools import repeat

from greenlet import getcurrent

from ._steps import run_every

__all__ = ["IsolatedApp", "IsolatedResponse", "RequestContext", "own_environ", "ENVIRON_CONTEXT"]

log = logging.getLogger("geventctx")

StartResponse = t.Callable[..., t.Any]
WSGIApp = t.Callable[[t.Dict[str, t.Any], StartResponse], t.Iterable[bytes]]
#: ``hook(environ, close)``: the end of a request, given the response's bound
#: ``close``, or ``None`` when the app call raised (the hook runs in the
#: ``except``, with the exception in flight).
EndHook = t.Callable[[t.Dict[str, t.Any], t.Callable[[], t.Any] | None], None]
#: ``after(environ)``: the part of a request's end that may wait (capturing
#: the body for children), run after the end hook, outside the request's
#: Context: teardown steps that become due meanwhile must be able to enter
#: it, so nothing may wait inside it.
AfterHook = t.Callable[[t.Dict[str, t.Any]], None]

#: Where the request's :class:`RequestContext` is kept in its WSGI environ.
ENVIRON_CONTEXT = "geventctx.context"

#: Set in a request's own Context: its RequestContext (a child's copy
#: inherits it, but is not that Context: see :meth:`RequestContext.current`).
#: A weak reference: the Context and its RequestContext refer to each other.
_HOME: ContextVar[weakref.ref[RequestContext] | None] = ContextVar("geventctx.request_context", default=None)

#: The Flask test client's request to keep the contexts for the caller.
_PRESERVE = "werkzeug.debug.preserve_context"


def own_environ(environ: dict[str, t.Any]) -> dict[str, t.Any]:
    """``environ``, or a private copy where the server reuses the dict (uWSGI)."""
    if "uwsgi.version" in environ:
        return dict(environ)
    return environ


def _current_context() -> Context:
    # The running Context object itself (copy_context() returns a copy).
    context = getcurrent().gr_context
    if context is None:
        copy_context()  # makes the thread's first Context
        context = getcurrent().gr_context
    return t.cast(Context, context)


def _made_for(context: Context) -> RequestContext | None:
    """The RequestContext made for ``context`` (by a scope made in it), if any."""
    ref = context.get(_HOME)
    home = ref() if ref is not None else None
    return home if home is not None and home.context is context else None


class RequestContext:
    """The one Context object a request runs in, and its queue of pieces
    that became due while the request's greenlet was inside it.

    .. versionadded:: 0.2
    """

    __slots__ = ("context", "_inside", "_pending", "__weakref__")

    def __init__(self, context: Context) -> None:
        self.context = context
        self._inside = 0
        self._pending: list[t.Callable[[], t.Any]] = []
        if getcurrent().gr_context is context:
            _HOME.set(weakref.ref(self))
        else:
            context.run(_HOME.set, weakref.ref(self))

    @classmethod
    def fresh(cls) -> RequestContext:
        """A new Context for a request: a copy of the caller's."""
        return cls(copy_context())

    @classmethod
    def current(cls) -> RequestContext:
        """The RequestContext of the running Context, made if it has none."""
        context = _current_context()
        ref = context.get(_HOME)
        home = ref() if ref is not None else None
        if home is not None and home.context is context:
            return home
        return cls(context)

    @property
    def busy(self) -> bool:
        """True while a greenlet is inside :meth:`enter` (another greenlet
        cannot enter the Context now)."""
        return self._inside > 0

    def enter(self, function: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        """Run ``function(*args)`` in the Context, as the request's own
        greenlet does (app call, each chunk, ``close()``); then the pieces
        that became due meanwhile."""
        context = self.context
        if getcurrent().gr_context is context:
            return function(*args)  # already in it (the caller's Context)
        self._inside += 1
        try:
            return context.run(function, *args)
        finally:
            self._inside -= 1
            if not self._inside and self._pending:
                self._run_pending()

    def call(self, function: t.Callable[[], t.Any]) -> None:
        """Run ``function()`` in the Context now, or — if the request's
        greenlet is inside it — as soon as that greenlet leaves it."""
        context = self.context
        if getcurrent().gr_context is context:
            function()
        elif self._inside:
            self._pending.append(function)
        else:
            try:
                context.run(int)  # can it be entered? (no other way to ask)
            except RuntimeError:
                # The caller's Context, entered by its own code up its stack
                # (a test runner's Context.run), in a greenlet that is not
                # ours: a copy is the only place left to run in.
                log.debug("the request's Context is entered elsewhere: running %r in a copy", function)
                context.copy().run(function)
            else:
                self.enter(function)

    def _run_pending(self) -> None:
        # Each runs once; an exception from one does not stop the others.
        pending = self._pending

        def due() -> t.Iterator[t.Callable[[], t.Any]]:
            while pending:
                yield partial(self.enter, pending.pop(0))

        run_every(due(), lambda _exc: log.exception("a teardown step of a request failed"))

    def __repr__(self) -> str:
        return f"<RequestContext {'busy' if self._inside else 'idle'} pending={len(self._pending)}>"


class IsolatedApp:
    """Wrap a WSGI app so each request runs in a Context of its own.

    :param end: the adapter's end of the request (it defers the response's
        ``close()`` until the request's children have ended, and settles the
        body), run in the request's Context when the response is closed or
        the app call raised; by default the response is closed at once.
    :param after: the part of the adapter's end that may wait, run right
        after ``end``, outside the request's Context (:data:`AfterHook`).
    """

    def __init__(
        self, app: WSGIApp, end: EndHook | None = None, *, after: AfterHook | None = None, weak: bool = False
    ) -> None:
        self._weak = weak
        if self._weak:
            # The app's own bound method (app.wsgi_app), held weakly: no
            # reference cycle through the app (Flask frees a dropped app).
            self._app: t.Any = weakref.WeakMethod(app)
        else:
            self._app = app
        self.end = end
        self.after = after

    @property
    def app(self) -> WSGIApp:
        """The wrapped WSGI app."""
        if self._weak:
            app = self._app()
            if app is None:
                raise RuntimeError("the Flask app of this WSGI callable is gone")
            return t.cast(WSGIApp, app)
        return t.cast(WSGIApp, self._app)

    def __call__(self, environ: dict[str, t.Any], start_response: StartResponse) -> t.Iterable[bytes]:
        if "uwsgi.version" in environ:
            environ = dict(environ)  # own_environ(), inlined (a call less per request)
        if ENVIRON_CONTEXT not in environ and _PRESERVE not in environ:
            app = self._app
            if self._weak:
                app = app()
                if app is None:
                    raise RuntimeError("the Flask app of this WSGI callable is gone")
            # The common case: a fresh Context, entered by Context.run alone.
            # Its RequestContext (what counts who is inside, and queues what
            # becomes due meanwhile) is made only with the request's scope,
            # at its first hand-off: until then nothing can become due.
            context = copy_context()
            environ[ENVIRON_CONTEXT] = context
            try:
                result = context.run(app, environ, start_response)
            except BaseException:
                home = _made_for(context)
                try:
                    if self.end is not None:
                        if home is not None:
                            home.enter(self.end, environ, None)
                        else:
                            context.run(self.end, environ, None)
                finally:
                    if self.after is not None:
                        self.after(environ)
                raise
            # IsolatedResponse(context, result, environ, self.end, self.after), with no
            # __init__ frame (the call budget: DESIGN, "Pay for what you use").
            response = _new_response(IsolatedResponse)
            response._context = context
            response._result = result
            response._environ = environ
            response._hook = self.end
            response._after = self.after
            return response
        home = environ.get(ENVIRON_CONTEXT)
        if isinstance(home, Context):
            home = _made_for(home) or RequestContext.current()  # nested in an IsolatedApp
            environ[ENVIRON_CONTEXT] = home
        if not isinstance(home, RequestContext):
            home = RequestContext.current() if _PRESERVE in environ else RequestContext.fresh()
            environ[ENVIRON_CONTEXT] = home
        try:
            result = home.enter(self.app, environ, start_response)
        except BaseException:
            try:
                if self.end is not None:
                    home.enter(self.end, environ, None)
            finally:
                if self.after is not None:
                    self.after(environ)
            raise
        return IsolatedIterable(home, result, environ, self.end, self.after)


class IsolatedIterable:
    """A response iterable iterated and closed in its request's Context."""

    def __init__(
        self,
        home: RequestContext,
        result: t.Iterable[bytes] | None,
        environ: dict[str, t.Any],
        hook: EndHook | None = None,
        after: AfterHook | None = None,
    ) -> None:
        self._home = home
        self._result = result
        self._environ = environ
        self._hook = hook
        self._after = after

    def __iter__(self) -> t.Iterator[bytes]:
        if self._result is None:
            return
        enter = self._home.enter
        iterator = enter(iter, self._result)
        while True:
            try:
                chunk = enter(next, iterator)
            except StopIteration:
                return
            yield chunk

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        try:
            if self._hook is not None:
                self._home.enter(self._hook, self._environ, close)
            elif close is not None:
                self._home.enter(close)
        finally:
            if self._after is not None:
                self._after(self._environ)


_new_response = object.__new__


class IsolatedResponse:
    """A response iterable iterated and closed in its request's fresh Context.

    Until the request has a RequestContext (made with its scope, at its
    first hand-off) nothing can become due while the response is iterated:
    each chunk is ``Context.run(next, iterator)``, driven by ``map`` — no
    Python frame per chunk. Once it has one, this is an
    :class:`IsolatedIterable` of it.
    """

    __slots__ = ("_context", "_result", "_environ", "_hook", "_after")

    def __init__(
        self,
        context: Context,
        result: t.Iterable[bytes],
        environ: dict[str, t.Any],
        hook: EndHook | None,
        after: AfterHook | None = None,
    ) -> None:
        self._context = context
        self._result = result
        self._environ = environ
        self._hook = hook
        self._after = after

    def __iter__(self) -> t.Iterator[bytes]:
        context = self._context
        ref = context.get(_HOME)
        home = ref() if ref is not None else None
        if home is not None and home.context is context:
            return iter(IsolatedIterable(home, self._result, self._environ, self._hook, self._after))
        if self._result is None:
            return iter(())
        run = context.run
        # StopIteration from next() ends the map: the iteration's end.
        return map(run, repeat(next), repeat(run(iter, self._result)))

    def close(self) -> None:
        context = self._context
        environ = self._environ
        ref = context.get(_HOME)
        home = ref() if ref is not None else None
        if home is not None and home.context is context:
            IsolatedIterable(home, self._result, environ, self._hook, self._after).close()
            return
        close = getattr(self._result, "close", None)
        try:
            if self._hook is not None:
                context.run(self._hook, environ, close)
            elif close is not None:
                context.run(close)
        finally:
            if self._after is not None:
                self._after(environ)
