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

import sys as _sys
import typing as _t

from . import registry
from .errors import (
    BodyReadError,
    BodyTimeout,
    CarryError,
    CarryWarning,
    GeventctxWarning,
    LateEffectWarning,
    MisuseWarning,
    SessionMutationError,
    SessionMutationWarning,
    TaskCancelled,
)
from .executor import Executor, Future
from .handoff import Greenlet, spawn, spawn_later
from .patch import is_patched, unpatch
from .pool import Group, Pool
from .scope import Scope, current_scope
from .taskgroup import TaskGroup
from .threadpool import ThreadPool

if _t.TYPE_CHECKING:
    from .patch import patch
else:
    # The module itself, callable as patch(): ``import geventctx.patch as m``
    # gives the module, ``geventctx.patch()`` patches.
    patch = _sys.modules[__name__ + ".patch"]

__version__ = "0.2.0.dev0"

__all__ = [
    "BodyReadError",
    "BodyTimeout",
    "CarryError",
    "CarryWarning",
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
    "TaskCancelled",
    "TaskGroup",
    "ThreadPool",
    "current_scope",
    "is_patched",
    "patch",
    "registry",
    "spawn",
    "spawn_later",
    "unpatch",
]
