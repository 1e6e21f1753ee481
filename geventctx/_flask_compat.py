"""Every difference between the Flask versions the extension supports.

The rule: :mod:`geventctx.flask` never touches a Flask private name or a
version-specific signature itself; it asks this module. Flask 2.3-3.1 keep
a ``RequestContext`` and an ``AppContext`` in two context variables (the
request context remembers the app context it pushed) and call
``do_teardown_request(exc=_sentinel)``; Flask 3.2 (main) merges them into
one ``AppContext`` in one variable, opens the session on first access and
calls ``do_teardown_request(ctx, exc)``. The core (everything outside
``geventctx.flask``) uses only Flask's public API, and only if Flask was
imported already.

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import typing as t

from flask import globals as _globals

#: True on Flask 3.2+ (one merged context per request).
MERGED = not hasattr(_globals, "_cv_request")

_cv_app: t.Any = _globals._cv_app
_cv_request: t.Any = getattr(_globals, "_cv_request", None)

#: What ``do_teardown_*`` got when Flask passed no exception argument: Flask
#: then uses the exception in flight (``sys.exc_info()``), and so do we.
MISSING: t.Any = object()


def request_ctx() -> t.Any:
    """The active request's context (3.2: the merged context), or ``None``."""
    if MERGED:
        ctx = _cv_app.get(None)
        return ctx if ctx is not None and ctx.has_request else None
    return _cv_request.get(None)


def app_ctx() -> t.Any:
    """The active app context, or ``None``."""
    return _cv_app.get(None)


def app_ctx_of_request(ctx: t.Any) -> t.Any:
    """The app context the request context ``ctx`` pushed for itself (None
    if one was active already); on 3.2, ``ctx`` itself."""
    if MERGED:
        return ctx
    tokens = getattr(ctx, "_cv_tokens", None)
    return tokens[-1][1] if tokens else None


def contexts(ctx: t.Any) -> tuple[t.Any, t.Any]:
    """What a deferred teardown step makes current again: (app ctx, request ctx)."""
    if MERGED:
        return (None, ctx)
    return (_cv_app.get(None), ctx)


def run_in_contexts(saved: tuple[t.Any, t.Any], function: t.Callable[..., t.Any], *args: t.Any) -> None:
    """``function(*args)`` with the request's contexts current, as Flask runs
    teardown: a deferred step runs after Flask popped them. The variables are
    set and reset in the running Context (the request's own)."""
    app_context, req_context = saved
    if request_ctx() is req_context:
        function(*args)
        return
    if MERGED:
        token = _cv_app.set(req_context)
        try:
            function(*args)
        finally:
            _cv_app.reset(token)
        return
    app_token = _cv_app.set(app_context) if app_context is not None else None
    req_token = _cv_request.set(req_context)
    try:
        function(*args)
    finally:
        _cv_request.reset(req_token)
        if app_token is not None:
            _cv_app.reset(app_token)


def teardown_call(args: tuple[t.Any, ...], kwargs: dict[str, t.Any]) -> tuple[t.Any, t.Any]:
    """(context, exception) of a ``do_teardown_request``/``do_teardown_appcontext``
    call as Flask makes it: 2.3-3.1 ``(exc=_sentinel)`` (context: the active
    one), 3.2 ``(ctx, exc=None)``. The exception is :data:`MISSING` if the
    call passed none and Flask would take the one in flight."""
    if MERGED:
        ctx = args[0] if args else kwargs.get("ctx")
        exc = args[1] if len(args) > 1 else kwargs.get("exc")
        return ctx, exc
    exc = args[0] if args else kwargs.get("exc", MISSING)
    if exc is MISSING or _is_flask_sentinel(exc):
        exc = MISSING
    return None, exc


def exception_in_flight() -> BaseException | None:
    return sys.exc_info()[1]


def _teardown_default() -> t.Any:
    import inspect

    from flask import Flask

    return inspect.signature(Flask.do_teardown_request).parameters["exc"].default


#: Flask 2.3-3.1's own ``_sentinel``: the default of ``exc``, meaning "the
#: exception in flight".
_FLASK_SENTINEL = None if MERGED else _teardown_default()


def _is_flask_sentinel(value: t.Any) -> bool:
    return _FLASK_SENTINEL is not None and value is _FLASK_SENTINEL


def session_if_open(ctx: t.Any) -> t.Any:
    """The request's session if it was opened (2.3-3.1 open it at push;
    3.2 on first access), else ``None``, without marking it accessed:
    3.1.3+ keep it in ``_session`` behind a ``session`` property that does."""
    state = vars(ctx)
    if "_session" in state:
        return state["_session"]
    return state.get("session")


def after_request_functions(ctx: t.Any) -> list[t.Any]:
    return ctx._after_request_functions  # type: ignore[no-any-return]


def set_after_request_functions(ctx: t.Any, functions: list[t.Any]) -> None:
    ctx._after_request_functions = functions


def _stream_generator_code() -> t.Any:
    from flask import helpers

    for const in helpers.stream_with_context.__code__.co_consts:
        if getattr(const, "co_name", None) == "generator":
            return const
    return None


#: The code of the generator ``stream_with_context`` wraps a stream in.
_STREAM_CODE = _stream_generator_code()


def stream_of(response: t.Any) -> t.Any:
    """The ``stream_with_context`` generator of ``response``, or ``None``."""
    stream = getattr(response, "response", None)
    if _STREAM_CODE is not None and getattr(stream, "gi_code", None) is _STREAM_CODE:
        return stream
    return None


def stream_pending(response: t.Any) -> bool:
    """True if ``response`` streams with context and its generator has not
    run yet: Flask 3.1.2-3.1.3 push the contexts again only when the stream
    starts, after the view's pop (earlier versions and 3.2 push them in the
    view, so the view's pop is not their last)."""
    stream = stream_of(response)
    return stream is not None and stream.gi_frame is not None and not stream.gi_running
