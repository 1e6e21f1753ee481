"""Recipe: gevent's own WSGI server.

Run from the repository root::

    python -m examples.pywsgi_server 8000     # or PORT=8000; default 8000

``monkey.patch_all()`` comes first, before anything imports ``socket``,
``threading`` or ``ssl``; then the app (``workapp.py``, a Flask app with
``GeventContext``) is served on 127.0.0.1. SIGTERM stops the server
gracefully.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from examples.workapp import create_app  # noqa: E402

app = create_app()


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8000"))
    server = WSGIServer(("127.0.0.1", port), app)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    print(f"serving on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
