"""Each child's own Flask app context (DESIGN G3, G4).

The rule: a child handed off in a Flask app context runs in an app context
of its own, made at the hand-off (a :mod:`geventctx.forks` fork, in the
child's snapshot) and torn down when the child ends (the fork's end), in
the child. Flask never used one app context from several greenlets and its
extensions rely on that: whatever is keyed on the app context —
Flask-SQLAlchemy's ``db.session`` first of all — is the child's own.

- **Same request, same app.** The child's context carries the view's
  ``app``, URL adapter (not rebuilt) and, on Flask 3.2, the view's request,
  session (opened by the view's context, also when the child opens it
  first) and after-request list. On Flask 2.3-3.1 the request context is
  the view's own object, as before.
- **Its own** ``g``: an instance of the app's ``app_ctx_globals_class``
  (subclassed once per class) that reads through to the spawner's ``g``.
  Names are the child's own, objects are shared: what the child sets,
  deletes or pops stays in the child. ``g.get(name)``, ``name in g`` and
  iteration see the spawner's names too; ``g.pop(name)`` of a name only the
  spawner set returns the spawner's value and hides the name in the child
  (the spawner keeps it); ``g.setdefault`` sets in the child. A name
  registered with :func:`fork_g` (Flask-Babel's ``_flask_babel`` by
  default) is *copied* into the child at the hand-off: an extension's
  per-context state kept in one mutable object.
- **Teardown.** When the child ends, Flask's ``do_teardown_appcontext``
  runs with the child's context current and the child's exception (``None``
  if it returned, what it raised, the kill's exception) — so
  ``teardown_appcontext`` functions and ``appcontext_tearing_down``
  receivers run once per child. During it, ``g`` shows only what the child
  set: a child never closes what the view opened (write teardown functions
  with ``g.pop(name, None)``). Afterwards ``g`` reads through again, for
  the hand-offs the child made. An app with no ``teardown_appcontext``
  function and no ``appcontext_tearing_down`` receiver at the hand-off
  has nothing to run: no end, no wrapper frame.
- **A teardown does not hand off a teardown.** A hand-off made while a
  child's context is torn down (a ``teardown_appcontext`` function that
  spawns) gets an app context of its own with no teardown: otherwise such
  a function would spawn again at each child's end, for ever.
- **Signals.** A child's context is not pushed: ``appcontext_pushed`` and
  ``appcontext_popped`` are not sent for it; ``appcontext_tearing_down``
  is (Flask sends it from ``do_teardown_appcontext``).

The fork acts on every Flask app context once :mod:`geventctx.flask` is
imported — a request of an app with the extension or without, a CLI
command, ``with app.app_context():``, a Celery task — for every hand-off
kind and for plain greenlets under :func:`geventctx.patch`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import copy
import logging
import typing as t
from contextvars import ContextVar

from flask.ctx import AppContext
from flask.signals import appcontext_tearing_down

from . import _flask_compat as compat
from . import forks

__all__ = ["fork_g", "unfork_g", "forked_g", "ChildAppContext"]

log = logging.getLogger("geventctx")

_cv_app = compat._cv_app
_NOTHING: t.Any = object()
#: Set while a child's app context is torn down (in the child).
_TEARING_DOWN: ContextVar[bool] = ContextVar("geventctx.child_teardown", default=False)

#: ``g`` names copied into each child at the hand-off, with their copier.
_forked_g: dict[str, t.Callable[[t.Any], t.Any]] = {"_flask_babel": copy.copy}


def fork_g(name: str, copier: t.Callable[[t.Any], t.Any] = copy.copy) -> None:
    """Give each child a copy (``copier(value)``) of ``g.<name>`` instead of
    the spawner's object: for an extension that keeps per-context state in
    one mutable object in ``g``.

    .. versionadded:: 0.2
    """
    _forked_g[name] = copier


def unfork_g(name: str) -> None:
    """Share ``g.<name>`` with children again (nothing if not registered)."""
    _forked_g.pop(name, None)


def forked_g() -> list[str]:
    """The ``g`` names copied into each child, in registration order."""
    return list(_forked_g)


class _ReadThrough:
    """The child's ``g`` behaviour, mixed into the app's globals class (see
    the module's rule). Its own names are its ``__dict__``; the spawner's
    ``g`` and the names hidden from it are slots, so iteration and
    ``vars(g)`` show only names."""

    __slots__ = ("_geventctx_parent", "_geventctx_hidden")

    _geventctx_parent: t.Any
    _geventctx_hidden: set[str] | None

    def _geventctx_inherits(self, name: str) -> bool:
        parent = self._geventctx_parent
        if parent is None:
            return False
        hidden = self._geventctx_hidden
        return (hidden is None or name not in hidden) and name in parent

    def _geventctx_hide(self, name: str) -> None:
        if self._geventctx_hidden is None:
            object.__setattr__(self, "_geventctx_hidden", {name})
        else:
            self._geventctx_hidden.add(name)

    def __getattr__(self, name: str) -> t.Any:
        # Only for names the child does not have itself (a read of the
        # view's g from a child: kept short).
        if name[0] == "_" and (name.startswith("__") or name.startswith("_geventctx_")):
            raise AttributeError(name)
        hidden = self._geventctx_hidden
        if hidden is None or name not in hidden:
            parent = self._geventctx_parent
            if parent is not None:
                return getattr(parent, name)  # AttributeError if the parent lacks it too
        raise AttributeError(name)

    def __setattr__(self, name: str, value: t.Any) -> None:
        super().__setattr__(name, value)
        hidden = self._geventctx_hidden
        if hidden:
            hidden.discard(name)

    def __delattr__(self, name: str) -> None:
        inherited = self._geventctx_inherits(name)
        if name in self.__dict__:
            super().__delattr__(name)
        elif not inherited:
            raise AttributeError(name)
        if inherited:
            self._geventctx_hide(name)

    def get(self, name: str, default: t.Any = None) -> t.Any:
        own = self.__dict__
        if name in own:
            return own[name]
        if self._geventctx_inherits(name):
            return self._geventctx_parent.get(name, default)
        return default

    def pop(self, name: str, default: t.Any = _NOTHING) -> t.Any:
        own = self.__dict__
        inherited = self._geventctx_inherits(name)
        if name in own:
            value = own.pop(name)
        elif inherited:
            value = self._geventctx_parent.get(name)
        elif default is _NOTHING:
            raise KeyError(name)
        else:
            return default
        if inherited:
            self._geventctx_hide(name)
        return value

    def setdefault(self, name: str, default: t.Any = None) -> t.Any:
        if name in self:
            return self.get(name)
        setattr(self, name, default)
        return default

    def __contains__(self, name: str) -> bool:
        return name in self.__dict__ or self._geventctx_inherits(name)

    def __iter__(self) -> t.Iterator[str]:
        own = self.__dict__
        names = list(own)
        parent = self._geventctx_parent
        if parent is not None:
            hidden = self._geventctx_hidden or ()
            names.extend(name for name in parent if name not in own and name not in hidden)
        return iter(names)


_child_classes: dict[type, type] = {}


def _child_g_class(base: type) -> type:
    cls = _child_classes.get(base)
    if cls is None:
        cls = _child_classes[base] = type(
            f"Child{base.__name__}", (_ReadThrough, base), {"__slots__": (), "_geventctx_base": base}
        )
    return cls


_set_dict = object.__setattr__


def _own_view(g: t.Any) -> t.Any:
    """A plain ``g`` of the child's base class sharing its ``__dict__``:
    only what the child set (for its teardown)."""
    view = object.__new__(g._geventctx_base)
    _set_dict(view, "__dict__", g.__dict__)
    return view


class ChildAppContext(AppContext):
    """A child's own app context (see the module's rule). Made by the
    hand-off's fork, never pushed; torn down when called (it is the fork's
    end: ``ctx(error)``).

    Made for P1 and P5 (DESIGN: the child's own app context adds at most
    2 µs and 2 GC-tracked objects per hand-off): state in slots, no
    ``__dict__``; its ``g`` and its ``_cv_tokens`` list made on first use.

    .. versionadded:: 0.2
    """

    if compat.MERGED:
        # Flask 3.2: the request's data lives in the (merged) context and
        # goes in __dict__; the session is opened by the view's context,
        # whoever asks first.
        __slots__: tuple[str, ...] = ("_geventctx_g", "_geventctx_parent_g", "_geventctx_tokens")

        def _get_session(self) -> t.Any:
            return self.__dict__["_geventctx_parent"]._get_session()

        def copy(self) -> t.Any:
            # copy_current_request_context in a child: a plain context.
            cls: t.Any = AppContext
            return cls(self.app, request=self.__dict__["_request"], session=self._get_session())
    else:
        __slots__ = ("app", "url_adapter", "_geventctx_g", "_geventctx_parent_g", "_geventctx_tokens")

    _geventctx_g: t.Any
    _geventctx_parent_g: t.Any
    _geventctx_tokens: list[t.Any]

    @property
    def g(self) -> t.Any:
        g = self._geventctx_g
        if g is None:
            parent_g = self._geventctx_parent_g
            base: t.Any = type(parent_g)
            base = getattr(base, "_geventctx_base", base)
            g_class = _child_classes.get(base) or _child_g_class(base)
            g = self._geventctx_g = _new_object(g_class)
            _set_parent(g, parent_g)
            _set_hidden(g, None)
        return g

    @g.setter
    def g(self, value: t.Any) -> None:
        self._geventctx_g = value

    @property
    def _cv_tokens(self) -> list[t.Any]:  # type: ignore[override]
        try:
            return self._geventctx_tokens
        except AttributeError:
            tokens: list[t.Any] = []
            self._geventctx_tokens = tokens
            return tokens

    def __call__(self, error: BaseException | None) -> None:
        """The child ended: run Flask's app-context teardown for this
        context, in the child, with ``g`` showing only the child's names."""
        g = self.g
        self.g = _own_view(g)
        app = self.app
        token = _cv_app.set(self) if _cv_app.get(None) is not self else None
        tearing_down = _TEARING_DOWN.set(True)
        try:
            teardown: t.Any = type(app).do_teardown_appcontext
            if compat.MERGED:
                teardown(app, self, error)
            else:
                teardown(app, error)
        finally:
            _TEARING_DOWN.reset(tearing_down)
            if token is not None:
                _cv_app.reset(token)
            self.g = g


#: Slot setters (faster than setattr per hand-off, and no __dict__).
_set_parent = t.cast(t.Any, _ReadThrough.__dict__["_geventctx_parent"]).__set__
_set_hidden = t.cast(t.Any, _ReadThrough.__dict__["_geventctx_hidden"]).__set__
_slot = ChildAppContext.__dict__
_set_parent_g = t.cast(t.Any, _slot["_geventctx_parent_g"]).__set__
_set_own_g = t.cast(t.Any, _slot["_geventctx_g"]).__set__
_new_object = object.__new__
if not compat.MERGED:
    _set_app = t.cast(t.Any, _slot["app"]).__set__
    _set_url_adapter = t.cast(t.Any, _slot["url_adapter"]).__set__


def _fork_app_context() -> forks.End | None:
    """The fork: in a child's snapshot, an app context of its own.

    Every line is on the hand-off path of a child in an app context (P1's
    and P5's app-context rows): no URL adapter rebuilt, no ``__init__``, no
    ``g`` until the child uses it — but for a name registered with
    :func:`fork_g` the spawner has, copied now."""
    parent = _cv_app.get(None)
    if parent is None:
        return None
    app = parent.app
    child = _new_object(ChildAppContext)
    parent_g = parent.g
    _set_parent_g(child, parent_g)
    _set_own_g(child, None)  # made on first use (the g property)
    if _forked_g and (isinstance(parent_g, _ReadThrough) or not _forked_g.keys().isdisjoint(parent_g.__dict__)):
        own = _forked_names(parent_g)
        if own is not None:
            g = child.g
            g.__dict__.update(own)
    if compat.MERGED:
        parent_state = parent.__dict__
        child.__dict__.update(
            app=app, url_adapter=parent.url_adapter, _request=parent_state.get("_request"),
            _session=parent_state.get("_session"), _flashes=parent_state.get("_flashes"),
            _after_request_functions=parent_state.get("_after_request_functions"),
            _cv_token=None, _push_count=0, _geventctx_parent=parent,
        )
    else:
        _set_app(child, app)
        _set_url_adapter(child, parent.url_adapter)
    _cv_app.set(child)
    if (app.teardown_appcontext_funcs or appcontext_tearing_down.receivers) and not _TEARING_DOWN.get():
        return child
    return None


def _forked_names(parent_g: t.Any) -> dict[str, t.Any] | None:
    """Copies of the registered names ``parent_g`` has (``None``: none)."""
    own: dict[str, t.Any] | None = None
    parent_own = parent_g.__dict__
    for name in _forked_g:
        if name in parent_own:
            value = parent_own[name]
        elif isinstance(parent_g, _ReadThrough) and name in parent_g:
            value = parent_g.get(name)
        else:
            continue
        try:
            copied = _forked_g[name](value)
        except Exception:
            log.exception("copying g.%s for a child failed; the child shares the spawner's", name)
            continue
        if own is None:
            own = {}
        own[name] = copied
    return own


forks.register(_fork_app_context)
