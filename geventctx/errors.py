"""Warnings and errors geventctx raises.

Every warning geventctx emits is a :class:`GeventctxWarning`, so one filter
(``error::geventctx.GeventctxWarning``) turns them all into errors.

.. versionadded:: 0.1
"""

from __future__ import annotations

import errno

from werkzeug.exceptions import RequestTimeout


class GeventctxWarning(UserWarning):
    """Base class of every warning geventctx emits."""


class SessionMutationWarning(GeventctxWarning):
    """The session changed after the response's session was saved.

    The change cannot reach the client any more: it is lost unless the
    application stores it some other way.
    """


class LateEffectWarning(GeventctxWarning):
    """An effect meant for the response arrived after it was sent.

    For example ``after_this_request`` called from a child after the response
    was processed, or a hand-off started from a request that has ended.
    """


class MisuseWarning(GeventctxWarning):
    """geventctx is used in a way that cannot give its guarantees.

    For example spawning from a Flask request of an app that has no
    :class:`geventctx.flask.GeventContext`.
    """


class SessionMutationError(RuntimeError):
    """Raised instead of :class:`SessionMutationWarning` in strict mode."""


class BodyReadError(IOError):
    """Reading the shared request body failed or was abandoned.

    Every consumer of the body gets the same instance of this error (or of the
    error that stopped the read: Werkzeug's ``ClientDisconnected``,
    ``BadRequest``, ``RequestEntityTooLarge``), never a silently short body.
    """


class BodyTimeout(BodyReadError, RequestTimeout):
    """The client sent no body bytes for ``GEVENTCTX_BODY_TIMEOUT`` seconds.

    An HTTP 408 (Werkzeug's ``RequestTimeout``) for a view that lets it
    through; every reader gets this same instance, and the connection is
    closed once the response is written.

    .. versionadded:: 0.2
    """

    def __init__(self, description: str | None = None) -> None:
        RequestTimeout.__init__(self, description)
        # As an OSError: servers that catch socket errors read args[0]
        # as the errno (gevent.pywsgi does).
        self.args = (errno.ETIMEDOUT, self.description)

    def __str__(self) -> str:
        return RequestTimeout.__str__(self)
