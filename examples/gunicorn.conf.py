"""gunicorn settings for the recipes (``gunicorn -c examples/gunicorn.conf.py APP``).

``PORT`` in the environment picks the port (default 8000).

``GEVENTCTX_PATCH=1`` in the environment makes every plain ``gevent.spawn``
in the worker inherit its spawner's context, without code changes: the
gevent worker calls ``gevent.monkey.patch_all()``, and geventctx's entry
point in gevent's ``gevent.plugins.monkey.did_patch_all`` plugin group then
calls ``geventctx.patch()`` (see ``patched_app.py``). Off by default. To
switch it on here rather than on the command line, uncomment ``raw_env``
below (gunicorn sets it before it starts the workers).
"""

import os

bind = f"127.0.0.1:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
workers = 1  # the example apps keep their reports in memory
worker_connections = 100
graceful_timeout = 5
# raw_env = ["GEVENTCTX_PATCH=1"]
