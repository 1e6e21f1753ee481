"""The package as a newcomer meets it: imports without Flask, demo runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> str:
    """What a fresh interpreter running ``code`` prints (it must succeed)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_imports_without_django_installed():
    code = (
        "import sys\n"
        "sys.modules['django'] = None\n"
        "import geventctx, geventctx.wsgi, geventctx.pool\n"
        "assert geventctx.spawn(lambda: 1).get() == 1\n"
        "print('ok')\n"
    )
    assert _python(code).strip() == "ok"


def test_imports_without_flask_installed():
    # sys.modules[name] = None makes any `import flask` raise ImportError,
    # as on a machine without Flask.
    code = (
        "import sys\n"
        "sys.modules['flask'] = None\n"
        "import geventctx, geventctx.pool, geventctx.registry, geventctx.body\n"
        "assert geventctx.spawn(lambda: 1).get() == 1\n"
        "print('ok', 'flask' in sys.modules and sys.modules['flask'] is not None)\n"
    )
    assert _python(code).strip() == "ok False"


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("geventctx.flask", "flask", "flask"),
        ("geventctx.celery", "celery", "celery"),
        ("geventctx.integrations.sentry", "sentry_sdk", "sentry"),
        ("geventctx.django", "django", "django"),
    ],
)
def test_adapter_without_its_framework_names_the_extra_to_install(module: str, framework: str, extra: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{framework!r}] = None\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "import geventctx\n"
        "assert geventctx.spawn(lambda: 1).get() == 1\n"
    )
    out = _python(code)
    assert f"pip install 'geventctx[{extra}]'" in out, out
    assert out.startswith("ImportError "), out


def test_the_oldest_ci_job_installs_exactly_the_declared_floors():
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = cfg["options"]["install_requires"] + cfg["options.extras_require"]["flask"]
    floors = dict(re.findall(r"^\s*([\w.-]+)\s*>=\s*([\w.]+)\s*$", declared, re.M))
    makefile = (ROOT / "Makefile").read_text()
    pinned = dict(re.findall(r"([\w.-]+)==([\w.]+)", re.search(r"^FLOORS :=(.*)$", makefile, re.M)[1]))
    assert pinned == floors
    assert set(floors) == {"gevent", "greenlet", "werkzeug", "flask"}


def test_py_typed_marker_ships():
    assert (ROOT / "geventctx" / "py.typed").exists()


def test_demo_runs_and_checks_what_it_shows():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All demonstrated behaviour checked." in out.stdout
    assert "BAD" not in out.stdout
