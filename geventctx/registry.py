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
    from contextvars import Context

    import greenlet

    from .scope import Scope

__all__ = ["HandOff", "live", "record_of", "for_scope", "dump"]

_monotonic = time.monotonic

_ref = weakref.ref

# The rule for records: a hand-off's record is a :class:`HandOff`, with
# named fields. A geventctx greenlet keeps the same fields in its own slots
# (see handoff.Greenlet: no allocation on the spawn path) and gets its
# HandOff when one is asked for (:func:`record_of`); it is indexed by its
# scope's ``children`` (``id`` -> child) or, outside a request, by
# :data:`_unscoped`. Anything else (a ThreadPool task's AsyncResult, a
# plain gevent greenlet handed off) has its HandOff in :data:`_live`, and
# its scope indexes the object itself. Either is removed by the child's own
# end, before the child can be freed, so an id is never reused while it is
# indexed.

#: id(child) -> record, for running hand-offs that are not geventctx greenlets.
_live: dict[int, HandOff] = {}

#: id(child) -> weakref to child, for running geventctx greenlets outside
#: any request (weakly: nothing of a process-wide index keeps a child alive;
#: a scope's own index holds its children for as long as the scope lives).
_unscoped: dict[int, weakref.ref[t.Any]] = {}


def _no_parent() -> None:
    return None


#: Where a child's record says the site is to be read from its spawning stack.
LAZY_SITE: t.Any = ("<lazy>", 0)


def record_of(child: t.Any) -> HandOff | None:
    """The record of ``child`` if it is a running hand-off."""
    started = getattr(child, "_geventctx_started", None)
    if started is not None:
        return HandOff(
            _ref(child),
            getattr(child, "spawning_greenlet", None) or _no_parent,
            child._geventctx_scope,
            child._geventctx_function,
            site_of_child(child),
            started,
        )
    found = _live.get(id(child))
    if found is not None and found._greenlet() is child:
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
            helper = record_of(parent()) if parent is not None else None
            site = helper.site if helper is not None else None
        child._geventctx_site = site
    return t.cast("Site | None", site)


def _records() -> list[HandOff]:
    from .scope import _every_scope

    children: dict[int, t.Any] = {}
    for scope in list(_every_scope):
        children.update(scope.children)
    for key, ref in list(_unscoped.items()):
        child = ref()
        if child is not None:
            children[key] = child
    found = [record for record in map(record_of, list(children.values())) if record is not None]
    seen = {id(record.greenlet) for record in found}
    found += [record for key, record in list(_live.items()) if key not in seen and record.greenlet is not None]
    return found


class HandOff:
    """The record of one running hand-off: what it runs, for which request,
    from which line, since when (read-only for users).

    ``context`` is the Context a ThreadPool task runs in (its error is
    logged there, see :func:`geventctx.errorlog.report_task`); ``None`` for
    a greenlet, whose Context is its own.
    """

    __slots__ = ("_greenlet", "_parent", "scope", "function", "site", "started_at", "context")

    def __init__(
        self,
        greenlet: t.Callable[[], t.Any],
        parent: t.Callable[[], t.Any],
        scope: Scope | None,
        function: t.Any,
        site: Site | None,
        started_at: float,
        context: Context | None = None,
    ) -> None:
        self._greenlet = greenlet
        self._parent = parent
        self.scope = scope
        self.function = function
        self.site = site
        self.started_at = started_at
        self.context = context

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


def record(
    child: t.Any,
    parent: greenlet.greenlet,
    scope: Scope | None,
    function: t.Any,
    site: Site | None,
    context: Context | None = None,
) -> HandOff:
    """The record of a hand-off starting now (``child`` ``None``: set its
    ``_greenlet`` reference once the child exists)."""
    own = _ref(child) if child is not None else _no_parent
    return HandOff(own, _ref(parent), scope, function, site, _monotonic(), context)


def live() -> list[HandOff]:
    """A snapshot of the records of all running hand-offs, oldest first."""
    return sorted(_records(), key=lambda r: r.started_at)


def scope_records(scope: Scope) -> list[HandOff]:
    """The records of the running hand-offs that hold ``scope`` (its own index)."""
    return [record for record in map(record_of, list(scope.children.values())) if record is not None]


def for_scope(scope: Scope) -> list[HandOff]:
    """The running hand-offs that hold ``scope`` (its own index: O(its children))."""
    return sorted(scope_records(scope), key=lambda r: r.started_at)


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
