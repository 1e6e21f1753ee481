"""geventctx: hand the active context to the greenlets a gevent view spawns.

.. code-block:: python

    import geventctx

    @app.route("/report")
    def report():
        geventctx.spawn(build_report)   # sees request, g, session, your contextvars
        return "started"

The package imports without Flask; the Flask extension lives in
:mod:`geventctx.flask` and the WSGI middleware in :mod:`geventctx.wsgi`.
"""

from __future__ import annotations

from . import registry
from .errors import (
    BodyReadError,
    BodyTimeout,
    GeventctxWarning,
    LateEffectWarning,
    MisuseWarning,
    SessionMutationError,
    SessionMutationWarning,
)
from .executor import Executor, Future
from .handoff import Greenlet, spawn, spawn_later
from .patch import is_patched, patch, unpatch
from .pool import Group, Pool
from .scope import Scope, current_scope
from .threadpool import ThreadPool

__version__ = "0.1.0"

__all__ = [
    "BodyReadError",
    "BodyTimeout",
    "Executor",
    "Future",
    "GeventctxWarning",
    "Greenlet",
    "Group",
    "LateEffectWarning",
    "MisuseWarning",
    "Pool",
    "Scope",
    "SessionMutationError",
    "SessionMutationWarning",
    "ThreadPool",
    "current_scope",
    "is_patched",
    "patch",
    "registry",
    "spawn",
    "spawn_later",
    "unpatch",
]
