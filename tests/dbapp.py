"""A Flask app with real databases and the extensions that keep state on the
app context, run as a real server process for tests/test_databases.py and
the P10 benchmark (issue 24; DESIGN G3, G4).

Served the way users deploy gevent apps, so that every driver yields to the
hub on its socket (pg8000 through the patched ``socket``; psycopg 3 picks
its gevent-aware wait function when ``select`` is patched at import):

- pywsgi: ``python tests/dbserver.py`` (``patch_all()``, then this app in
  a ``WSGIServer`` on 127.0.0.1:$PORT);
- gunicorn: ``gunicorn -k gevent --pythonpath tests dbapp:app``.

Configured by the environment: ``DBAPP_URL`` (a SQLAlchemy URL: PostgreSQL
through ``pg8000`` or ``psycopg``, or SQLite), ``DBAPP_POOL_SIZE`` /
``DBAPP_MAX_OVERFLOW`` / ``DBAPP_POOL_TIMEOUT`` / ``DBAPP_PRE_PING`` (on
unless ``0``) for every engine, and
``GEVENTCTX_PATCH=1`` for ``patch()`` (gevent's plugin event turns it on).
The database is new and empty: the tables are made and 20 users with 4
sections each are seeded at import. Each resource pattern has an engine (a
pool) of its own, and on PostgreSQL an ``application_name`` of its own, so
that its connections are counted apart:

``fsa``
    Flask-SQLAlchemy's ``db.session`` (keyed on the app context).
    ``GET /fsa/map/<uid>?via=pool|executor|inline&first=view|children``:
    children read the user's 4 section titles (``geventctx.Pool(4).map`` or
    ``geventctx.Executor``), after the view loaded the user or before. ``POST /fsa/audit/<tag>?uid=``: a
    fire-and-forget child writes an audit row while the view goes on
    querying. ``POST /fsa/rollback/<tag>?child_first=0|1``: the view adds an
    order and rolls it back while a fire-and-forget child adds and commits
    an audit row, one before the other.
``scoped_app`` / ``scoped_default``
    Flask's documented ``scoped_session`` pattern ("SQLAlchemy in Flask"),
    ``remove()`` in ``teardown_appcontext``: keyed on the app context
    (``scopefunc``), and with its default (thread-local, greenlet-local
    under ``patch_all``). ``GET /<name>/map/<uid>`` (joined children),
    ``POST /scoped_app/audit/<tag>`` (a child that outlives the view).
``getdb``
    The Flask tutorial's ``get_db()``: a connection kept in ``g``, closed
    by ``teardown_appcontext`` with ``g.pop("db", None)``.
    ``GET /getdb/map/<uid>``: children open theirs, then the view its own.
    ``POST /getdb/audit/<tag>``: a child writes through the view's.
``resource``
    A connection opened in ``before_request`` and closed in
    ``teardown_request``. ``POST /resource/audit/<tag>``: a fire-and-forget
    child writes through it after the response.
Flask-Login (user loader through ``db.session``)
    ``POST /login/<name>``; ``GET /dashboard?tag=`` (``login_required``: 4
    section reads by children, a background audit write);
    ``GET /whoami?tag=`` (no ``login_required``: the children touch
    ``current_user`` first).
``GET /ccrc/map/<uid>``
    ``copy_current_request_context`` + plain ``gevent.spawn`` (the code
    ``patch()`` users already have); answers the sessions each used.
``flask fanout <uid>`` (run by tests/dbcli.py)
    A CLI command: the same fan-out and audit write in an app context
    without a request.
``GET /_stats``
    Connections checked out per pattern, and every error or warning logged
    (geventctx, SQLAlchemy, Flask, ``warnings``) since the start.
"""

from __future__ import annotations

import json
import logging
import os
import typing as t

import click
import gevent
import sqlalchemy as sa
from flask import Flask, copy_current_request_context, g, jsonify, request
from flask.globals import app_ctx
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from flask_sqlalchemy import SQLAlchemy
from pgkit import checked_out
from sqlalchemy.orm import scoped_session, sessionmaker

import geventctx
from geventctx.flask import GeventContext

URL = os.environ.get("DBAPP_URL", "sqlite:///dbapp.sqlite")
SQLITE = URL.startswith("sqlite")
USERS = 20
SECTIONS = 4
#: What a child's "remote call" costs (a geo lookup, a payment service): a
#: point where the hub runs others, on every driver, SQLite's included.
REMOTE_CALL = 0.005


def engine_options(name: str) -> dict[str, t.Any]:
    options: dict[str, t.Any] = {
        "pool_size": int(os.environ.get("DBAPP_POOL_SIZE", "10")),
        "max_overflow": int(os.environ.get("DBAPP_MAX_OVERFLOW", "10")),
        "pool_timeout": float(os.environ.get("DBAPP_POOL_TIMEOUT", "10")),
        # Flask-SQLAlchemy's docs recommend it against stale connections;
        # it also makes every checkout a round trip (a yield to the hub),
        # on psycopg 3 too, which otherwise serialises queries on one
        # connection and only yields when the pool has to connect.
        "pool_pre_ping": os.environ.get("DBAPP_PRE_PING", "1") == "1",
    }
    if not SQLITE:
        options["connect_args"] = {"application_name": name}
    return options


def make_engine(name: str) -> sa.Engine:
    return sa.create_engine(URL, **engine_options(name))


if SQLITE:

    @sa.event.listens_for(sa.Engine, "connect")
    def _sqlite_pragmas(dbapi_connection: t.Any, _record: t.Any) -> None:
        # Every engine's connections (Flask-SQLAlchemy's too): readers never
        # wait for the writer (WAL); a writer waits for another up to 5 s.
        dbapi_connection.execute("PRAGMA journal_mode=WAL")


# -- the app, its errors -------------------------------------------------------------

app = Flask("dbapp")
app.config.update(
    SECRET_KEY="dbapp",
    SQLALCHEMY_DATABASE_URI=URL,
    SQLALCHEMY_ENGINE_OPTIONS=engine_options("fsa"),
)
GeventContext(app)

#: Every warning or error logged in this process (geventctx's child errors,
#: Flask's unhandled view errors, SQLAlchemy's pool, ``warnings``), first
#: lines only; the whole record also goes to stderr (the test's server log).
problems: list[str] = []


class _Remember(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        problems.append(f"{record.name}: {record.getMessage()}"[:500])


logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
logging.getLogger().addHandler(_Remember(logging.WARNING))
logging.captureWarnings(True)


# -- Flask-SQLAlchemy ----------------------------------------------------------------

db = SQLAlchemy(app)


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(40), unique=True, nullable=False)


class Section(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "sections"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False)
    position = db.Column(db.Integer, nullable=False)
    title = db.Column(db.String(80), nullable=False)


class Audit(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "audits"
    id = db.Column(db.Integer, primary_key=True)
    tag = db.Column(db.String(80), nullable=False)
    user_name = db.Column(db.String(40), nullable=False)
    what = db.Column(db.String(40), nullable=False)


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"
    id = db.Column(db.Integer, primary_key=True)
    tag = db.Column(db.String(80), nullable=False)


def section_id(user_id: int, position: int) -> int:
    return (user_id - 1) * SECTIONS + position + 1


def title_of(user_name: str, position: int) -> str:
    return f"{user_name}: section {position}"


with app.app_context():
    db.create_all()
    if db.session.execute(sa.select(sa.func.count(User.id))).scalar_one() == 0:
        for n in range(1, USERS + 1):
            db.session.add(User(id=n, name=f"user{n}"))
        db.session.flush()
        for n in range(1, USERS + 1):
            for k in range(SECTIONS):
                db.session.add(Section(id=section_id(n, k), user_id=n, position=k, title=title_of(f"user{n}", k)))
        db.session.commit()


def fsa_title(sid: int) -> str:
    return str(db.session.execute(sa.select(Section.title).where(Section.id == sid)).scalar_one())


@app.get("/fsa/map/<int:uid>")
def fsa_map(uid: int) -> t.Any:
    # first=view: the view's Session holds a connection before the fan-out;
    # first=children: the children are the first to use a Session.
    user = db.session.get(User, uid) if request.args.get("first", "view") == "view" else None
    ids = [section_id(uid, k) for k in range(SECTIONS)]
    via = request.args.get("via", "pool")
    if via == "pool":
        titles = geventctx.Pool(4).map(fsa_title, ids)
    elif via == "executor":
        with geventctx.Executor(max_workers=4) as executor:
            titles = list(executor.map(fsa_title, ids))
    else:
        titles = [fsa_title(sid) for sid in ids]
    again = db.session.get(User, uid)
    return jsonify(user=(user or again).name, titles=titles, again=again.name)


def fsa_audit(tag: str, what: str) -> None:
    db.session.add(Audit(tag=tag, user_name=g.user_name, what=what))
    gevent.sleep(REMOTE_CALL)  # say, a geo lookup for the audit line
    db.session.commit()


@app.post("/fsa/audit/<tag>")
def fsa_audit_view(tag: str) -> t.Any:
    user = db.session.get(User, int(request.args["uid"]))
    g.user_name = user.name  # the child reads it through its own g
    geventctx.spawn(fsa_audit, tag, "audit")
    titles = [fsa_title(section_id(user.id, k)) for k in range(SECTIONS)]
    return jsonify(user=user.name, titles=titles)


@app.post("/fsa/rollback/<tag>")
def fsa_rollback(tag: str) -> t.Any:
    # The view's unit of work fails and is rolled back; the child's audit
    # line is a unit of its own and must stay, whichever ends first.
    child_first = request.args.get("child_first") == "1"
    g.user_name = "rollback"

    def audit() -> None:
        db.session.add(Audit(tag=tag, user_name=g.user_name, what="rollback"))
        gevent.sleep(REMOTE_CALL if child_first else 10 * REMOTE_CALL)
        db.session.commit()

    geventctx.spawn(audit)
    db.session.add(Order(tag=tag))
    gevent.sleep(10 * REMOTE_CALL if child_first else REMOTE_CALL)  # the payment call, which fails
    db.session.rollback()
    return jsonify(rolled_back=tag)


# -- Flask's scoped_session pattern, two ways ----------------------------------------

scoped_app = scoped_session(
    sessionmaker(bind=make_engine("scoped_app")),
    # One line: a session per app context (each child has one of its own).
    scopefunc=lambda: id(app_ctx._get_current_object()),
)
scoped_default = scoped_session(sessionmaker(bind=make_engine("scoped_default")))  # greenlet-local
SCOPED = {"scoped_app": scoped_app, "scoped_default": scoped_default}


@app.teardown_appcontext
def remove_scoped_sessions(exc: BaseException | None = None) -> None:
    scoped_app.remove()
    scoped_default.remove()


TITLE_SQL = sa.text("SELECT title FROM sections WHERE id = :id")
NAME_SQL = sa.text("SELECT name FROM users WHERE id = :id")
AUDIT_SQL = sa.text("INSERT INTO audits (tag, user_name, what) VALUES (:tag, :user_name, :what)")


@app.get("/<any(scoped_app, scoped_default):name>/map/<int:uid>")
def scoped_map(name: str, uid: int) -> t.Any:
    registry = SCOPED[name]
    user = registry().execute(NAME_SQL, {"id": uid}).scalar_one()

    def title(sid: int) -> str:
        return str(registry().execute(TITLE_SQL, {"id": sid}).scalar_one())

    titles = geventctx.Pool(4).map(title, [section_id(uid, k) for k in range(SECTIONS)])
    return jsonify(user=user, titles=titles)


@app.get("/<any(scoped_app, scoped_default):name>/outlived/<int:uid>")
def scoped_outlived(name: str, uid: int) -> t.Any:
    # The view uses the session, a child outlives it: the request's teardown
    # runs after the child, in another greenlet.
    user = SCOPED[name]().execute(NAME_SQL, {"id": uid}).scalar_one()
    geventctx.spawn(gevent.sleep, 10 * REMOTE_CALL)
    return jsonify(user=user)


@app.post("/scoped_app/audit/<tag>")
def scoped_app_audit(tag: str) -> t.Any:
    user = scoped_app().execute(NAME_SQL, {"id": int(request.args["uid"])}).scalar_one()

    def audit() -> None:
        gevent.sleep(10 * REMOTE_CALL)  # after the response
        session = scoped_app()
        session.execute(AUDIT_SQL, {"tag": tag, "user_name": user, "what": "scoped_app"})
        session.commit()

    geventctx.spawn(audit)
    return jsonify(user=user)


# -- the tutorial's get_db() ---------------------------------------------------------

getdb_engine = make_engine("getdb")


def get_db() -> sa.Connection:
    if "db" not in g:
        g.db = getdb_engine.connect()
    return t.cast(sa.Connection, g.db)


@app.teardown_appcontext
def close_db(exc: BaseException | None = None) -> None:
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


@app.get("/getdb/map/<int:uid>")
def getdb_map(uid: int) -> t.Any:
    def title(sid: int) -> str:
        return str(get_db().execute(TITLE_SQL, {"id": sid}).scalar_one())

    # The children open connections of their own (the view has none yet);
    # the view opens its own after them.
    titles = geventctx.Pool(4).map(title, [section_id(uid, k) for k in range(SECTIONS)])
    user = get_db().execute(NAME_SQL, {"id": uid}).scalar_one()
    return jsonify(user=user, titles=titles)


@app.post("/getdb/audit/<tag>")
def getdb_audit(tag: str) -> t.Any:
    user = get_db().execute(NAME_SQL, {"id": int(request.args["uid"])}).scalar_one()

    def audit() -> None:
        gevent.sleep(10 * REMOTE_CALL)  # after the response; the view is done with g.db
        conn = get_db()  # the view's connection, read through the child's g
        conn.execute(AUDIT_SQL, {"tag": tag, "user_name": user, "what": "getdb"})
        conn.commit()

    geventctx.spawn(audit)
    return jsonify(user=user)


# -- a resource of the request: before_request / teardown_request ---------------------

resource_engine = make_engine("resource")


@app.before_request
def open_resource() -> None:
    if request.path.startswith("/resource/"):
        g.resource = resource_engine.connect()


@app.teardown_request
def close_resource(exc: BaseException | None = None) -> None:
    conn = g.pop("resource", None)
    if conn is not None:
        conn.close()


@app.post("/resource/audit/<tag>")
def resource_audit(tag: str) -> t.Any:
    def audit() -> None:
        gevent.sleep(10 * REMOTE_CALL)  # after the response
        g.resource.execute(AUDIT_SQL, {"tag": tag, "user_name": "resource", "what": "resource"})
        g.resource.commit()

    geventctx.spawn(audit)
    return jsonify(tag=tag)


# -- Flask-Login ---------------------------------------------------------------------

login_manager = LoginManager(app)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    return db.session.get(User, int(user_id))


@app.post("/login/<name>")
def login(name: str) -> t.Any:
    user = db.session.execute(sa.select(User).where(User.name == name)).scalar_one()
    login_user(user)
    return jsonify(user=user.name)


def my_section(position: int) -> dict[str, str]:
    uid = current_user.id
    title = db.session.execute(
        sa.select(Section.title).where(Section.user_id == uid, Section.position == position)
    ).scalar_one()
    return {"user": current_user.name, "title": title}


def audit_visit(tag: str, what: str) -> None:
    db.session.add(Audit(tag=tag, user_name=current_user.name, what=what))
    db.session.commit()


@app.get("/dashboard")
@login_required
def dashboard() -> t.Any:
    tag = request.args["tag"]
    sections = geventctx.Pool(4).map(my_section, range(SECTIONS))
    geventctx.spawn(audit_visit, tag, "dashboard")
    return jsonify(user=current_user.name, sections=sections, tag=tag)


@app.get("/whoami")
def whoami() -> t.Any:
    # No login_required: the children are the first to touch current_user.
    tag = request.args["tag"]
    sections = geventctx.Pool(4).map(my_section, range(SECTIONS))
    geventctx.spawn(audit_visit, tag, "whoami")
    return jsonify(user=current_user.name, sections=sections, tag=tag)


# -- copy_current_request_context, the code patch() users already have ----------------


@app.get("/ccrc/map/<int:uid>")
def ccrc_map(uid: int) -> t.Any:
    user = db.session.get(User, uid)

    def title(sid: int) -> dict[str, t.Any]:
        # The Session object itself, kept alive until the view compares them:
        # an id compared after the object was freed can be reused.
        return {"title": fsa_title(sid), "session": db.session()}

    # One copy per child: a copied request context pushed by two greenlets
    # at once pops the other's token (Flask's own limit).
    children = [gevent.spawn(copy_current_request_context(title), section_id(uid, k)) for k in range(SECTIONS)]
    gevent.joinall(children, raise_error=True)
    seen = [child.value for child in children]
    return jsonify(
        user=user.name, titles=[s["title"] for s in seen],
        sessions=[id(s["session"]) for s in seen], view_session=id(db.session()),
    )


# -- a CLI command: an app context without a request ----------------------------------


@app.cli.command("fanout")
@click.argument("uid", type=int)
def fanout_command(uid: int) -> None:
    """Children read a user's sections and write an audit line, in the
    command's app context; prints what each saw and what was left, as JSON."""

    # Each child returns its Session object itself, alive until the ids are
    # compared: the id of a freed object can be reused.
    def title(sid: int) -> dict[str, t.Any]:
        return {"title": fsa_title(sid), "session": db.session()}

    def audit() -> t.Any:
        db.session.add(Audit(tag=f"cli-{uid}", user_name=f"user{uid}", what="cli"))
        db.session.commit()
        return db.session()

    seen = geventctx.Pool(4).map(title, [section_id(uid, k) for k in range(SECTIONS)])
    writer = geventctx.spawn(audit)
    writer.join()
    print(json.dumps({
        "titles": [s["title"] for s in seen],
        "sessions": [id(s["session"]) for s in seen] + [id(writer.value)],
        # every child ended and was torn down; the command itself never used db.session
        "checked_out": checked_out(db.engine),
        "problems": problems,
    }))


# -- what the tests read -------------------------------------------------------------


@app.get("/_stats")
def stats() -> t.Any:
    return jsonify(
        checked_out={
            "fsa": checked_out(db.engine),
            "scoped_app": checked_out(scoped_app.session_factory.kw["bind"]),
            "scoped_default": checked_out(scoped_default.session_factory.kw["bind"]),
            "getdb": checked_out(getdb_engine),
            "resource": checked_out(resource_engine),
        },
        problems=problems,
        patched=geventctx.is_patched(),
    )
