"""Recipe: uWSGI's gevent mode.

Run from the repository root::

    uwsgi --ini examples/uwsgi.ini          # PORT=... to change 8000

or, spelled out::

    uwsgi --http-socket 127.0.0.1:8000 --gevent 100 --gevent-early-monkey-patch \\
          --master --processes 1 --die-on-term --need-app \\
          --wsgi-env-behavior holy --module examples.uwsgi_app:application

``--gevent 100`` runs each request in a greenlet of uWSGI's gevent loop (up
to 100 at once); ``--gevent-early-monkey-patch`` calls
``gevent.monkey.patch_all()`` before the app is imported (so
``GEVENTCTX_PATCH=1`` works here too); ``--die-on-term`` makes SIGTERM stop
uWSGI instead of reloading it. ``--wsgi-env-behavior holy`` gives each
request an environ of its own: by default uWSGI reuses one per async core
and clears it once the response was sent, so a child that reads
``request.headers`` after the response would see a later request's
headers (``tests/test_deploy.py`` shows it).

The app is ``workapp.py``, a Flask app with ``GeventContext``, as is.
"""

from examples.workapp import create_app

application = create_app()
