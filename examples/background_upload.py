"""Example: process an upload in the background while the response returns.

The view answers ``202 Accepted`` without touching the body; a child reads
the uploaded file and computes its digest after the response was sent. The
body is read off the socket once (the extension takes it before the server
would discard it), the child gets the complete file, and the request's
``request.close()`` (which closes the uploaded files) waits for the child.

Run: ``python -m examples.background_upload`` (serves on 127.0.0.1:8000).
"""

from __future__ import annotations

import hashlib

import gevent
from flask import Flask, request

import geventctx
from geventctx.flask import GeventContext

#: upload name -> (size, sha256), filled by the background job.
PROCESSED: dict[str, tuple[int, str]] = {}


def process_upload() -> None:
    gevent.sleep(0.02)  # queue wait, virus scan, ...
    upload = request.files["file"]
    data = upload.read()
    PROCESSED[upload.filename or "?"] = (len(data), hashlib.sha256(data).hexdigest())


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 50 * 1024 * 1024
    GeventContext(app)

    @app.post("/upload")
    def upload() -> tuple[str, int]:
        geventctx.spawn(process_upload)
        return "accepted", 202

    return app


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    WSGIServer(("127.0.0.1", 8000), create_app()).serve_forever()
