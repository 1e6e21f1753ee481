"""Extensions that keep per-context state in ``g``, and ``g`` across nested
hand-offs, over a real gevent.pywsgi server on 127.0.0.1 (issue 24; DESIGN G3, G4, G13).

Flask-Babel keeps the request's locale in one mutable object in ``g``
(``g._flask_babel``): ``force_locale`` in a child must stay in that child,
and the request's own locale must not change. A child's ``g`` reads through
to the view's, its own names stay its own, and a hand-off it made still
reads through it after the child ended and its app context was torn down.
These run in this process (no database, no monkey-patching needed): the
children yield with ``gevent.sleep`` where a real one would do I/O.
"""

from __future__ import annotations

import datetime
import typing as t

import gevent
from flask import Flask, g, jsonify, request
from flask_babel import Babel, force_locale, format_date, get_locale
from gevent.event import Event

import geventctx
from geventctx.flask import GeventContext

DAY = datetime.date(2026, 12, 5)  # a Saturday
SATURDAY = {"de": "Samstag", "fr": "samedi", "es": "sábado", "it": "sabato", "pt": "sábado", "en": "Saturday"}


def babel_app() -> Flask:
    app = Flask("babel")
    Babel(app, locale_selector=lambda: request.args.get("lang", "en"))
    GeventContext(app)

    def render(lang: str) -> dict[str, t.Any]:
        seen = []
        with force_locale(lang):
            for _ in range(3):  # the siblings force theirs in between
                seen.append(str(get_locale()))
                gevent.sleep(0.005)
            day = format_date(DAY, "EEEE")
        return {"asked": lang, "seen": seen, "day": day}

    @app.get("/")
    def view() -> t.Any:
        before = str(get_locale())
        children = geventctx.Pool(4).map(render, ["de", "fr", "es", "it"])
        return jsonify(before=before, children=children, after=str(get_locale()),
                       day=format_date(DAY, "EEEE"))

    @app.get("/first")
    def children_first() -> t.Any:
        # The children are the first to ask for a locale: each must get its
        # own object, not fill in the view's.
        children = geventctx.Pool(4).map(render, ["de", "fr", "es", "it"])
        return jsonify(children=children, after=str(get_locale()), day=format_date(DAY, "EEEE"))

    return app


def check_children(children: list[dict[str, t.Any]]) -> None:
    for child in children:
        lang = child["asked"]
        assert child["seen"] == [lang] * 3, child
        assert child["day"] == SATURDAY[lang], child


def test_flask_babel_force_locale_in_concurrent_children_stays_in_each_child(serve: t.Any) -> None:
    server = serve(babel_app())
    for _ in range(3):
        response = server.request("GET", "/?lang=pt")
        assert response.status == 200, response.body
        answer = response.json()
        check_children(answer["children"])
        # The request's own locale, before and after the children forced theirs.
        assert (answer["before"], answer["after"], answer["day"]) == ("pt", "pt", SATURDAY["pt"]), answer


def test_flask_babel_children_asking_first_leave_the_request_its_own_locale(serve: t.Any) -> None:
    server = serve(babel_app())
    response = server.request("GET", "/first?lang=pt")
    assert response.status == 200, response.body
    answer = response.json()
    check_children(answer["children"])
    assert (answer["after"], answer["day"]) == ("pt", SATURDAY["pt"]), answer


def test_nested_hand_off_reads_through_its_parents_g_after_that_parents_teardown(serve: t.Any) -> None:
    # view sets g.a; its child sets g.b and hands off to a grandchild, then
    # ends (its own app context is torn down); the grandchild, running on,
    # still reads g.a (the view's) and g.b (the child's) and sets g.c. No
    # name set below ever shows in a g above.
    app = Flask("nested")
    GeventContext(app)
    torn_down = Event()
    seen: dict[str, t.Any] = {}
    done = Event()

    @app.teardown_appcontext
    def note_teardown(exc: BaseException | None = None) -> None:
        if g.get("b") == "child" and "c" not in g:  # the child's own context
            torn_down.set()

    def grandchild() -> None:
        try:
            seen["child torn down first"] = torn_down.wait(2)
            seen["grandchild reads"] = (g.get("a"), g.get("b"))
            g.c = "grandchild"
        finally:
            done.set()

    def child() -> None:
        g.b = "child"
        geventctx.spawn(grandchild)  # fire-and-forget, outlives this child
        seen["child sees"] = (g.get("a"), g.get("b"))

    @app.get("/")
    def view() -> t.Any:
        g.a = "view"
        geventctx.spawn(child).join()
        return jsonify(view_sees=[name for name in ("a", "b", "c") if name in g])

    server = serve(app)
    response = server.request("GET", "/")
    assert response.status == 200, response.body
    assert done.wait(5), seen
    assert response.json() == {"view_sees": ["a"]}, "a child's own name reached the view's g"
    assert seen == {
        "child sees": ("view", "child"),
        "child torn down first": True,
        "grandchild reads": ("view", "child"),
    }, seen


def test_a_g_name_registered_for_forking_is_a_copy_in_each_child(serve: t.Any) -> None:
    # An extension's per-context state kept in one mutable object in g:
    # registered with fork_g, each child changes a copy of its own, the
    # view's object stays as it was.
    from types import SimpleNamespace

    from geventctx.flask import fork_g, unfork_g

    app = Flask("forked")
    GeventContext(app)

    def child(name: str) -> list[str]:
        seen = []
        g.cart.owner = name
        for _ in range(3):  # the siblings set theirs in between
            gevent.sleep(0.005)
            seen.append(g.cart.owner)
        return seen

    @app.get("/")
    def view() -> t.Any:
        g.cart = SimpleNamespace(owner="view")
        names = ["a", "b", "c", "d"]
        seen = geventctx.Pool(4).map(child, names)
        return jsonify(children=dict(zip(names, seen, strict=True)), view=g.cart.owner)

    fork_g("cart")
    try:
        response = serve(app).request("GET", "/")
    finally:
        unfork_g("cart")
    assert response.status == 200, response.body
    assert response.json() == {
        "children": {name: [name] * 3 for name in "abcd"},
        "view": "view",
    }, response.json()
