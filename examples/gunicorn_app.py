"""Recipe: gunicorn's gevent worker.

Run from the repository root::

    gunicorn -c examples/gunicorn.conf.py examples.gunicorn_app:app   # PORT=8000 by default

The worker (``worker_class = "gevent"`` in the config) calls
``gevent.monkey.patch_all()`` before it imports this module, so the app needs
nothing gunicorn-specific: it is ``workapp.py``, a Flask app with
``GeventContext``, as is.
"""

from examples.workapp import create_app

app = create_app()
