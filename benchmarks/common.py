"""What every benchmark module returns, and how run.py prints it."""

from __future__ import annotations

import typing as t


class Row(t.NamedTuple):
    """One measured line of a benchmark table."""

    name: str
    value: float
    unit: str
    #: value / the module's baseline, or None for rows without one.
    ratio: float | None = None
    #: e.g. "P1 <=1.2x bare"; empty for rows without a budget.
    budget: str = ""
    #: True PASS, False MISS, None no budget.
    ok: bool | None = None
    note: str = ""


def format_table(rows: t.Sequence[Row]) -> str:
    """A plain-text table of ``rows``."""
    header = ("variant", "median", "vs base", "budget", "verdict", "note")
    lines = [
        (
            r.name,
            f"{r.value:.2f} {r.unit}",
            "" if r.ratio is None else f"{r.ratio:.3f}x",
            r.budget,
            {True: "PASS", False: "MISS", None: ""}[r.ok],
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'>' if i in (1, 2) else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)
