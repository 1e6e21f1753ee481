"""Spot hand-offs from a Flask request that geventctx does not manage.

Spawning from a request of an app without :class:`geventctx.flask.GeventContext`
still gives the child the context, but nothing holds the request open for
it: teardown may run while the child still uses ``request`` or ``g``. That
deserves one clear warning per app. This module never imports Flask: it
only looks at it if the application already did.
"""

from __future__ import annotations

import sys
import typing as t
import warnings
import weakref

from ._site import Site, format_site
from .errors import MisuseWarning

_warned: weakref.WeakSet[t.Any] = weakref.WeakSet()


def check_unmanaged(site: Site | None, child: t.Any = None) -> None:
    """Warn once per app if a Flask request context is active but unmanaged.

    ``child``: a geventctx greenlet whose record holds its site (read only
    if there is a warning to give)."""
    flask = sys.modules.get("flask")
    # Flask's public API only: the same on every Flask version.
    if flask is None or not hasattr(flask, "has_request_context") or not flask.has_request_context():
        return
    app = flask.current_app._get_current_object()
    if "geventctx" in app.extensions or app in _warned:
        return
    _warned.add(app)
    if child is not None:
        from .registry import site_of_child

        site = site_of_child(child)
    warnings.warn_explicit(
        f"geventctx.spawn at {format_site(site)} runs in a request of Flask app "
        f"{app.name!r}, which has no geventctx.flask.GeventContext: the child "
        "sees the request, but its teardown will not wait for the child. "
        "Call GeventContext(app) (or .init_app(app)) where the app is created.",
        MisuseWarning,
        site[0] if site else "<unknown>",
        site[1] if site else 0,
    )
