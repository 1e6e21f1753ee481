"""Werkzeug's own tests as the judge of the shared body (G5).

``make test-werkzeug-suite`` (and ``python peers/werkzeug_suite.py --python
VENV_PYTHON``) takes the Werkzeug version installed in the given
interpreter's environment, fetches that Werkzeug's sdist (``pip download
--no-binary :all:``: it ships ``tests/``) into ``.cache/werkzeug-suite``, and
runs its request-body tests twice in a venv of its own
(``.venv-werkzeug-suite-<version>``: the same Werkzeug, gevent and greenlet,
geventctx from this checkout, and what those tests need besides: pytest and
``ephemeral-port-reserve``, which Werkzeug's ``conftest.py`` imports):
plain, and with every request body read through geventctx's shared body
(``peers/werkzeug_suite_plugin.py``: each ``Request``, at its first body
read, and ``parse_form_data`` share the environ's input and read through
it). Per test it compares the two outcomes (``judge.py``): a test that
passes plain and fails (or errors, or does not run) with the shared body is
a regression, and the exit status is 1. Tests that fail plain are reported
as the baseline and not counted. If the tests do not even collect plain,
nothing is judged: exit status 2. A run with the shared body in which no read
went through it judged nothing, and fails too (exit status 1).

The tests it runs, whole files, nothing deselected:

- ``tests/test_formparser.py``: the form parser, from ``Request.from_values``,
  the test client and ``parse_form_data`` (multipart, urlencoded, limits);
- ``tests/test_wrappers.py``: the request and response wrappers, among them
  every request-body consumer (``get_data``, ``json``, ``form``, ``files``,
  ``stream``, ``input_stream``, the limits, shallow requests);
- ``tests/test_test.py``: the test client and ``EnvironBuilder``, whose apps
  read the bodies the client sends.

Not run: ``tests/test_wsgi.py``'s ``LimitedStream`` tests wrap a
``BytesIO`` of their own and never read an environ's input (a shared body
has nothing to serve there); ``tests/sansio/`` parses bytes with no
stream; ``tests/test_serving.py`` and ``tests/test_debug.py`` start the
development server in a subprocess (``dev_server``), where the plugin
is not loaded.

geventctx's own pytest plugin (the leak check) is off in both runs: the
tests judge Werkzeug's promises, not ours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from flask_suite import requirement
from judge import count, regressions
from suitekit import baseline, detail, outcomes, run_pytest, sdist_source, stamped_venv

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "werkzeug-suite"

#: The test files judged (see the module's docstring for why these).
TEST_FILES = ["tests/test_formparser.py", "tests/test_wrappers.py", "tests/test_test.py"]
#: The pytest the tests run with (as the Flask harness: the 8 series).
PYTEST = "pytest==8.4.2"
#: What the test files need besides Werkzeug and pytest (``conftest.py``
#: imports ``ephemeral_port_reserve`` for its dev-server fixture).
SUITE_DEPS = ["ephemeral-port-reserve"]
#: The distributions whose versions the suite's venv takes from ``--python``.
MATCHED = ("werkzeug", "gevent", "greenlet")
#: Seconds each run may take.
RUN_TIMEOUT = 300


def versions(python: str) -> dict[str, str]:
    script = f"from importlib.metadata import version as v; print(*[v(n) for n in {MATCHED!r}])"
    out = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(MATCHED, out, strict=True))


def suite_venv(python: str, found: dict[str, str]) -> Path:
    """The tests' venv for these versions (made once; a stamp marks it done)."""
    packages = [*(requirement(python, name, found[name]) for name in MATCHED), PYTEST, *SUITE_DEPS]
    wanted = " ".join([*(found[name] for name in MATCHED), PYTEST, *SUITE_DEPS])
    return stamped_venv(ROOT / f".venv-werkzeug-suite-{found['werkzeug']}", packages, wanted)


def werkzeug_tests(venv: Path, python: str, version: str) -> Path:
    """Werkzeug's source for ``version`` (it has ``tests/``), from its sdist."""
    CACHE.mkdir(parents=True, exist_ok=True)
    source = CACHE / f"werkzeug-{version}"
    if (source / "tests").is_dir():
        return source
    return sdist_source(str(venv / "bin" / "python"), requirement(python, "werkzeug", version), CACHE, source,
                        "Werkzeug")


def run_suite(venv: Path, source: Path, shared: bool, report: Path, counts: Path) -> float:
    counts.unlink(missing_ok=True)
    env = {"GEVENTCTX_WERKZEUG_SUITE": "1" if shared else "0", "GEVENTCTX_WERKZEUG_SUITE_COUNT": str(counts)}
    return run_pytest(venv, source, "werkzeug_suite_plugin", report, list(TEST_FILES), env, RUN_TIMEOUT)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="the interpreter whose Werkzeug, gevent and greenlet versions to test")
    args = parser.parse_args(argv)
    found = versions(args.python)
    version = found["werkzeug"]
    print(", ".join(f"{name} {found[name]}" for name in MATCHED), f"(from {args.python})", flush=True)
    venv = suite_venv(args.python, found)
    source = werkzeug_tests(venv, args.python, version)
    reports = CACHE / f"reports-{version}"
    reports.mkdir(parents=True, exist_ok=True)
    plain_report, shared_report = reports / "plain.xml", reports / "shared-body.xml"

    took = run_suite(venv, source, False, plain_report, reports / "plain-counts.json")
    plain = outcomes(plain_report)
    failures = baseline(plain, plain_report)
    if failures is None:
        print(f"Werkzeug {version}'s tests do not collect with these versions (plain run): nothing judged")
        return 2
    lines = [f"Werkzeug {version} tests ({', '.join(TEST_FILES)}), plain: {count(plain)} ({took:.0f} s)", *failures]

    counts_file = reports / "shared-body-counts.json"
    took = run_suite(venv, source, True, shared_report, counts_file)
    shared = outcomes(shared_report)
    counted = json.loads(counts_file.read_text()) if counts_file.exists() else {"reads": 0, "bodies": 0, "tests": []}
    lines.append(f"Werkzeug {version} tests, every body read through SharedBody: {count(shared)} ({took:.0f} s)")
    lines.append(f"  {counted['reads']} reads through {counted['bodies']} shared bodies, "
                 f"in {len(counted['tests'])} tests")
    regressed = regressions(plain, shared, "the shared body", lambda name: detail(shared_report, name))
    lines += regressed
    bad = len(regressed)
    if counted["reads"] == 0:
        lines.append("  NO READ went through the shared body: the run judged nothing")
        bad += 1
    print("\n" + "\n".join(lines))
    print(f"{len(regressed)} regression(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
