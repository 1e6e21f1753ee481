"""The Django adapter: Django's WSGI handler behind a request scope (DESIGN G16).

.. code-block:: python

    # wsgi.py of a Django project, served by gunicorn -k gevent
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    from geventctx.django import get_wsgi_application

    application = get_wsgi_application()

The rule: each greenlet releases what it opened, in itself, and each child
starts with its view's Django state as its own.

- **Connections and cache clients.** Django keeps database connections
  greenlet-local (``threading.local`` once gevent patched ``threading``)
  and closes them on ``request_finished``, which sees only the greenlet it
  runs in. So every child — each hand-off kind: ``spawn``, the pools, the
  executor, ``ThreadPool`` tasks, plain greenlets under
  :func:`geventctx.patch` — runs ``connections.close_all()`` and closes the
  cache clients it opened at its end, in its own greenlet or thread (a
  :mod:`geventctx.forks` end; no ``request_finished`` per child: that
  signal runs third-party receivers once per request). The view's own
  connections are released by ``close_old_connections()`` in the server's
  ``close()`` call, in the handler's greenlet, first; the rest of the
  request's end (the response's resource closers, ``request_finished``)
  runs when the request's children have ended, with asgiref's storage
  re-homed to the greenlet that runs it (so ``close_caches`` sees the
  view's cache clients).
- **Django's state follows the view.** The language, time zone, script
  prefix and urlconf (asgiref ``Local`` objects) a child sees at its start
  are its spawner's (G1); what it activates is its own (G2). On asgiref
  3.12+ the storage is re-homed to the child, as asgiref's own ``sync``
  does when it moves work, by the first read in the child; on 3.8 the
  child gets a copy (3.8 writes in place). Cache clients are opened fresh
  in the child, never shared with the view.
- **The body, one consumer at a time.** The request's ``body``, its
  ``POST``/``FILES`` loading, ``read`` and ``readline`` take one
  per-request lock: one consumer parses, the others wait and get what
  Django gives the same reads one after another — never a
  ``RawPostDataException`` for a race, never an empty ``POST``. Under the
  shared body (``body="tee"``, the default) the request reads
  ``wsgi.input`` through a cursor of its own; a child reading
  ``environ["wsgi.input"]`` directly gets the whole body through its own.
- **Traps it can see** are warned about once
  (:class:`~geventctx.MisuseWarning`): Django imported before
  ``gevent.monkey.patch_all()`` (``gunicorn --preload``: every greenlet
  then shares one connection), and an asyncio event loop visible from a
  request's greenlet (a sibling's ``asyncio.run``: the ORM raises
  ``SynchronousOnlyOperation``).

Keyword arguments of :func:`get_wsgi_application` are those of
:class:`geventctx.wsgi.ContextMiddleware` (body mode, straggler limit...).

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import typing as t
import warnings

try:
    import django
    from django.core.handlers.wsgi import WSGIHandler as _DjangoWSGIHandler
    from django.core.handlers.wsgi import WSGIRequest as _DjangoWSGIRequest
except ImportError as exc:  # pragma: no cover - depends on the environment
    # The adapter is the only part that needs Django (DESIGN: framework
    # imports stay in their adapter); say which extra brings it.
    raise ImportError("geventctx.django needs Django: pip install 'geventctx[django]'", name=exc.name) from exc
from contextvars import ContextVar

from gevent.lock import RLock

from . import _django_compat as compat
from . import forks
from .body import ENVIRON_BODY, SharedBody
from .errors import MisuseWarning
from .wsgi import ContextMiddleware

__all__ = ["get_wsgi_application", "WSGIHandler", "WSGIRequest", "DjangoMiddleware"]


# -- Django's state in each child ---------------------------------------------------------

#: The ContextVars of Django's state, and of its cache clients, once Django
#: is set up (``None`` before: nothing to fork yet).
_state: list[ContextVar[t.Any]] | None = None
_caches: ContextVar[t.Any] | None = None


def _django_vars() -> list[ContextVar[t.Any]] | None:
    global _state, _caches
    if _state is None:
        from django.apps import apps

        if not apps.ready:
            return None
        _caches = compat.cache_var()
        _state = compat.state_vars()
    return _state


def _fork_django() -> forks.End | None:
    """The fork, in each child's snapshot (in the spawner): Django's state
    the child's own, no cache client of the spawner's; the end closes what
    the child opened."""
    state = _state if _state is not None else _django_vars()
    if state is None:
        return None
    for var in state:
        value = var.get(None)
        if value is not None:
            own = compat.for_child(value)
            if own is not value:
                var.set(own)
    caches = _caches
    if caches is not None:
        value = caches.get(None)
        if value is not None:
            fresh = compat.empty_like(value)
            if fresh is not value:
                caches.set(fresh)
    return _close_own


def _close_own(error: BaseException | None) -> None:
    """A child's end, in the child: close the database connections and the
    cache clients this greenlet (or thread task) opened."""
    from django.core.cache import caches
    from django.db import connections

    try:
        connections.close_all()
    finally:
        for cache in caches.all(initialized_only=True):
            cache.close()


def _rehome() -> None:
    """Make the running greenlet the owner of the request's Django state
    (asgiref 3.12+; nothing to do before): for the part of a request's end
    that runs in whichever greenlet ended last."""
    state = _django_vars()
    if state is None:
        return
    for var in (*state, _caches):
        if var is None:
            continue
        value = var.get(None)
        if value is not None:
            homed = compat.rehomed(value)
            if homed is not value:
                var.set(homed)


forks.register(_fork_django)


# -- the request: one body consumer at a time ---------------------------------------------


class _Turn(RLock):
    """The body lock of one request; a copy of the request gets its own."""

    def __deepcopy__(self, memo: dict[int, t.Any]) -> _Turn:
        return _Turn()

    def __copy__(self) -> _Turn:
        return _Turn()


class WSGIRequest(_DjangoWSGIRequest):
    """Django's ``WSGIRequest`` whose body consumers take turns (see the
    module's rule). Under the shared body, the request's stream reads
    ``wsgi.input`` through a cursor of its own.

    .. versionadded:: 0.2
    """

    def __init__(self, environ: dict[str, t.Any]) -> None:
        super().__init__(environ)
        shared = environ.get(ENVIRON_BODY)
        if isinstance(shared, SharedBody):
            # One position for the request object, whoever reads through
            # it (the SharedBody as wsgi.input has one per greenlet).
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            stream: t.Any = self.__dict__["_stream"]
            self._stream = type(stream)(shared.cursor(), length)
        self._geventctx_turn = _Turn()

    @property
    def body(self) -> bytes:
        with self._geventctx_turn:
            return t.cast(bytes, _DjangoWSGIRequest.body.fget(self))

    def _load_post_and_files(self) -> None:
        with self._geventctx_turn:
            super()._load_post_and_files()

    def _get_post(self) -> t.Any:
        if not hasattr(self, "_post"):
            with self._geventctx_turn:
                # Another consumer may have parsed it while this one waited.
                if not hasattr(self, "_post"):
                    self._load_post_and_files()
        return self._post

    POST = property(_get_post, _DjangoWSGIRequest._set_post)

    @property
    def FILES(self) -> t.Any:  # noqa: N802 (Django's name)
        if not hasattr(self, "_files"):
            with self._geventctx_turn:
                if not hasattr(self, "_files"):
                    self._load_post_and_files()
        return self._files

    def read(self, *args: t.Any, **kwargs: t.Any) -> bytes:
        with self._geventctx_turn:
            return t.cast(bytes, super().read(*args, **kwargs))

    def readline(self, *args: t.Any, **kwargs: t.Any) -> bytes:
        with self._geventctx_turn:
            return t.cast(bytes, super().readline(*args, **kwargs))


# -- the handler ----------------------------------------------------------------------


class WSGIHandler(_DjangoWSGIHandler):
    """Django's WSGI handler with :class:`WSGIRequest` as its request class;
    the response it returns re-homes the request's Django state to the
    greenlet that closes it, first; warns where a trap is visible (see the
    module's rule).

    .. versionadded:: 0.2
    """

    request_class = WSGIRequest
    _geventctx_checked = False

    def __call__(self, environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]) -> t.Any:
        if not self._geventctx_checked:
            self._geventctx_checked = True
            check_import_order()
        check_no_event_loop()
        response = super().__call__(environ, start_response)
        # Its close() (resource closers, request_finished) may run in the
        # greenlet that ended last: that greenlet owns the request's Django
        # state first.
        compat.close_first(response, _rehome)
        return response


class DjangoMiddleware(ContextMiddleware):
    """:class:`~geventctx.wsgi.ContextMiddleware` for Django: the view's own
    connections are released first, in the handler's greenlet.

    .. versionadded:: 0.2
    """

    def own_end(self, environ: dict[str, t.Any]) -> None:
        from django.db import close_old_connections

        close_old_connections()


def get_wsgi_application(**options: t.Any) -> DjangoMiddleware:
    """What ``django.core.wsgi.get_wsgi_application()`` returns, managed:
    Django set up, its handler (:class:`WSGIHandler`) behind a request scope.
    ``options`` go to :class:`~geventctx.wsgi.ContextMiddleware`.

    .. versionadded:: 0.2
    """
    django.setup(set_prefix=False)
    check_import_order()
    _django_vars()
    return DjangoMiddleware(WSGIHandler(), **options)


# -- traps it can see -------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, MisuseWarning, stacklevel=3)


def check_import_order() -> None:
    """Warn if ``gevent.monkey.patch_all()`` patched ``threading`` after
    Django made its connection storage: every greenlet would share one
    connection ("DatabaseWrapper objects created in a thread can only be
    used in that same thread")."""
    from gevent import monkey
    from gevent.local import local

    if not monkey.is_module_patched("threading"):
        return
    storage = compat.connection_storage()
    if storage is not None and not isinstance(storage, local):
        _warn_once(
            "import-order",
            "Django (django.db) was imported before gevent.monkey.patch_all(): its database "
            "connections are per thread, not per greenlet, so concurrent requests and their "
            "children share one connection. Patch first (no gunicorn --preload with -k gevent; "
            "patch_all() before any import in a custom server).",
        )


def check_no_event_loop() -> None:
    """Warn if an asyncio event loop is running in this thread (a sibling
    greenlet's ``asyncio.run``): Django's ORM then raises
    ``SynchronousOnlyOperation`` in every greenlet of the thread."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None or asyncio._get_running_loop() is None:
        return
    _warn_once(
        "event-loop",
        "an asyncio event loop is running in the thread of this Django request (a greenlet "
        "that called asyncio.run()?): every greenlet of the thread sees it, and Django's ORM "
        "raises SynchronousOnlyOperation. Run asyncio code in a ThreadPool task instead.",
    )
