"""Recipe: a Django view that fans out to greenlets, under gevent.pywsgi.

Run from the repository root::

    python -m examples.django_fanout 8000     # or PORT=8000; default 8000
    curl -H 'Accept-Language: de' http://127.0.0.1:8000/dashboard

A one-module Django project (settings, URLs and views here). The view asks
three "backends" at once through :class:`geventctx.Pool`; each child sees
the view's request and its active language (``LocaleMiddleware`` picked it
from ``Accept-Language``) and builds a link with ``reverse()``. One child
switches itself to French: that stays in that child. With
``geventctx.django.get_wsgi_application()`` each child would also close
the database connections it opened, at its end (this example has no
database: see docs/django.rst).
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import typing as t  # noqa: E402

from django.conf import settings  # noqa: E402

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.middleware.locale.LocaleMiddleware"],
    USE_I18N=True,
    LANGUAGE_CODE="en",
    LANGUAGES=[("en", "English"), ("de", "German"), ("fr", "French")],
    DATABASES={},
    INSTALLED_APPS=[],
)

import gevent  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path, reverse  # noqa: E402
from django.utils import translation  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import geventctx  # noqa: E402
from geventctx.django import get_wsgi_application  # noqa: E402

BACKENDS = ["news", "orders", "stock"]


def ask(request: HttpRequest, backend: str) -> dict[str, t.Any]:
    gevent.sleep(0.01)  # the backend's answer takes a while
    if backend == "stock":
        translation.activate("fr")  # this child's own language, no one else's
    return {
        "backend": backend,
        "path": request.path,  # the view's request
        "language": translation.get_language(),
        "link": reverse("part", args=[backend]),
    }


def dashboard(request: HttpRequest) -> JsonResponse:
    parts = geventctx.Pool(len(BACKENDS)).map(lambda backend: ask(request, backend), BACKENDS)
    return JsonResponse({"language": translation.get_language(), "parts": parts})


def part(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse({"part": name})


urlpatterns = [path("dashboard", dashboard), path("parts/<str:name>", part, name="part")]

application = get_wsgi_application()


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8000"))
    server = WSGIServer(("127.0.0.1", port), application)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    print(f"serving on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
