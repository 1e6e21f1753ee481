"""Group and Pool whose every method carries the caller's context.

gevent runs ``map``, ``map_async``, ``imap``, ``imap_unordered`` and a full
pool's ``apply_async`` through helper greenlets, and those helpers, not the
caller, spawn the workers. Giving the workers a context-carrying
``greenlet_class`` is therefore not enough: these classes also hand the
caller's context to each helper, which passes it on to the workers it spawns.
Helpers and workers are hand-offs, so a request's teardown waits for a
``map`` started in it, and the registry names the user's call as their site.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import typing as t

import gevent.pool
from gevent._imap import IMap, IMapUnordered

from . import _threads
from ._site import site_of
from .handoff import Greenlet, _base_start, attach, caller_site, hand_over_class

__all__ = ["Group", "Pool"]

_getframe = sys._getframe
_get_ident = _threads.get_ident
_GeventGroup = gevent.pool.Group
_GeventPool = gevent.pool.Pool
T = t.TypeVar("T")


def _call_with_value(callback: t.Callable[[t.Any], t.Any], box: list[t.Any]) -> t.Any:
    return callback(box[0])


class _ContextMappingMixin:
    """The mapping methods of gevent's Group, with the caller's context."""

    greenlet_class = Greenlet

    if t.TYPE_CHECKING:

        def spawn(self, func: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> Greenlet: ...
        def _apply_async_use_greenlet(self) -> bool: ...
        def apply_cb(self, func: t.Any, args: t.Any = None, kwds: t.Any = None, callback: t.Any = None) -> t.Any: ...

    def _helper(self, depth: int, function: t.Callable[..., t.Any], *args: t.Any) -> Greenlet:
        # A hand-off that is not tracked by the pool (as in gevent); the
        # workers it spawns inherit its context and its spawn site.
        # Forked like any hand-off: a fork may read per-greenlet state of
        # the spawner (Django's on asgiref 3.12+), so the workers' forks,
        # run in the helper, need the helper's own fork first.
        helper = Greenlet(function, *args)
        attach(helper, site_of(_getframe(depth)), function)
        _base_start(helper)
        return helper

    def _map_all(self, func: t.Callable[..., T], iterable: t.Iterable[t.Any]) -> list[T]:
        return [g.get() for g in [self.spawn(func, i) for i in iterable]]

    def _map_cb(
        self, func: t.Callable[..., T], iterable: t.Iterable[t.Any], callback: t.Any = None
    ) -> list[T]:
        result = self._map_all(func, iterable)
        if callback is not None:
            callback(result)
        return result

    def map(self, func: t.Callable[..., T], iterable: t.Iterable[t.Any]) -> list[T]:
        """Results of ``func`` over ``iterable``, in order, each in the caller's context."""
        return self._helper(2, self._map_all, func, iterable).get()  # type: ignore[no-any-return]

    def map_async(
        self, func: t.Callable[..., t.Any], iterable: t.Iterable[t.Any], callback: t.Any = None
    ) -> Greenlet:
        """A greenlet computing :meth:`map`; ``callback(result)`` runs in the caller's context."""
        return self._helper(2, self._map_cb, func, iterable, callback)

    def _imap(self, cls: type[IMapUnordered], func: t.Any, iterables: t.Any, maxsize: int | None) -> t.Any:
        helper = cls(func, zip(*iterables, strict=False), spawn=self.spawn, _zipped=True, maxsize=maxsize)
        attach(helper, site_of(_getframe(2)), func)
        _base_start(helper)
        return helper

    def imap(
        self, func: t.Callable[..., T], *iterables: t.Iterable[t.Any], maxsize: int | None = None
    ) -> t.Iterator[T]:
        """Like :meth:`gevent.pool.Group.imap`, each call in the caller's context."""
        return self._imap(IMap, func, iterables, maxsize)  # type: ignore[no-any-return]

    def imap_unordered(
        self, func: t.Callable[..., T], *iterables: t.Iterable[t.Any], maxsize: int | None = None
    ) -> t.Iterator[T]:
        """Like :meth:`gevent.pool.Group.imap_unordered`, each call in the caller's context."""
        return self._imap(IMapUnordered, func, iterables, maxsize)  # type: ignore[no-any-return]

    def apply_async(
        self,
        func: t.Callable[..., t.Any],
        args: t.Sequence[t.Any] | None = None,
        kwds: t.Mapping[str, t.Any] | None = None,
        callback: t.Callable[[t.Any], t.Any] | None = None,
    ) -> Greenlet:
        """Like gevent's, with ``func`` and ``callback`` in the caller's context."""
        args = tuple(args) if args is not None else ()
        kwds = dict(kwds) if kwds is not None else {}
        if self._apply_async_use_greenlet():
            # Full: spawning would block, so a helper outside the pool waits.
            return self._helper(2, self.apply_cb, func, args, kwds, callback)
        task = self.spawn(func, *args, **kwds)
        if callback is not None:
            # Hand the callback off now, in this context, so that it holds
            # the request scope from here; start it when the task succeeds.
            box: list[t.Any] = []
            runner = Greenlet(_call_with_value, callback, box)
            attach(runner, site_of(_getframe(1)), callback)

            def _on_done(done: gevent.Greenlet) -> None:
                if done.successful():
                    box.append(done.value)
                    _base_start(runner)
                else:
                    runner.kill(block=False)

            task.rawlink(_on_done)
        return task

    def _apply_async_cb_spawn(self, callback: t.Callable[[t.Any], t.Any], result: t.Any) -> None:
        # apply_cb's callback: a hand-off from the caller of apply_cb.
        runner = Greenlet(callback, result)
        runner.start()


class _HandOverMixin:
    """``spawn`` from another thread than the pool's — in a ThreadPool task of
    a request — is handed over to the request's hub (:mod:`geventctx._threads`)."""

    #: The thread the pool was made in (set by the classes' __init__).
    _geventctx_thread: int | None = None

    def spawn(self, *args: t.Any, **kwargs: t.Any) -> Greenlet:
        made_in = self._geventctx_thread
        if made_in is not None and made_in != _get_ident():
            hub = _threads.request_hub_of(made_in, _OTHER_THREAD.format(what="spawn"))
            # f_back: a compiled caller (imap's helper) has no Python frame.
            site = caller_site(_getframe(0).f_back)
            return _threads.on_owner_hub(hub, self._spawn_handed_over, site, args, kwargs)
        return super().spawn(*args, **kwargs)  # type: ignore[misc,no-any-return]

    def _spawn_handed_over(self, site: t.Any, args: t.Any, kwargs: t.Any) -> Greenlet:
        child = Greenlet(*args, **kwargs)
        hand_over_class(child)
        attach(child, site, getattr(child, "_run", None))
        self.start(child)  # type: ignore[attr-defined]
        return child

    def _own_thread(self, what: str) -> None:
        # The mapping methods start helpers that wait in this thread's hub:
        # from another thread only spawn is handed over.
        made_in = self._geventctx_thread
        if made_in is not None and made_in != _get_ident():
            raise RuntimeError(_OTHER_THREAD.format(what=what))


def _own_thread_only(name: str) -> t.Callable[..., t.Any]:
    # A mapping method of the pool that may only be called in its own thread.
    def method(self: _HandOverMixin, *args: t.Any, **kwargs: t.Any) -> t.Any:
        self._own_thread(name)
        return getattr(super(_HandOverMixin, self), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name in ("map", "map_async", "imap", "imap_unordered", "apply", "apply_async", "apply_cb"):
    setattr(_HandOverMixin, _name, _own_thread_only(_name))


_OTHER_THREAD = (
    "geventctx Pool/Group.{what}() called from another thread than the one that made the pool: a pool "
    "belongs to its thread's hub. In a ThreadPool task of a request, spawn() is handed over to the "
    "request's hub (join the children there or from the task); for the rest, make a pool in the task."
)


class Group(_HandOverMixin, _ContextMappingMixin, _GeventGroup):  # type: ignore[misc,valid-type]
    """A :class:`gevent.pool.Group` whose greenlets run in the caller's context.

    ``spawn``, ``apply``, ``apply_async``, ``apply_cb``, ``map``,
    ``map_async``, ``map_cb``, ``imap`` and ``imap_unordered`` all carry the
    context of the greenlet that calls them.

    .. versionadded:: 0.1
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        # gevent's own base, named: a harness may rebind gevent.pool.Group.
        _GeventGroup.__init__(self, *args, **kwargs)
        self._geventctx_thread = _get_ident()


class Pool(_HandOverMixin, _ContextMappingMixin, _GeventPool):  # type: ignore[misc,valid-type]
    """A :class:`gevent.pool.Pool` whose greenlets run in the caller's context.

    When the pool is full, ``spawn`` waits for a free slot (backpressure) and
    then starts the child in the context the caller has at that moment.

    .. versionadded:: 0.1
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        _GeventPool.__init__(self, *args, **kwargs)
        self._geventctx_thread = _get_ident()
