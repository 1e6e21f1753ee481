"""How a peer's own suite judges geventctx: what counts as a regression.

The rule, one for every harness here: a test that passed plain and failed
(or errored) with geventctx, or that passed plain and did not run with it,
is a regression; a test that failed plain is a baseline failure, listed and
not counted.
"""

from __future__ import annotations

import typing as t


def count(results: dict[str, str]) -> str:
    """``results`` (test name: outcome) as "N passed, N failed, N error, N skipped"."""
    kinds = ("passed", "failed", "error", "skipped")
    return ", ".join(f"{sum(1 for o in results.values() if o == k)} {k}" for k in kinds)


def regressions(
    plain: dict[str, str], ext: dict[str, str], missing: str, detail: t.Callable[[str], str] | None = None
) -> list[str]:
    """One line per regression of ``ext`` against ``plain`` (``missing`` says
    what a test that did not run lacked: "the extension", "the adapter")."""
    lines = [f"  REGRESSION (not run with {missing}): {name}" for name in sorted(n for n in plain if n not in ext)]
    for name in sorted(n for n, o in plain.items() if o == "passed" and ext.get(n) in ("failed", "error")):
        lines.append(f"  REGRESSION: {name}: {detail(name)}" if detail is not None else f"  REGRESSION: {name}")
    return lines
