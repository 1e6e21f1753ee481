"""Say in every log record which request, and which spawn line, it comes from.

A record emitted in a child handed a request's context carries the request
(``"POST /orders"``, the scope's label) and the child's spawn site
(``"views.py:42"``, the user's line that started it); a record of the
request's own greenlet carries the request and ``"-"``; outside any request
both are ``"-"``. Read where the record is made: in the emitting greenlet,
from its context and its hand-off record — nothing is stored per request.

Stdlib logging, with :class:`RequestFilter` on a handler (or a logger)::

    handler.addFilter(geventctx.logging.RequestFilter())
    handler.setFormatter(logging.Formatter(
        "%(geventctx_request)s %(geventctx_site)s %(message)s"))

structlog, with :func:`add_request` among the processors::

    structlog.configure(processors=[geventctx.logging.add_request, ...])

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t

from greenlet import getcurrent

from . import registry
from ._site import format_site
from .scope import _PENDING, _SCOPE

__all__ = ["RequestFilter", "add_request", "request_and_site", "NONE"]

#: What a record carries where there is no request, or no hand-off.
NONE = "-"


def request_and_site() -> tuple[str, str]:
    """(request label, spawn site) of the running greenlet, ``"-"`` where none."""
    scope = _SCOPE.get()
    if scope is None:
        scope = _PENDING.get()  # a request that has not handed off: its adapter's state has its label
    request = (scope.label or NONE) if scope is not None else NONE
    record = registry.record_of(getcurrent())
    site = format_site(record.site) if record is not None else NONE
    return request, site


class RequestFilter(logging.Filter):
    """Adds ``geventctx_request`` and ``geventctx_site`` to every record it
    sees (it never drops one).

    .. versionadded:: 0.2
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.geventctx_request, record.geventctx_site = request_and_site()
        return True


def add_request(logger: t.Any, method_name: str, event_dict: dict[str, t.Any]) -> dict[str, t.Any]:
    """A structlog processor: adds ``request`` and ``spawn_site`` (kept if set).

    .. versionadded:: 0.2
    """
    request, site = request_and_site()
    event_dict.setdefault("request", request)
    event_dict.setdefault("spawn_site", site)
    return event_dict
