"""What the Django adapter does to asgiref ``Local`` storage, on the asgiref
installed (geventctx._django_compat; DESIGN G16).

A child here is a real thread running in a Context prepared as the
adapter's fork prepares a child's snapshot: threads, because without
monkey-patching every greenlet of a thread has the same
``threading.get_ident()``, and asgiref 3.12+ keys its storage on it.
"""

from __future__ import annotations

import threading
import typing as t
from contextvars import Context, copy_context

import pytest

asgiref_local = pytest.importorskip("asgiref.local")

from geventctx import _django_compat as compat  # noqa: E402


def in_thread(context: Context, function: t.Callable[[], t.Any]) -> t.Any:
    result: list[t.Any] = []
    thread = threading.Thread(target=lambda: result.append(context.run(function)))
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return result[0]


def child_context(local: t.Any) -> Context:
    """A snapshot of the running Context with the fork's work done."""
    var = compat._var_of(local)
    assert var is not None
    context = copy_context()

    def fork() -> None:
        value = var.get(None)
        if value is not None:
            var.set(compat.for_child(value))

    context.run(fork)
    return context


def test_a_child_sees_its_spawners_state_and_its_changes_stay_its_own() -> None:
    local = asgiref_local.Local()
    local.language = "de"
    context = child_context(local)

    def child() -> tuple[str, str]:
        seen = local.language
        local.language = "fr"
        return seen, local.language

    assert in_thread(context, child) == ("de", "fr")
    assert local.language == "de"  # asgiref 3.8 would say "fr" (a dict written in place)


def test_a_grandchild_sees_its_parents_state() -> None:
    local = asgiref_local.Local()
    local.language = "de"
    context = child_context(local)

    def child() -> str:
        local.language = "fr"
        return t.cast(str, in_thread(child_context(local), lambda: local.language))

    assert in_thread(context, child) == "fr"
    assert local.language == "de"


def test_state_the_spawner_cannot_see_stays_unseen() -> None:
    if not compat.HOMED:
        pytest.skip("asgiref before 3.12 shares what a Context holds with every thread")
    local = asgiref_local.Local()
    var = compat._var_of(local)
    assert var is not None
    # Storage of a thread that is not the spawner (no thread has ident -1).
    var.set(compat._Storage(-1, {"language": "de"}))
    assert getattr(local, "language", None) is None
    assert in_thread(child_context(local), lambda: getattr(local, "language", None)) is None


def test_rehomed_storage_belongs_to_the_thread_that_runs_the_end() -> None:
    local = asgiref_local.Local()
    local.language = "de"
    var = compat._var_of(local)
    assert var is not None
    context = copy_context()

    def end() -> t.Any:
        value = var.get(None)
        homed = compat.rehomed(value)
        if homed is not value:
            var.set(homed)
        return local.language

    assert in_thread(context, end) == "de"


def test_an_empty_cache_storage_for_a_child() -> None:
    local = asgiref_local.Local()
    local.default = object()
    var = compat._var_of(local)
    assert var is not None
    value = var.get()
    fresh = compat.empty_like(value)
    if compat.HOMED:
        assert fresh is value  # the child cannot see it anyway (another ident)
    else:
        assert fresh == {} and fresh is not value
