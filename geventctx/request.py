"""A Werkzeug ``Request`` whose body consumers all read the shared body.

The rule: every way a Werkzeug request reads its body — ``get_data``,
``data``, ``json``, ``form``, ``files``, ``values``, ``stream``,
``input_stream`` — goes through the request's
:class:`~geventctx.body.SharedBody` when there is one, each consumer through
its own cursor; without one, the request is plain Werkzeug.

What follows: ``get_data()`` is the complete raw body for every greenlet
(also for form posts, whoever parsed first), and ``data`` is empty for form
data, as Werkzeug documents; the form is parsed once, by
the first greenlet or thread that asks, while the others wait for its
result (or its error); each greenlet reads ``stream`` and each uploaded file
from its own position. Werkzeug's form parser reads the body in pieces as
it arrives and spools large file parts to disk, exactly as it does alone.

The shared body is made by an adapter (the WSGI middleware for every
request with a body; the Flask extension at a request's first hand-off,
when it swaps the request's class to a subclass of this one): until then a
Flask request is plain Werkzeug, and pays nothing here.

.. versionadded:: 0.2
"""

from __future__ import annotations

import io
import typing as t

from gevent.monkey import get_original

from .body import BODY_GONE, ENVIRON_BODY, SharedBody, SharedFile
from .errors import BodyReadError

__all__ = ["SharedBodyRequest", "shared_body_request_class"]

#: What Werkzeug's form parser reads the body for.
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# The form's "being parsed" mark is taken under a native lock: a ThreadPool
# task and a greenlet may ask at the same moment.
_mark_lock = get_original("_thread", "allocate_lock")()


class _Parsing:
    """The mark of a form parse in progress."""


class SharedBodyRequest:
    """Mixin for a Werkzeug ``Request`` class: read the body through the
    request's shared body. Put it first: ``class R(SharedBodyRequest, Request)``.

    .. versionadded:: 0.2
    """

    environ: dict[str, t.Any]
    shallow: bool

    def shared_body(self) -> SharedBody | None:
        """The request's shared body (made now if an adapter planned one), or ``None``."""
        environ = self.environ
        body = environ.get(ENVIRON_BODY)
        if body is BODY_GONE:
            raise BodyReadError(
                "the request has ended and its body was never read: read it before the response, "
                "or in a child handed the request's context before the response"
            )
        return body if isinstance(body, SharedBody) else None

    @property
    def stream(self) -> t.IO[bytes]:
        body = self.shared_body()
        if body is None:
            return super().stream  # type: ignore[misc,no-any-return]
        return t.cast(t.IO[bytes], body)

    @property
    def input_stream(self) -> t.IO[bytes]:
        body = self.shared_body()
        if body is None:
            return self.environ["wsgi.input"]  # type: ignore[no-any-return]
        return t.cast(t.IO[bytes], body)

    def get_data(
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        body = self.shared_body()
        if body is None:
            return super().get_data(cache, as_text, parse_form_data)  # type: ignore[misc,no-any-return]
        if parse_form_data and self.mimetype in _FORM_TYPES:  # type: ignore[attr-defined]
            # As Werkzeug documents for ``data``: empty for form data, the
            # form parsed instead (and not cached as the raw body, so that
            # get_data() stays the same for every consumer).
            self._load_form_data()
            return "" if as_text else b""
        # The raw body for every consumer, whoever read or parsed first.
        data: bytes | None = getattr(self, "_cached_data", None)
        if data is None:
            data = body.read_whole()
            if cache:
                self._cached_data = data
        return data.decode(errors="replace") if as_text else data

    def _get_stream_for_parsing(self) -> t.IO[bytes]:
        body = self.shared_body()
        if body is None:
            return super()._get_stream_for_parsing()  # type: ignore[misc,no-any-return]
        data = getattr(self, "_cached_data", None)
        if data is not None:
            return io.BytesIO(data)
        return t.cast(t.IO[bytes], body.cursor())  # the parser's own reader, from the first byte

    def close(self) -> None:
        """Close the uploaded files (an adapter's subclass may wait for the
        request's children: the Flask extension's does)."""
        self.close_now()

    def close_now(self) -> None:
        """Close the uploaded files now."""
        files = self.__dict__.get("files")
        for _name, upload in files.items(multi=True) if files is not None else ():
            if isinstance(upload.stream, SharedFile):
                upload.stream.release()
        super().close()  # type: ignore[misc]

    def _load_form_data(self) -> None:
        state = self.__dict__
        if "form" in state:
            return
        body = self.shared_body()
        if body is None:
            super()._load_form_data()  # type: ignore[misc]
            return
        mark = _Parsing()
        while True:
            with _mark_lock:
                if "form" in state:
                    return
                other = state.get("_geventctx_form")
                if other is None:
                    state["_geventctx_form"] = mark
                    break
            if isinstance(other, BaseException):
                raise other  # the first parse's error, for everyone
            # Another greenlet or thread parses: wait for its result.
            body._changes.wait(_form_settled(state, other))
        try:
            super()._load_form_data()  # type: ignore[misc]
        except Exception as exc:
            state["_geventctx_form"] = exc
            raise
        except BaseException:
            # Killed mid-parse: the body is intact, the next consumer parses.
            state.pop("_geventctx_form", None)
            raise
        else:
            for _name, upload in state["files"].items(multi=True):
                upload.stream = SharedFile(upload.stream)
            state.pop("_geventctx_form", None)
        finally:
            body._changes.notify()


def _form_settled(state: dict[str, t.Any], mark: object) -> t.Callable[[], bool]:
    # True once the parse that made ``mark`` has ended, however it ended.
    return lambda: state.get("_geventctx_form") is not mark or "form" in state


def mixed_class(mixin: type, cls: type, key: str) -> type:
    """``cls`` with ``mixin`` in front, made once per class and kept on
    ``cls`` itself under ``key``, so it lives exactly as long."""
    made: type | None = cls.__dict__.get(key)
    if made is None:
        made = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
        setattr(cls, key, made)
    return made


def shared_body_request_class(cls: type) -> type:
    """``cls`` with :class:`SharedBodyRequest` in front, made once per class."""
    if issubclass(cls, SharedBodyRequest):
        return cls
    return mixed_class(SharedBodyRequest, cls, "_geventctx_shared_class")
