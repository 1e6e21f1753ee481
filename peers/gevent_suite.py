"""gevent's own tests as the judge of geventctx's pools and of ``patch()``.

``make test-gevent-suite`` runs test modules that ship in gevent's wheel
(``gevent/tests/``), each in a process of its own, three ways:

- **plain**: as gevent runs them (the baseline);
- **classes**: with ``gevent.pool.Pool``, ``gevent.pool.Group`` and
  ``gevent.threadpool.ThreadPool`` replaced by geventctx's before the module
  is imported (for ``test__pool``, ``test__greenletset``, ``test__threadpool``);
- **patch**: with :func:`geventctx.patch` switched on first (for
  ``test__pool``, ``test__greenlet``, ``test__threadpool``, ``test__local``,
  ``test__pywsgi``).

A test that passes plain and fails (or errors) substituted is a difference:
the exit status is 1. Failures of the baseline are listed, not counted.

Run one module by hand: ``python peers/gevent_suite.py --one classes test__threadpool``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import typing as t

#: (module, the ways it runs besides plain)
MODULES = [
    ("test__pool", ("classes", "patch")),
    ("test__greenletset", ("classes",)),
    ("test__threadpool", ("classes", "patch")),
    ("test__greenlet", ("patch",)),
    ("test__local", ("patch",)),
    ("test__pywsgi", ("patch",)),
]
#: Seconds one module may run.
TIMEOUT = 600


def _substitute(way: str) -> None:
    if way == "classes":
        import gevent.pool
        import gevent.threadpool

        import geventctx

        gevent.pool.Pool = geventctx.Pool  # type: ignore[misc]
        gevent.pool.Group = geventctx.Group  # type: ignore[misc]
        gevent.threadpool.ThreadPool = geventctx.ThreadPool  # type: ignore[misc]
    elif way == "patch":
        import geventctx

        geventctx.patch()


def run_one(way: str, module: str) -> dict[str, str]:
    """In this process: run gevent.tests.<module> after ``way``; test id -> outcome."""
    import importlib
    import unittest

    _substitute(way)
    loaded = importlib.import_module(f"gevent.tests.{module}")
    suite = unittest.defaultTestLoader.loadTestsFromModule(loaded)
    outcomes: dict[str, str] = {}

    class Recording(unittest.TextTestResult):
        def addSuccess(self, test: unittest.TestCase) -> None:
            super().addSuccess(test)
            outcomes[test.id()] = "passed"

        def addFailure(self, test: unittest.TestCase, err: t.Any) -> None:
            super().addFailure(test, err)
            outcomes[test.id()] = "failed"

        def addError(self, test: unittest.TestCase, err: t.Any) -> None:
            super().addError(test, err)
            outcomes[test.id()] = "error"

        def addSkip(self, test: unittest.TestCase, reason: str) -> None:
            super().addSkip(test, reason)
            outcomes[test.id()] = "skipped"

        def addExpectedFailure(self, test: unittest.TestCase, err: t.Any) -> None:
            super().addExpectedFailure(test, err)
            outcomes[test.id()] = "skipped"

    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=0, resultclass=Recording)
    runner.run(suite)
    return outcomes


def spawn_one(way: str, module: str) -> tuple[dict[str, str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, "--one", way, module],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    took = time.monotonic() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"{module} ({way}) wrote no result (exit status {done.returncode})")
    return json.loads(lines[-1]), took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("WAY", "MODULE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one)), flush=True)
        return 0
    differences = 0
    for module, ways in MODULES:
        plain, took = spawn_one("plain", module)
        failing = sorted(name for name, outcome in plain.items() if outcome in ("failed", "error"))
        print(f"{module} plain: {_count(plain)} ({took:.0f} s)", flush=True)
        for name in failing:
            print(f"  baseline failure (not counted): {name}")
        for way in ways:
            result, took = spawn_one(way, module)
            print(f"{module} {way}: {_count(result)} ({took:.0f} s)", flush=True)
            for name in sorted(plain):
                if plain[name] == "passed" and result.get(name) in ("failed", "error", None):
                    print(f"  DIFFERENCE: {name}: {result.get(name, 'not run')}")
                    differences += 1
    print(f"{differences} difference(s)")
    return 1 if differences else 0


def _count(results: dict[str, str]) -> str:
    kinds = ("passed", "failed", "error", "skipped")
    return ", ".join(f"{sum(1 for o in results.values() if o == k)} {k}" for k in kinds)


if __name__ == "__main__":
    sys.exit(main())
