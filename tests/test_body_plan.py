"""The shared body's decisions on their own: integers in, answers out.

No socket, no hub, no greenlet: :class:`~geventctx.body_plan.BodyPlan`
decides what to read next, what a read means, what a timeout means, which
bytes nobody will read again and when a parse may read straight through,
so each test is a few calls and their answers.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import typing as t

import geventctx.body_plan
from geventctx.body_plan import CHUNK, EVERYTHING, READ_AHEAD, BodyPlan, Verdict


def test_the_plan_imports_only_the_standard_library():
    tree = ast.parse(pathlib.Path(geventctx.body_plan.__file__).read_text())
    imported = {
        (node.module or "" if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_the_smallest_limit_counts_asked_at_open():
    plan = BodyPlan(length=None, timeout=30)
    asked: list[str] = []

    def limit(name: str, value: int | None) -> t.Callable[[], int | None]:
        def ask() -> int | None:
            asked.append(name)
            return value

        return ask

    plan.add_limit(limit("outer", 100))
    plan.add_limit(limit("inner", None))
    assert asked == [] and plan.limit is None  # not before the first read
    assert plan.open() and asked == ["outer", "inner"] and plan.limit == 100
    plan.add_limit(lambda: 50)  # after the first read: at once
    assert plan.limit == 50
    plan.add_limit(lambda: 80)  # a larger one does not lift it
    assert plan.limit == 50


def test_a_length_over_the_limit_is_refused_before_a_byte_is_read():
    plan = BodyPlan(length=101, timeout=30)
    plan.add_limit(lambda: 100)
    assert not plan.open()
    plan = BodyPlan(length=100, timeout=30)
    plan.add_limit(lambda: 100)
    assert plan.open()


def test_what_to_ask_for_next():
    plan = BodyPlan(length=None, timeout=30)
    assert plan.wanted(0) == 0  # nobody waits: read nothing
    plan.want(10, lossless=False)
    assert plan.wanted(0) == 10 and plan.wanted(4) == 6  # a waiter's own bytes, no more
    plan.want(5 * CHUNK, lossless=False)
    assert plan.wanted(10) == CHUNK  # the nearest target first, a piece at a time
    plan.got(10)
    plan.got(5 * CHUNK)
    assert plan.wanted(10) == 0 and plan.targets == []


def test_reading_ahead_on_a_lossless_input_and_stopping_it():
    plan = BodyPlan(length=None, timeout=30)
    plan.want(100, lossless=True)
    plan.got(100)
    assert plan.wanted(100) == CHUNK and plan.wanted(100 + READ_AHEAD) == 0
    plan.stop_reading_ahead()
    assert plan.wanted(100) == 0
    plan.want(EVERYTHING, lossless=True)
    plan.got(EVERYTHING)
    assert plan.wanted(10**12) == CHUNK  # the whole body: read ahead to its end


def test_reads_stop_at_the_length_and_one_byte_past_the_limit():
    plan = BodyPlan(length=1000, timeout=30)
    plan.capturing = True
    assert plan.wanted(990) == 10
    plan = BodyPlan(length=None, timeout=30)
    plan.add_limit(lambda: 100)
    plan.open()
    plan.capturing = True
    assert plan.wanted(90) == 11  # one past the limit says "too large"


def test_what_a_read_brought():
    plan = BodyPlan(length=10, timeout=30)
    assert plan.accept(0, 4) == (4, Verdict.MORE)
    assert plan.accept(4, 6) == (6, Verdict.END)
    assert plan.accept(4, 0) == (0, Verdict.CUT_SHORT)  # the input ended early
    plan = BodyPlan(length=None, timeout=30)
    assert plan.accept(7, 0) == (0, Verdict.END)  # chunked: the end
    plan.add_limit(lambda: 8)
    plan.open()
    assert plan.accept(7, 5) == (2, Verdict.TOO_LARGE)  # keeps one byte past it, no more
    assert plan.accept(0, 8) == (8, Verdict.MORE)


def test_a_timeout_is_quiet_only_when_it_read_ahead_for_nobody_on_a_lossless_input():
    plan = BodyPlan(length=None, timeout=0.5)
    assert plan.seconds == 0.5 and BodyPlan(None, 0).seconds is None and BodyPlan(None, None).seconds is None
    assert plan.quiet_on_timeout(lossless=True)
    assert not plan.quiet_on_timeout(lossless=False)  # a read cut short
    plan.want(10, lossless=True)
    assert not plan.quiet_on_timeout(lossless=True)  # somebody waits
    plan.got(10)
    plan.capturing = True
    assert not plan.quiet_on_timeout(lossless=True)


def test_which_bytes_nobody_will_read_again():
    class Reader:
        """A greenlet, as far as positions go (a weakly referenced key)."""

    plan = BodyPlan(length=None, timeout=30)
    assert plan.keep_from() == 0  # no parse: a new reader may start at the first byte
    parse = object()
    plan.parses[parse] = 5000
    assert plan.keep_from() == 5000  # a parse alone: nothing behind it
    reader = Reader()
    plan.positions[reader] = 1200
    assert plan.keep_from() == 1200  # a raw reader that began before it still reads
    del reader
    assert plan.keep_from() == 5000  # gone with its greenlet
    del plan.parses[parse]
    assert plan.keep_from() == 0


def test_a_parse_reads_straight_through_only_when_it_alone_needs_the_bytes():
    class Reader:
        pass

    plan = BodyPlan(length=None, timeout=30)
    view = Reader()
    assert not plan.may_read_through(0, 0, view)  # not a parse
    first = object()
    plan.parses[first] = 100
    assert plan.may_read_through(100, 100, view)
    assert not plan.may_read_through(100, 150, view)  # bytes arrived ahead of it: the spool has them
    plan.want(200, lossless=True)
    assert not plan.may_read_through(100, 100, view)  # somebody else waits for bytes
    plan.got(200)
    plan.capturing = True
    assert not plan.may_read_through(100, 100, view)
    plan.capturing = False
    plan.positions[view] = 40
    assert plan.may_read_through(100, 100, view)  # the parse's own raw position: moved on by the parse
    child = Reader()
    plan.positions[child] = 100
    assert not plan.may_read_through(100, 100, view)  # level with it: it reads on from there
    plan.positions[child] = 0
    assert not plan.may_read_through(100, 100, view)  # a reader whose first read waits: the same
    del child
    assert plan.may_read_through(100, 100, view)
    plan.parses[object()] = 0
    assert not plan.may_read_through(100, 100, view)  # two parses


def test_who_else_waits_and_when_waiters_wake():
    plan = BodyPlan(length=None, timeout=30)
    plan.want(10, lossless=False)
    assert not plan.others_wait(10, 0)
    plan.want(20, lossless=False)
    assert plan.others_wait(10, 0) and not plan.others_wait(10, 20)
    assert not plan.wakes(5) and plan.wakes(10)
    plan.got(10)
    plan.got(20)
    assert not plan.wakes(10**9)  # nobody waits
