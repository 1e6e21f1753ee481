"""Example: send an e-mail after the response, with the request's data.

The view answers at once; a child hands the message to a (here: fake)
mailer afterwards. The child reads ``request``, ``g`` and the logged-in
user as the view saw them, and the request's teardown — closing the
database session, say — waits until the e-mail is out.

Run: ``python -m examples.background_email`` (serves on 127.0.0.1:8000).
"""

from __future__ import annotations

import logging

import gevent
from flask import Flask, g, request

import geventctx
from geventctx.flask import GeventContext

log = logging.getLogger("examples.email")

#: What the fake mailer "sent" and what the teardown saw, for the test.
OUTBOX: list[dict[str, str]] = []
CLOSED_SESSIONS: list[str] = []


def send_welcome_email() -> None:
    gevent.sleep(0.05)  # talking to the SMTP server, after the response
    OUTBOX.append({"to": request.form["email"], "name": g.user, "via": request.path})
    log.info("welcome e-mail sent to %s", request.form["email"])


def create_app() -> Flask:
    app = Flask(__name__)
    GeventContext(app)

    @app.before_request
    def open_db_session() -> None:
        g.db_session = f"session-for-{request.form.get('name', '?')}"

    @app.teardown_appcontext
    def close_db_session(exc: BaseException | None) -> None:
        # Runs once, after the e-mail child ended: it could still use the session.
        CLOSED_SESSIONS.append(g.db_session)

    @app.post("/signup")
    def signup() -> tuple[str, int]:
        g.user = request.form["name"]
        geventctx.spawn(send_welcome_email)
        return "welcome!", 201

    return app


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    logging.basicConfig(level=logging.INFO)
    WSGIServer(("127.0.0.1", 8000), create_app()).serve_forever()
