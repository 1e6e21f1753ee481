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


class TaskCancelled(Exception):
    """``get()`` of a :class:`~geventctx.TaskGroup` task that its group killed.

    The group kills its tasks when it stops (a task or the block failed, the
    deadline passed, ``cancel()``); each task saw a plain ``GreenletExit``,
    as from any gevent kill, and its ``value`` is that ``GreenletExit``.
    ``get()`` raises this instead of returning it, chained from it: an
    ``Exception``, so a view that lets it through gets a 500 like any error.
    A task killed by your own ``kill()`` keeps gevent's rule (``get()``
    returns the ``GreenletExit``).

    .. versionadded:: 0.2
    """


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


class CarryError(ValueError):
    """A declared context value cannot travel with a Celery task.

    Raised by the publish (``.delay()``, ``.apply_async()``, a canvas) before
    anything is sent, when a value fails its codec or is not JSON-safe, or
    when the encoded header is over ``max_header_bytes``. With
    ``install(app, on_error="warn")`` a :class:`CarryWarning` is emitted
    instead and the task is sent without what could not travel.

    .. versionadded:: 0.2
    """


class CarryWarning(GeventctxWarning):
    """Declared context did not travel with a Celery task, in part or whole.

    At publish with ``on_error="warn"`` (what could not travel is left out),
    or in the worker for a header it cannot read (the task runs without the
    carried values).

    .. versionadded:: 0.2
    """
