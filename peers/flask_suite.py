"""Flask's own test suite as the judge of the Flask extension.

``make test-flask-suite`` (and ``python peers/flask_suite.py --python
VENV_PYTHON``) takes the Flask and Werkzeug versions installed in the given
interpreter's environment, fetches that Flask's sdist (``pip download
--no-binary :all:``: it ships ``tests/``), and runs its suite three times in a
venv of its own (``.venv-flask-suite-<version>``: the same Flask and
Werkzeug, geventctx from this checkout, the pytest version the suite
collects with): plain, with :class:`~geventctx.flask.GeventContext` on
every app it builds (``peers/flask_suite_plugin.py``), and the same after
``gevent.monkey.patch_all()``. Per test it compares
the two outcomes. A test that passes plain and fails (or errors) with the
extension is a regression: the exit status is 1. Tests that fail plain are
reported as the baseline and not counted. If the suite does not even
collect plain with these versions (Flask main next to Werkzeug main, at
times), nothing is judged: exit status 2.

geventctx's own pytest plugin (the leak check) is off in both runs: the
suite judges Flask's promises, not ours.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from judge import count, regressions
from suitekit import baseline, detail, outcomes, run_pytest, sdist_source, stamped_venv

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "flask-suite"

#: The pytest Flask's suites collect with (pytest 9.2 drops
#: ``_pytest.monkeypatch.notset``, which Flask 3.1's tests/test_cli.py imports).
PYTEST = "pytest==8.4.2"
#: What Flask's suite itself needs besides Flask (its "tests" dependency group).
SUITE_DEPS = ["asgiref", "python-dotenv", "greenlet"]


def suite_deps(flask_version: str) -> list[str]:
    """What the suite of ``flask_version`` needs beside Flask: Flask 2.x's CLI
    tests use ``CliRunner(mix_stderr=...)``, which click 8.2 removed."""
    return SUITE_DEPS + (["click<8.2"] if int(flask_version.split(".")[0]) < 3 else [])

#: Seconds each run of the suite may take.
RUN_TIMEOUT = 900


#: The distributions whose versions the suite's venv takes from ``--python``
#: (the floors job's venv pins all four).
MATCHED = ("flask", "werkzeug", "gevent", "greenlet")


def versions(python: str) -> dict[str, str]:
    script = f"from importlib.metadata import version as v; print(*[v(n) for n in {MATCHED!r}])"
    out = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(MATCHED, out, strict=True))


def requirement(python: str, name: str, version: str) -> str:
    """A pip requirement that reinstalls the ``name`` that ``python`` has:
    the released version, or the direct URL it was installed from (main)."""
    import json

    script = f"from importlib.metadata import distribution as d; print(d({name!r}).read_text('direct_url.json') or '')"
    out = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout.strip()
    if out:
        info = json.loads(out)
        url = info.get("url", "")
        vcs = info.get("vcs_info")
        if vcs:
            return f"{vcs['vcs']}+{url}@{vcs['commit_id']}"
        if url.startswith("file://") and not info.get("dir_info", {}).get("editable"):
            return f"{name} @ {url}"
    return f"{name}=={version}"


def suite_venv(python: str, found: dict[str, str]) -> Path:
    """The suite's venv for these versions (made once; a stamp marks it done)."""
    deps = suite_deps(found["flask"])
    packages = [*(requirement(python, name, found[name]) for name in MATCHED), PYTEST, *deps]
    wanted = " ".join([*(found[name] for name in MATCHED), PYTEST, *deps])
    return stamped_venv(ROOT / f".venv-flask-suite-{found['flask']}", packages, wanted)


def flask_tests(venv: Path, python: str, flask_version: str) -> Path:
    """The ``tests/`` of Flask's source for ``flask_version``: the sdist from
    the package index, or the source tree Flask was installed from."""
    CACHE.mkdir(parents=True, exist_ok=True)
    source = CACHE / f"flask-{flask_version}"
    if (source / "tests").is_dir():
        return source
    wanted = requirement(python, "flask", flask_version)
    return sdist_source(str(venv / "bin" / "python"), wanted, CACHE, source, "Flask")


def run_suite(venv: Path, source: Path, with_extension: bool, report: Path, patch: bool = False) -> float:
    env = {
        "GEVENTCTX_FLASK_SUITE": "1" if with_extension else "0",
        "GEVENTCTX_FLASK_SUITE_PATCH": "1" if patch else "0",
    }
    output, took = run_pytest(venv, source, "flask_suite_plugin", report, ["tests"], env, RUN_TIMEOUT)
    if with_extension:
        applied = re.search(r"GeventContext applied to (\d+) apps", output)
        if applied is None or int(applied.group(1)) == 0:
            raise SystemExit("the extension was applied to no app: the suite judged nothing")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="the interpreter whose Flask and Werkzeug versions to test")
    args = parser.parse_args(argv)
    found = versions(args.python)
    print(", ".join(f"{name} {found[name]}" for name in MATCHED), f"(from {args.python})", flush=True)
    venv = suite_venv(args.python, found)
    source = flask_tests(venv, args.python, found["flask"])
    reports = CACHE / f"reports-{found['flask']}"
    reports.mkdir(parents=True, exist_ok=True)
    plain_report = reports / "plain.xml"
    variants = [("GeventContext", reports / "geventctx.xml", False),
                ("GeventContext + patch_all", reports / "geventctx-patched.xml", True)]
    took = run_suite(venv, source, False, plain_report)
    plain = outcomes(plain_report)
    failures = baseline(plain, plain_report)
    if failures is None:
        print(f"Flask {found['flask']}'s suite does not collect with these versions (plain run): nothing judged")
        return 2
    lines = [f"Flask {found['flask']} suite, plain: {count(plain)} ({took:.0f} s)", *failures]
    bad = 0
    for label, report, patch in variants:
        took = run_suite(venv, source, True, report, patch)
        ext = outcomes(report)
        lines.append(f"Flask {found['flask']} suite, {label}: {count(ext)} ({took:.0f} s)")
        regressed = regressions(plain, ext, "the extension", lambda name, report=report: detail(report, name))
        lines += regressed
        bad += len(regressed)
    print("\n" + "\n".join(lines))
    print(f"{bad} regression(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
