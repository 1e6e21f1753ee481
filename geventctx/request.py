"""A Werkzeug ``Request`` whose body consumers all read the shared body.

The rule: every way a Werkzeug request reads its body — ``get_data``,
``data``, ``json``, ``form``, ``files``, ``values``, ``stream``,
``input_stream`` — goes through the request's
:class:`~geventctx.body.SharedBody` when there is one, each consumer through
its own cursor; without one, the request is plain Werkzeug.

What follows: each consumer gets what Werkzeug alone gives it (G5). What
Werkzeug caches (``get_data()``, ``data``, ``json``, the parsed ``form`` and
``files``) is the request's, the same for every greenlet: the form is parsed
once, by the first greenlet or thread that asks, while the others wait for
its result (or its error). Raw readers (``stream``, ``input_stream``, a
:class:`RequestStream`) that run at the same time each read the whole body
from a position of their own, and so does each greenlet an uploaded file.
After a consumer Werkzeug does not cache (a form parse, a stream read to its
end, ``get_data(cache=False)``) a raw read returns what Werkzeug returns
then: ``b""`` (``get_data()`` after a form parse included), and a raw read
that starts while a form parse runs waits for it. ``stream`` can be
assigned, as Werkzeug's: the assigned object is the request's stream from
then on. Werkzeug's form parser reads the body in pieces as
it arrives and spools large file parts to disk, exactly as it does alone.

The shared body is made by an adapter (the WSGI middleware for every
request with a body; the Flask extension at a request's first hand-off,
when it swaps the request's class to a subclass of this one): until then a
Flask request is plain Werkzeug, and pays nothing here.

.. versionadded:: 0.2
"""

from __future__ import annotations

import io
import sys
import typing as t

from gevent.monkey import get_original
from werkzeug.wsgi import LimitedStream

from .body import BODY_GONE, ENVIRON_BODY, BodyCursor, SharedBody, SharedFile, _Reader, reader_key
from .errors import BodyReadError

__all__ = ["SharedBodyRequest", "RequestStream", "shared_body_request_class"]

# The form's "being parsed" mark is taken under a native lock: a ThreadPool
# task and a greenlet may ask at the same moment.
_mark_lock = get_original("_thread", "allocate_lock")()


class RequestStream(_Reader, LimitedStream):
    """A request's ``stream`` and ``input_stream`` over its shared body.

    Each greenlet (or thread task) reads from a position of its own — the
    one it has in the :class:`~geventctx.body.SharedBody`, shared with
    ``wsgi.input`` — so raw readers that run at the same time each get the
    complete body. A greenlet's first raw read starts at the first byte,
    unless a consumer Werkzeug does not cache consumed the body before (a
    form parse, a stream read to its end, ``get_data(cache=False)``): then
    it starts where that consumer stopped (the end: ``b""``), as Werkzeug's
    one stream would; and a first raw read that starts while a form parse
    runs waits for the parse. (A form parse itself starts where its own
    greenlet read the stream to, else at the first byte: the parsed form
    is cached, the same for everyone.)

    A :class:`werkzeug.wsgi.LimitedStream`, as Werkzeug's ``stream``, with
    every read and position its own: its :attr:`limit` is the body's
    length (``sys.maxsize`` while unknown), and the shared body raises its
    own errors (``on_exhausted`` and ``on_disconnect`` are not called).

    .. versionadded:: 0.2
    """

    def __init__(self, body: SharedBody) -> None:
        io.RawIOBase.__init__(self)  # not LimitedStream's: limit and position are the body's
        self.body = body
        self._stream = t.cast(t.IO[bytes], body)
        self._limit_is_max = False
        #: Where a first raw read starts once the body was consumed, or ``None``.
        self.consumed_at: int | None = None
        #: The readers (:func:`~geventctx.body.reader_key`) parsing the form now.
        self.consumers: list[t.Any] = []

    @property
    def limit(self) -> int:  # type: ignore[override]
        length = self.body.length
        if length is None and self.body.loaded:
            length = self.body.received
        return sys.maxsize if length is None else length

    @property
    def _pos(self) -> int:  # type: ignore[override]
        return self.position()

    def position(self) -> int:
        """Where the calling greenlet reads next (for a first read: see the class)."""
        body = self.body
        if body.partial_reader is not None:
            body._check_whole()
        key = reader_key()
        at = body.position_of(key)
        if at is not None:
            return at
        if self.consumers and key not in self.consumers:
            body.changes.wait(lambda: not self.consumers)  # a parse runs: what it leaves
        # From its first read on (before it waits for a byte), the body
        # keeps this reader's bytes.
        start = body.positions[key] = self.consumed_at or 0
        return start

    def consumed(self, key: t.Any, position: int) -> None:
        """A consumer Werkzeug does not cache read the body up to ``position``."""
        if self.consumed_at is None or position > self.consumed_at:
            self.consumed_at = position
        cursors = self.body.positions
        if key in cursors and cursors[key] < position:
            cursors[key] = position

    # The file methods (read, readline, readinto, readall) are the body
    # readers' own (_Reader), at this position:

    @property
    def _body(self) -> SharedBody:  # type: ignore[override]
        return self.body

    def _at(self) -> int:
        return self.position()

    def _move(self, position: int) -> None:
        body = self.body
        key = reader_key()
        body.positions[key] = position
        if body.loaded and position >= body.received:
            self.consumed(key, position)  # read to its end: consumed, as Werkzeug's stream

    def tell(self) -> int:
        return self.position()

    def close(self) -> None:
        """Does nothing: the body belongs to the request."""

    @property
    def closed(self) -> bool:
        return False


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

    def _body_stream(self, body: SharedBody) -> RequestStream:
        # The request's one view of its shared body (made at the first raw read).
        state = self.__dict__
        view: RequestStream | None = state.get("_geventctx_view")
        if view is None or view.body is not body:
            view = state["_geventctx_view"] = RequestStream(body)
        return view

    @property
    def stream(self) -> t.IO[bytes]:
        assigned = self.__dict__.get("_geventctx_stream")
        if assigned is not None:
            return assigned  # type: ignore[no-any-return]
        body = self.shared_body()
        if body is None:
            return super().stream  # type: ignore[misc,no-any-return]
        return t.cast(t.IO[bytes], self._body_stream(body))

    @stream.setter
    def stream(self, value: t.IO[bytes]) -> None:
        # As Werkzeug's cached_property: what is assigned is the stream from
        # now on (a wrapper of the request's stream, say), for every consumer.
        self.__dict__["_geventctx_stream"] = value

    @stream.deleter
    def stream(self) -> None:
        self.__dict__.pop("_geventctx_stream", None)
        self.__dict__.pop("stream", None)

    @property
    def input_stream(self) -> t.IO[bytes]:
        body = self.shared_body()
        if body is None:
            return self.environ["wsgi.input"]  # type: ignore[no-any-return]
        return t.cast(t.IO[bytes], self._body_stream(body))

    def get_data(
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        body = self.shared_body()
        if body is None or "_geventctx_stream" in self.__dict__:
            # Plain Werkzeug (it reads the assigned stream, if any).
            return super().get_data(cache, as_text, parse_form_data)  # type: ignore[misc,no-any-return]
        data: bytes | None = getattr(self, "_cached_data", None)
        if data is None:
            if parse_form_data:
                self._load_form_data()  # as Werkzeug: a form parse leaves b"" to read
            view = self._body_stream(body)
            if cache:
                # Cached, so shared: it consumes nothing of anyone's stream.
                # Only the whole body is cached (what a form parse then
                # reads): what is left after a consumer is not the body.
                start = view.position()
                data = body.read_at(start, -1)
                if start == 0:
                    self._cached_data = data
            else:
                data = view.read()  # not cached: the stream is read to its end, as Werkzeug's
        return data.decode(errors="replace") if as_text else data

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> t.Any:
        """Werkzeug's, but one greenlet or thread parses at a time: a cached
        JSON body is parsed once, the others wait for its result (G5: cached
        consumers make no copy); a failed parse is tried again by the next."""
        body = self.shared_body()
        if body is None or not cache or "_geventctx_stream" in self.__dict__:
            return super().get_json(force, silent, cache)  # type: ignore[misc]
        state = self.__dict__
        mark = _Parsing()
        while True:
            with _mark_lock:
                if self._cached_json[silent] is not Ellipsis:  # type: ignore[attr-defined]
                    break
                other = state.get("_geventctx_json")
                if other is None:
                    state["_geventctx_json"] = mark
                    break
            body.changes.wait(lambda other=other: state.get("_geventctx_json") is not other)  # type: ignore[misc]
        try:
            return super().get_json(force, silent, cache)  # type: ignore[misc]
        finally:
            if state.get("_geventctx_json") is mark:
                del state["_geventctx_json"]
                body.changes.notify()

    def _get_stream_for_parsing(self) -> t.IO[bytes]:
        body = self.shared_body()
        if body is None or "_geventctx_stream" in self.__dict__:
            return super()._get_stream_for_parsing()  # type: ignore[misc,no-any-return]
        data = getattr(self, "_cached_data", None)
        if data is not None:
            return io.BytesIO(data)
        # The parser's own reader, from where this greenlet read the stream
        # to (as Werkzeug's parser reads its one stream), else from the first
        # byte: a form is cached, so it is what one consumer alone would get.
        start = body.position_of(reader_key()) or 0
        cursor = body.cursor(start, parse=True)
        self.__dict__["_geventctx_parser"] = (cursor, start)
        return t.cast(t.IO[bytes], cursor)

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
            body.changes.wait(_form_settled(state, other))
        view = self._body_stream(body)
        view.consumers.append(key := reader_key())
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
            parser: tuple[BodyCursor, int] | None = state.get("_geventctx_parser")
            if parser is not None and state.get("stream") is parser[0] and parser[0].tell() > parser[1]:
                # The parser read the body: consumed, as Werkzeug's stream
                # after a form parse (it does not cache the raw body).
                view.consumed(key, parser[0].tell())
            state.pop("_geventctx_form", None)
        finally:
            parsed = state.pop("_geventctx_parser", None)
            if parsed is not None:
                body.parse_ended(parsed[0])
            view.consumers.remove(key)
            body.changes.notify()


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
