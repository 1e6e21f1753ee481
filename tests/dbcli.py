"""tests/dbapp.py's CLI commands, run as ``flask`` would run them, after
``monkey.patch_all()`` (as tests/dbserver.py does for the server):
``python tests/dbcli.py fanout 3``. Each command runs in an app context
without a request, pushed by Flask's ``with_appcontext``.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from dbapp import app  # noqa: E402
from flask.cli import ScriptInfo  # noqa: E402

if __name__ == "__main__":
    app.cli.main(args=sys.argv[1:], prog_name="dbcli", obj=ScriptInfo(create_app=lambda: app))
