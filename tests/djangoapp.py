"""A Django project in one module, for tests/test_django.py (served by
tests/djangoserver.py under gevent.pywsgi, or by ``gunicorn -k gevent
djangoapp:application``).

Settings: tests/djangosettings.py. Environment: ``DJANGOAPP_DB`` (``name:port`` of a database of the private
PostgreSQL cluster, through psycopg 3; none: no database),
``DJANGOAPP_ADAPTER`` (``1``, the default: ``geventctx.django``; ``0``:
Django's own ``get_wsgi_application()``, the "before" figure).

Views report what they saw as JSON; children are ``geventctx.spawn``
greenlets (and a ``geventctx.ThreadPool`` task), joined or left running.
"""

from __future__ import annotations

import os
import typing as t

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangosettings")

import gevent  # noqa: E402
from django.core.cache import caches  # noqa: E402
from django.core.cache.backends.locmem import LocMemCache  # noqa: E402
from django.db import connection  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.urls import get_script_prefix, get_urlconf, path, reverse, set_script_prefix, set_urlconf  # noqa: E402
from django.utils import timezone, translation  # noqa: E402

import geventctx  # noqa: E402


def _query(seconds: float = 0.0) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s), 1", [seconds])
        return int(cursor.fetchone()[1])


def db_view(request: HttpRequest) -> HttpResponse:
    """A view query, then ``children`` children that each query (half
    joined, half left running past the response), and one ThreadPool task."""
    children = int(request.GET.get("children", "2"))
    linger = float(request.GET.get("linger", "0.2"))
    _query()
    joined = [geventctx.spawn(_query, 0.01) for _ in range(children // 2)]
    for _ in range(children - children // 2):
        geventctx.spawn(_query, linger)
    gevent.joinall(joined, raise_error=True)
    if request.GET.get("thread") == "1":
        pool = _thread_pool()
        pool.spawn(_query, 0.01).get()
    return JsonResponse({"ok": True})


_pool: t.Any = None


def _thread_pool() -> t.Any:
    global _pool
    if _pool is None:
        _pool = geventctx.ThreadPool(2)
    return _pool


def _state() -> dict[str, t.Any]:
    urlconf = get_urlconf()
    return {
        "language": translation.get_language(),
        "timezone": timezone.get_current_timezone_name(),
        "prefix": get_script_prefix(),
        "reverse": reverse("state"),
        "urlconf": getattr(urlconf, "name", urlconf),
        "cache": id(caches["default"]),
    }


def _child_changes() -> dict[str, t.Any]:
    seen = _state()
    translation.activate("fr")
    timezone.activate("Asia/Tokyo")
    set_script_prefix("/child/")
    set_urlconf(None)
    # A grandchild sees its parent's (the child's) state.
    grandchild = geventctx.spawn(_state).get()
    return {"seen": seen, "after": _state(), "grandchild": grandchild}


class AltUrls:
    """A urlconf the view switches to (the child must see it)."""

    name = "alt"
    urlpatterns: list[t.Any] = []


def state_view(request: HttpRequest) -> HttpResponse:
    translation.activate("de")
    timezone.activate("Europe/Berlin")
    view = _state()
    first = geventctx.spawn(_child_changes).get()
    sibling = geventctx.spawn(_state).get()
    task = _thread_pool().spawn(_state).get()
    after = _state()
    set_urlconf(AltUrls)
    in_alt = geventctx.spawn(lambda: getattr(get_urlconf(), "name", None)).get()
    set_urlconf(None)
    return JsonResponse({"view": view, "child": first, "sibling": sibling, "thread": task,
                         "view_after": after, "alt_urlconf": in_alt})


def body_view(request: HttpRequest) -> HttpResponse:
    """``order`` says which consumer the view runs and which a child runs at
    the same time: ``body-post`` (view body, child POST), ``post-body``."""
    order = request.GET.get("order", "body-post")
    results: dict[str, t.Any] = {}

    def consume(kind: str, who: str) -> None:
        try:
            if kind == "body":
                results[who] = {"body": len(request.body)}
            else:
                results[who] = {"post": dict(request.POST.items()), "files": sorted(request.FILES)}
        except Exception as exc:
            results[who] = {"error": type(exc).__name__}

    view_kind, child_kind = order.split("-")
    child = geventctx.spawn(consume, child_kind, "child")
    gevent.sleep(0)  # the child starts first: it consumes while the view does
    consume(view_kind, "view")
    child.join()
    return JsonResponse(results)


def asyncio_view(request: HttpRequest) -> HttpResponse:
    """Start a plain greenlet that runs an asyncio loop for a while."""
    import asyncio

    gevent.spawn(asyncio.run, asyncio.sleep(float(request.GET.get("seconds", "1"))))
    return HttpResponse("started")


def pool_view(request: HttpRequest) -> HttpResponse:
    """The stats of Django's connection pool (``DJANGOAPP_POOL=1``)."""
    pool = connection.pool
    pool.check()  # drops broken connections, so the stats say what is usable
    return JsonResponse(pool.get_stats())


class CountingCache(LocMemCache):
    """A cache client that counts how many were made and closed."""

    made = 0
    closed = 0

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        CountingCache.made += 1

    def close(self, **kwargs: t.Any) -> None:
        CountingCache.closed += 1


def cache_view(request: HttpRequest) -> HttpResponse:
    """The view and ``children`` children each use the cache."""
    caches["default"].set("view", 1)
    def child() -> t.Any:
        return caches["default"].get("view")  # the child's own client

    children = [geventctx.spawn(child) for _ in range(int(request.GET.get("children", "2")))]
    gevent.joinall(children, raise_error=True)
    return JsonResponse({"seen": [child.value for child in children]})


def cache_stats(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"made": CountingCache.made, "closed": CountingCache.closed})


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong")


urlpatterns = [
    path("db", db_view),
    path("state", state_view, name="state"),
    path("body", body_view),
    path("asyncio", asyncio_view),
    path("pool", pool_view),
    path("cache", cache_view),
    path("cache-stats", cache_stats),
    path("ping", ping),
]

if os.environ.get("DJANGOAPP_ADAPTER", "1") == "1":
    from geventctx.django import get_wsgi_application

    application: t.Any = get_wsgi_application(straggler_timeout=None)
else:
    from django.core.wsgi import get_wsgi_application as django_wsgi_application

    application = django_wsgi_application()

