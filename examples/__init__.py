"""Examples and deployment recipes; run them from the repository root.

``workapp.py``        the Flask app (with ``GeventContext``) the recipes serve
``pywsgi_server.py``  ... under ``gevent.pywsgi.WSGIServer``
``gunicorn_app.py``   ... under gunicorn's gevent worker (``gunicorn.conf.py``)
``uwsgi_app.py``      ... under uWSGI's gevent mode (``uwsgi.ini``)
``patched_app.py``    a Flask app without geventctx code, switched on by
                      ``GEVENTCTX_PATCH=1`` under gunicorn ``-k gevent``
``werkzeug_app.py``   a plain Werkzeug app in ``geventctx.wsgi.ContextMiddleware``
``celery_app.py``     declared context from a Flask view to a real Celery worker
                      (self-contained: ``python -m examples.celery_app``)
``app.py``, ``demo.py``  ``make demo``

``tests/test_deploy.py`` runs every recipe as a real server process.
"""
