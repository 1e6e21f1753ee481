"""make bench's verdict: a missed budget is a non-zero exit unless --no-fail.

benchmarks/run.py runs here with one benchmark module of the test's own (a
real module on sys.path, with the Row type the real ones return), so the
verdict logic is what runs; the benchmarks themselves are too slow for tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

MODULE = """
from common import Row
TITLE = "budget check"
def run(quick):
    return [Row("base", 1.0, "us"), Row("variant", 1.5, "us", 1.5, "P0 <=1.1x", {ok}, "")]
"""


def run_bench(tmp_path: Path, ok: bool, *flags: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "budgetcheck.py").write_text(MODULE.format(ok=ok))
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(BENCHMARKS)!r}]\n"
        "import run\n"
        "run.MODULES = ['budgetcheck']\n"
        f"sys.exit(run.main({list(flags)!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("ok", "flags", "status"), [(False, (), 1), (False, ("--no-fail",), 0), (True, (), 0)])
def test_a_missed_budget_fails_make_bench_unless_no_fail(tmp_path: Path, ok: bool, flags: tuple[str, ...], status: int):
    out = run_bench(tmp_path, ok, *flags)
    assert out.returncode == status, out.stdout + out.stderr
    if ok:
        assert "every budget met" in out.stdout
    else:
        assert "1 budget(s) missed: variant (P0 <=1.1x)" in out.stdout
