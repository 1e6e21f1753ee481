"""Run the geventctx benchmarks and print their tables (``make bench``).

Each module in :data:`MODULES` (a file next to this one) exposes ``TITLE`` and
``run(quick: bool) -> list[common.Row]``. ``--quick`` is a few-second smoke run
whose figures are too noisy to judge budgets by. The exit status is 1 when a
row misses its budget; ``--no-fail`` (``make bench BENCH_FLAGS=--no-fail``)
still lists the misses but exits 0, for exploring.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
import time

from common import format_table

#: Benchmark modules, in run order. (P4 lives in ``http_rps``: a module named
#: ``http`` here would shadow the standard library's ``http`` package.)
MODULES = [
    "call_trace",
    "spawn",
    "body",
    "http_rps",
    "memory",
    "upload",
    "stragglers",
    "pools",
    "celery_publish",
    "observability",
    "databases",
    "taskgroup",
]


def header() -> str:
    """Date, interpreter, library versions, CPUs and how to reproduce."""
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("gevent", "greenlet", "flask", "celery", "geventctx")
    )
    return "\n".join(
        [
            f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"python {platform.python_version()} ({platform.python_implementation()}), {versions}",
            f"platform: {platform.platform()}, os.cpu_count()={os.cpu_count()}",
            "reproduce: make bench   (smoke run: .venv/bin/python benchmarks/run.py --quick)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark; exit status 1 if a budget is missed, unless --no-fail."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, smoke test only")
    parser.add_argument(
        "--no-fail", action="store_true", help="exit 0 even if a budget is missed (for exploring)"
    )
    args = parser.parse_args(argv)

    print(header())
    missed: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        start = time.monotonic()
        rows = module.run(args.quick)
        took = time.monotonic() - start
        print(f"\n== {module.TITLE}{' [quick]' if args.quick else ''} ({took:.0f} s)")
        print(format_table(rows))
        missed += [f"{row.name} ({row.budget})" for row in rows if row.ok is False]
    if not missed:
        print("\nevery budget met")
        return 0
    print(f"\n{len(missed)} budget(s) missed: " + "; ".join(missed))
    if args.no_fail:
        print("(--no-fail: exit status 0)")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
