"""tests/djangoapp.py under gevent.pywsgi: ``monkey.patch_all()`` first (as
the pywsgi recipe does), then the app on 127.0.0.1:$PORT until SIGTERM.
With ``DJANGOAPP_EARLY=1`` Django is imported *before* patching: the trap
``geventctx.django`` warns about (what ``gunicorn --preload`` does).
"""

import os

if os.environ.get("DJANGOAPP_EARLY") == "1":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangosettings")
    import django.db  # noqa: F401

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402

import gevent  # noqa: E402
from djangoapp import application  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402


def main() -> None:
    server = WSGIServer(("127.0.0.1", int(os.environ["PORT"])), application, log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
