"""tests/dbapp.py under gevent.pywsgi, the way the pywsgi recipe serves an
app: ``monkey.patch_all()`` first, before anything imports ``socket`` or
``select`` (psycopg 3 chooses its gevent-aware wait function at import, by
asking ``gevent.monkey`` whether ``select`` is patched; ``python -m
gevent.monkey`` would run the patching module as ``__main__`` and psycopg
would not see it), then the app on 127.0.0.1:$PORT until SIGTERM.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import signal  # noqa: E402

import gevent  # noqa: E402
from dbapp import app  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402


def main() -> None:
    server = WSGIServer(("127.0.0.1", int(os.environ["PORT"])), app, log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
