"""pytest plugin for Werkzeug's own tests (``make test-werkzeug-suite``).

Loaded in both runs of the tests, so that they differ in one thing only:
with ``GEVENTCTX_WERKZEUG_SUITE=1``, every request body the tests read goes
through geventctx's shared body (:class:`geventctx.body.SharedBody`):

- every ``werkzeug.wrappers.Request`` (and every subclass: ``from_values``,
  ``Request.application``, the apps the test client calls) becomes, once
  built, the subclass with :class:`geventctx.request.SharedBodyRequest` in
  front, as the Flask extension's request does at a first hand-off; at its
  first body read it puts the environ's ``wsgi.input`` behind a shared body
  (:func:`geventctx.body.share_wsgi_input`, its limit the request's
  ``max_content_length``), and ``get_data``, ``data``, ``json``, ``form``,
  ``files``, ``values``, ``stream`` and ``input_stream`` all read through
  it. At the first read, not when built: the ``Request`` Werkzeug's test
  client makes for its own bookkeeping (``response.request``, whose
  environ it reuses to follow a 307 redirect with the body) never reads,
  and keeps its input, as a server's environ outside the app does. A
  shallow request is left alone (Werkzeug forbids it to read);
- ``FormDataParser.parse_from_environ`` (and so ``parse_form_data``)
  shares the environ's input first, so Werkzeug's parser reads the shared
  body (through ``get_input_stream``, which returns it as a terminated input).

Every read that reaches the shared body (``read``/``readline`` of the body,
of a greenlet's position in it or of a parser's cursor) is counted, with
the tests that made one; with ``GEVENTCTX_WERKZEUG_SUITE_COUNT`` set, the
counts are written there as JSON at the end of the session (the harness
fails if no read went through the shared body).
"""

from __future__ import annotations

import json
import os
import typing as t

import pytest

APPLY = os.environ.get("GEVENTCTX_WERKZEUG_SUITE") == "1"
COUNT_FILE = os.environ.get("GEVENTCTX_WERKZEUG_SUITE_COUNT")

#: Reads through a shared body, shared bodies made, and the tests that read.
_counts: dict[str, t.Any] = {"reads": 0, "bodies": 0, "tests": []}


def _shared(environ: t.Any, max_length: t.Callable[[], int | None] | None = None) -> None:
    """Put ``environ``'s input behind a shared body (once per environ)."""
    from geventctx.body import ENVIRON_BODY, share_wsgi_input

    if isinstance(environ, dict) and "wsgi.input" in environ:
        if ENVIRON_BODY not in environ:
            _counts["bodies"] += 1
        share_wsgi_input(environ, max_length)


if APPLY:
    from werkzeug.formparser import FormDataParser
    from werkzeug.wrappers import Request

    from geventctx.body import SharedBody
    from geventctx.request import SharedBodyRequest

    class _SharingAtFirstRead(SharedBodyRequest):
        """Every body consumer asks for the shared body first: make it then."""

        def shared_body(self) -> SharedBody | None:
            if not self.shallow:
                # The request's own limit, asked at the first read (as an adapter does).
                _shared(self.environ, lambda: self.max_content_length)  # type: ignore[attr-defined]
            return super().shared_body()

    def _sharing_class(cls: type) -> type:
        # Made once per class and kept on it, as shared_body_request_class does.
        made: type | None = cls.__dict__.get("_geventctx_suite_class")
        if made is None:
            made = type(cls.__name__, (_SharingAtFirstRead, cls), {"__module__": cls.__module__})
            cls._geventctx_suite_class = made  # type: ignore[attr-defined]
        return made

    _original_init = Request.__init__

    def _init_sharing(self: Request, environ: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
        _original_init(self, environ, *args, **kwargs)
        if not isinstance(self, SharedBodyRequest):
            self.__class__ = _sharing_class(type(self))

    Request.__init__ = _init_sharing  # type: ignore[method-assign]

    _original_parse_from_environ = FormDataParser.parse_from_environ

    def _parse_from_environ_sharing(self: FormDataParser, environ: t.Any) -> t.Any:
        _shared(environ, lambda: self.max_content_length)
        return _original_parse_from_environ(self, environ)

    FormDataParser.parse_from_environ = _parse_from_environ_sharing  # type: ignore[method-assign]

    # Every reader of a shared body (the body as a file, a BodyCursor) reads
    # through these: at a position, by line, or (a lone form parse)
    # straight off the input.
    _original_read_at = SharedBody.read_at
    _original_readline_at = SharedBody._readline_at
    _original_read_through = SharedBody._read_through

    def read_at(self: SharedBody, position: int, size: int | None) -> bytes:
        _counts["reads"] += 1
        return _original_read_at(self, position, size)

    def _readline_at(self: SharedBody, position: int, size: int | None) -> bytes:
        _counts["reads"] += 1
        return _original_readline_at(self, position, size)

    def _read_through(self: SharedBody, cursor: t.Any, size: int) -> bytes | None:
        data = _original_read_through(self, cursor, size)
        if data is not None:
            _counts["reads"] += 1
        return data

    SharedBody.read_at = read_at  # type: ignore[method-assign]
    SharedBody._readline_at = _readline_at  # type: ignore[method-assign]
    SharedBody._read_through = _read_through  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> t.Generator[None, object, object]:
    before = _counts["reads"]
    try:
        return (yield)
    finally:
        if _counts["reads"] > before:
            _counts["tests"].append(item.nodeid)


def pytest_report_header(config: pytest.Config) -> str:
    return f"geventctx werkzeug-suite plugin: every request body read through SharedBody = {APPLY}"


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if APPLY:
        terminalreporter.write_line(
            f"geventctx: {_counts['reads']} reads through {_counts['bodies']} shared bodies, "
            f"in {len(_counts['tests'])} tests"
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if COUNT_FILE:
        with open(COUNT_FILE, "w") as out:
            json.dump(_counts, out, indent=1)
