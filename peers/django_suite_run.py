"""Run Django's ``tests/runtests.py`` (the working directory), with
:mod:`geventctx.django`'s handler and request class substituted for
Django's own when ``GEVENTCTX_DJANGO_SUITE=1`` (peers/django_suite.py).

The substitution happens before Django's test modules import them:
``django.core.handlers.wsgi.WSGIHandler`` and ``WSGIRequest`` (and the
names ``django.core.wsgi`` and ``django.test.client`` imported) are the
adapter's subclasses, so the test client, ``RequestFactory`` and every
test that builds a handler use them. At exit it prints how many requests
of the adapter's class were made (0 would mean the suite judged nothing).
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import typing as t

made = 0

if os.environ.get("GEVENTCTX_DJANGO_SUITE") == "1":
    import django.core.handlers.wsgi as handlers_wsgi
    import django.core.wsgi as core_wsgi
    import django.test.client as test_client

    import geventctx.django as adapter

    class WSGIRequest(adapter.WSGIRequest):
        # Named as Django's: its repr() names the class (test_wsgirequest_repr).
        def __init__(self, environ: dict[str, t.Any]) -> None:
            global made
            made += 1
            super().__init__(environ)

    class Handler(adapter.WSGIHandler):
        request_class = WSGIRequest

    handlers_wsgi.WSGIRequest = WSGIRequest  # type: ignore[misc]
    handlers_wsgi.WSGIHandler = Handler  # type: ignore[misc]
    core_wsgi.WSGIHandler = Handler  # type: ignore[misc]
    test_client.WSGIRequest = WSGIRequest  # type: ignore[misc]

    @atexit.register
    def report() -> None:
        print(f"geventctx.django substituted: {made} requests", flush=True)


sys.argv = ["runtests.py", *sys.argv[1:]]
sys.path.insert(0, os.getcwd())
runpy.run_path("runtests.py", run_name="__main__")
