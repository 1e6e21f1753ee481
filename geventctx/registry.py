"""The registry of live hand-offs, for inspection and debugging.

Every explicit hand-off (:func:`geventctx.spawn`, the pools, the executor)
adds a :class:`HandOff` record when it starts and removes it when it ends.
Records point to their greenlets weakly, so the registry keeps nothing alive:
a finished, unreferenced child is collectable at once.

    >>> for record in geventctx.registry.live():
    ...     print(record.spawn_site, record.age, record.scope)

.. versionadded:: 0.1
"""

from __future__ import annotations

import time
import typing as t
import weakref

from ._site import Site, format_site

if t.TYPE_CHECKING:
    import greenlet

    from .scope import Scope

__all__ = ["HandOff", "live", "record_of", "for_scope", "dump"]

_monotonic = time.monotonic

_ref = weakref.ref

#: (weakref to child, weakref to parent, scope, function, site, start time)
Entry = t.Tuple["weakref.ref[t.Any]", "weakref.ref[t.Any]", "Scope | None", t.Any, "Site | None", float]

#: id(greenlet) -> entry, for running hand-offs only. An entry is removed by
#: the greenlet's own link when it ends, before the greenlet can be freed, so
#: an id is never reused while its entry is here.
_live: dict[int, Entry] = {}


class HandOff:
    """What is known about one running hand-off (a read-only view)."""

    __slots__ = ("_greenlet", "_parent", "scope", "function", "site", "started_at")

    def __init__(self, entry: Entry) -> None:
        self._greenlet, self._parent, self.scope, self.function, self.site, self.started_at = entry

    @property
    def greenlet(self) -> t.Any:
        """The child, or ``None`` if it was already collected."""
        return self._greenlet()

    @property
    def parent(self) -> t.Any:
        """The greenlet that started the child, or ``None`` if collected."""
        return self._parent()

    @property
    def spawn_site(self) -> str:
        """``"file.py:12"``: the user's line that started the child."""
        return format_site(self.site)

    @property
    def age(self) -> float:
        """Seconds since the child was started."""
        return _monotonic() - self.started_at

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HandOff) and self._greenlet == other._greenlet

    def __hash__(self) -> int:
        return hash(self._greenlet)

    def __repr__(self) -> str:
        name = getattr(self.function, "__qualname__", None) or repr(self.function)
        return f"<HandOff {name} from {self.spawn_site} age={self.age:.3f}s scope={self.scope!r}>"


def entry(
    child: greenlet.greenlet,
    parent: greenlet.greenlet,
    scope: Scope | None,
    function: t.Any,
    site: Site | None,
) -> Entry:
    """The raw registry entry of a hand-off (a tuple: cheap on the spawn path)."""
    return (_ref(child), _ref(parent), scope, function, site, _monotonic())


def live() -> list[HandOff]:
    """A snapshot of the records of all running hand-offs, oldest first."""
    return sorted(map(HandOff, list(_live.values())), key=lambda r: r.started_at)


def record_of(child: greenlet.greenlet) -> HandOff | None:
    """The record of ``child`` if it is a running hand-off."""
    found = _live.get(id(child))
    if found is not None and found[0]() is child:
        return HandOff(found)
    return None


def for_scope(scope: Scope) -> list[HandOff]:
    """The running hand-offs that hold ``scope`` (its own index: O(its children))."""
    return sorted(map(HandOff, list(scope.children.values())), key=lambda r: r.started_at)


def dump() -> str:
    """A readable report of live hand-offs grouped by request scope."""
    groups: dict[int, list[HandOff]] = {}
    scopes: dict[int, Scope | None] = {}
    for record in live():
        key = id(record.scope)
        groups.setdefault(key, []).append(record)
        scopes[key] = record.scope
    if not groups:
        return "geventctx: no live hand-offs"
    lines = [f"geventctx: {len(_live)} live hand-off(s)"]
    for key, records in groups.items():
        scope = scopes[key]
        lines.append(f"  {scope.label if scope is not None else '(no request)'}: {scope!r}")
        for r in records:
            name = getattr(r.function, "__qualname__", None) or repr(r.function)
            lines.append(f"    {name}  from {r.spawn_site}  age {r.age:.3f}s  {r.greenlet!r}")
    return "\n".join(lines)
