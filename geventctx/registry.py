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

#: (weakref to child, weakref to parent, scope, function, site, start time),
#: and for a ThreadPool task a seventh item: the task's Context (its error
#: is logged in it, see errorlog.report_task).
Entry = t.Tuple[t.Any, ...]

# The rule for records: a geventctx greenlet keeps its own record in its
# slots (see handoff.Greenlet: no allocation on the spawn path), and is
# indexed by its scope's ``children`` (``id`` -> child) or, outside a
# request, by :data:`_unscoped`; anything else (a ThreadPool task's
# AsyncResult, a plain gevent greenlet handed off) has an :data:`Entry`
# in :data:`_live`, and its scope indexes the object itself. Either is
# removed by the child's own end link, before the child can be freed, so
# an id is never reused while it is indexed.

#: id(child) -> entry, for running hand-offs that are not geventctx greenlets.
_live: dict[int, Entry] = {}

#: id(child) -> weakref to child, for running geventctx greenlets outside
#: any request (weakly: nothing of a process-wide index keeps a child alive;
#: a scope's own index holds its children for as long as the scope lives).
_unscoped: dict[int, weakref.ref[t.Any]] = {}


def _no_parent() -> None:
    return None


#: Where a child's record says the site is to be read from its spawning stack.
LAZY_SITE: t.Any = ("<lazy>", 0)


def entry_of(child: t.Any) -> Entry | None:
    """The record of ``child`` as an :data:`Entry` if it is a running hand-off."""
    started = getattr(child, "_geventctx_started", None)
    if started is not None:
        return (
            _ref(child),
            getattr(child, "spawning_greenlet", None) or _no_parent,
            child._geventctx_scope,
            child._geventctx_function,
            site_of_child(child),
            started,
        )
    found = _live.get(id(child))
    if found is not None and found[0]() is child:
        return found
    return None


def site_of_child(child: t.Any) -> Site | None:
    """A geventctx greenlet's spawn site: given, or read (once) from the stack
    gevent recorded when it was made; a helper's (Pool.map's) workers, made
    with no user frame on that stack, report the helper's site."""
    site = child._geventctx_site
    if site is LAZY_SITE:
        from ._site import site_of

        site = site_of(getattr(child, "spawning_stack", None))
        if site is None:
            parent = getattr(child, "spawning_greenlet", None)
            helper = entry_of(parent()) if parent is not None else None
            site = helper[4] if helper is not None else None
        child._geventctx_site = site
    return t.cast("Site | None", site)


def _entries() -> list[Entry]:
    from .scope import _every_scope

    children: dict[int, t.Any] = {}
    for scope in list(_every_scope):
        children.update(scope.children)
    for key, ref in list(_unscoped.items()):
        child = ref()
        if child is not None:
            children[key] = child
    found = [entry for entry in map(entry_of, list(children.values())) if entry is not None]
    seen = {id(entry[0]()) for entry in found}
    found += [entry for key, entry in list(_live.items()) if key not in seen and entry[0]() is not None]
    return found


class HandOff:
    """What is known about one running hand-off (a read-only view)."""

    __slots__ = ("_greenlet", "_parent", "scope", "function", "site", "started_at")

    scope: Scope | None
    site: Site | None
    started_at: float

    def __init__(self, entry: Entry) -> None:
        self._greenlet, self._parent, self.scope, self.function, self.site, self.started_at = entry[:6]

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
    return sorted(map(HandOff, _entries()), key=lambda r: r.started_at)


def record_of(child: greenlet.greenlet) -> HandOff | None:
    """The record of ``child`` if it is a running hand-off."""
    found = entry_of(child)
    return HandOff(found) if found is not None else None


def scope_entries(scope: Scope) -> list[Entry]:
    """The entries of the running hand-offs that hold ``scope`` (its own index)."""
    return [entry for entry in map(entry_of, list(scope.children.values())) if entry is not None]


def for_scope(scope: Scope) -> list[HandOff]:
    """The running hand-offs that hold ``scope`` (its own index: O(its children))."""
    return sorted(map(HandOff, scope_entries(scope)), key=lambda r: r.started_at)


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
    lines = [f"geventctx: {sum(map(len, groups.values()))} live hand-off(s)"]
    for key, records in groups.items():
        scope = scopes[key]
        lines.append(f"  {scope.label if scope is not None else '(no request)'}: {scope!r}")
        for r in records:
            name = getattr(r.function, "__qualname__", None) or repr(r.function)
            lines.append(f"    {name}  from {r.spawn_site}  age {r.age:.3f}s  {r.greenlet!r}")
    return "\n".join(lines)
