"""Django's own test suite as the judge of the Django adapter (DESIGN G16).

``make test-django-suite`` (and ``python peers/django_suite.py --python
VENV_PYTHON``) takes the Django version installed in the given
interpreter's environment, fetches that Django's sdist (``pip download
--no-deps --no-binary :all:``: it ships ``tests/runtests.py``) into
``.cache/django-suite``, and runs the labels that touch requests, handlers,
signals, transactions, uploads, i18n, cache, middleware and backends twice
with that interpreter (SQLite, Django's default test settings): plain, and
with :mod:`geventctx.django`'s ``WSGIHandler`` and ``WSGIRequest``
substituted for Django's own (``peers/django_suite_run.py``: every
``WSGIRequest`` the test client and ``RequestFactory`` make is the
adapter's). Per test it compares the two outcomes: a test that passes plain
and fails (or errors) with the adapter is a regression, and the exit status
is 1. Tests that fail plain are reported as the baseline and not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from judge import count, regressions
from suitekit import sdist_source

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "django-suite"

#: The labels judged, those of them the suite has (Django 4.2 calls
#: ``requests_tests`` ``requests``).
LABELS = [
    "requests_tests", "requests", "handlers", "signals", "dispatch", "transactions", "transaction_hooks",
    "file_uploads", "i18n", "cache", "middleware", "middleware_exceptions", "backends", "test_client", "csrf_tests",
]
#: Seconds each run may take (one run takes about a minute here).
RUN_TIMEOUT = 900

_RESULT = re.compile(
    r"^(?P<name>\w+) \((?P<id>[\w.]+)\)(?:\n(?!\w+ \([\w.]+\)).*?)?"
    r" \.\.\. (?P<outcome>ok|FAIL|ERROR|skipped|expected failure|unexpected success)",
    re.M,
)
_FAILED = re.compile(r"^(?P<kind>FAIL|ERROR): \w+ \((?P<id>[\w.]+)\)", re.M)


def django_version(python: str) -> str:
    script = "from importlib.metadata import version; print(version('django'))"
    return subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout.strip()


def django_tests(python: str, version: str) -> Path:
    """The ``tests/`` of Django's sdist for ``version`` (downloaded once)."""
    source = CACHE / f"django-{version}-src"
    if (source / "tests" / "runtests.py").is_file():
        return source / "tests"
    return sdist_source(python, f"django=={version}", CACHE, source, "Django") / "tests"


def run_suite(python: str, tests: Path, with_adapter: bool, log: Path) -> tuple[dict[str, str], float]:
    """Run the labels; test id -> passed / failed / error / skipped."""
    env = dict(os.environ)
    env["GEVENTCTX_DJANGO_SUITE"] = "1" if with_adapter else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tests)])
    env.pop("GEVENTCTX_PATCH", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    labels = [label for label in LABELS if (tests / label).is_dir()]
    cmd = [python, str(ROOT / "peers" / "django_suite_run.py"), "--parallel", "1", "-v", "2", *labels]
    print("+", " ".join(cmd), f"(GEVENTCTX_DJANGO_SUITE={env['GEVENTCTX_DJANGO_SUITE']})", flush=True)
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tests, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=RUN_TIMEOUT)
    took = time.monotonic() - start
    log.write_text(done.stdout)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-3:]
    print("\n".join("    " + line for line in tail), flush=True)
    results: dict[str, str] = {}
    for match in _RESULT.finditer(done.stdout):
        outcome = match["outcome"]
        results[match["id"]] = {"ok": "passed", "FAIL": "failed", "ERROR": "error",
                                "expected failure": "passed", "unexpected success": "failed"}.get(outcome, "skipped")
    for match in _FAILED.finditer(done.stdout):
        results[match["id"]] = "failed" if match["kind"] == "FAIL" else "error"
    if with_adapter:
        applied = re.search(r"geventctx.django substituted: (\d+) requests", done.stdout)
        if applied is None or int(applied.group(1)) == 0:
            raise SystemExit("the adapter's request class was used by no test: the suite judged nothing")
        print("    " + applied.group(0), flush=True)
    if not results:
        print(done.stdout[-4000:])
        raise SystemExit("the suite reported no test")
    return results, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="the interpreter (with Django and geventctx installed) to run the suite with")
    args = parser.parse_args(argv)
    # Absolute (the suite runs in Django's tests/), not resolved (a venv's
    # python is a link out of the venv).
    args.python = os.path.abspath(args.python)
    version = django_version(args.python)
    print(f"Django {version} (from {args.python})", flush=True)
    tests = django_tests(args.python, version)
    logs = CACHE / f"reports-{version}"
    logs.mkdir(parents=True, exist_ok=True)
    plain, took = run_suite(args.python, tests, False, logs / "plain.log")
    labels = sum(1 for label in LABELS if (tests / label).is_dir())
    lines = [f"Django {version} suite ({labels} labels), plain: {count(plain)} ({took:.0f} s)"]
    for name in sorted(n for n, o in plain.items() if o in ("failed", "error")):
        lines.append(f"  baseline failure (not counted): {name}")
    ext, took = run_suite(args.python, tests, True, logs / "geventctx.log")
    lines.append(f"Django {version} suite, geventctx.django: {count(ext)} ({took:.0f} s)")
    regressed = regressions(plain, ext, "the adapter")
    lines += regressed
    bad = len(regressed)
    print("\n" + "\n".join(lines))
    print(f"{bad} regression(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
