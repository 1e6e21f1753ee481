"""Declared context travels with Celery tasks.

The rule: **a task runs its body in a Context of its own, made for that run
from the worker's context with every declared variable set to the value its
message carried, and dropped when the body ends, however it ends.** Nothing
is set in a Context another task (or the worker) runs in, so nothing needs
resetting: return, raise, ``retry()``, a revoke that kills it and a soft
time limit all leave the worker as it was, under ``-P gevent`` (many tasks
in one process, each in its own greenlet), ``-P threads`` and prefork alike.

.. code-block:: python

    from contextvars import ContextVar
    from geventctx.celery import carry, install

    request_id = carry(ContextVar("request_id"))
    app = Celery("proj")
    install(app)          # in the web process and in the worker

    @app.task
    def send_report(user_id):
        log.info("for request %s", request_id.get())   # the view's value

Only variables declared with :func:`carry` travel, never the whole context
(Flask's ``request`` and ``g`` cannot leave the process). A publish carries
the declared values of the Context it is made in, as of the call: through
each variable's codec (``dumps``, default: the value itself), into one JSON
object in the task header ``geventctx`` (:data:`HEADER`), no pickle, at most
``max_header_bytes``. In the worker each value goes through ``loads``.

The mechanisms, each with its reason:

- Publish side: :func:`install` gives the app an AMQP class whose
  ``send_task_message`` adds the header: the one function every task
  message goes through (``delay``, ``apply_async``, signatures, canvases,
  ``send_task``, ``retry``). Not the ``before_task_publish`` signal: Celery
  logs and swallows what a signal receiver raises, so a value that cannot
  travel would silently be lost.
- Worker side: a ``__call__`` on the app's task class (``app.Task``; a task
  of the app made from another base is given it when the app is finalized),
  which Celery's tracer calls as the task body. Not ``task_prerun``: a
  receiver's ``var.set()`` lands in whatever Context the pool's greenlet or
  thread happens to run in, shared or reused.
- Publishes the worker makes for a task outside its body (the next link of
  a chain, ``link`` callbacks) carry that task's header on, as it arrived.
- Eager mode (``task_always_eager``, ``apply()``) publishes nothing: the
  values go through their codecs all the same, at the call, and the task
  body runs in a copy of the caller's Context with them set (the caller's
  process is the worker here), so its writes never reach the caller.

Cost (``make bench``, benchmarks/celery_publish.py): per publish that
carries something a context snapshot, the codecs and one ``json`` encode,
about 5 µs (a publish over kombu's in-memory transport is ~320 µs); per
task in the worker one ``json`` decode, a context copy and a ``set`` per
value, 11-16 µs through Celery's own tracer (budget 20 µs).

.. versionadded:: 0.2
"""

from __future__ import annotations

import json
import typing as t
import warnings
from contextvars import Context, ContextVar, copy_context

try:
    from celery import signals as _signals
    from celery._state import _task_stack
    from celery.app.amqp import AMQP as _AMQP
    from celery.app.task import Task as _BaseTask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("geventctx.celery needs Celery: pip install 'geventctx[celery]'") from exc
from kombu.utils.imports import symbol_by_name as _symbol_by_name
from kombu.utils.objects import cached_property as _cached_property

from .errors import CarryError, CarryWarning

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "HEADER",
    "carry",
    "carried",
    "encode_current",
    "install",
    "parent_task_id",
    "task_id",
]

T = t.TypeVar("T")

#: The one task header the declared values travel in (a JSON object, as text).
HEADER = "geventctx"
#: ``install(app, max_header_bytes=...)`` default: 8 KiB of encoded header.
DEFAULT_MAX_HEADER_BYTES = 8192

#: The running task's id, set for the task's body (``None`` outside a task;
#: set exactly in a task body's own Context and the hand-offs made from it).
task_id: ContextVar[str | None] = ContextVar("geventctx.celery.task_id", default=None)
#: The id of the task that published the running one, if a task did.
parent_task_id: ContextVar[str | None] = ContextVar("geventctx.celery.parent_task_id", default=None)


_OnError = t.Literal["raise", "warn"]
_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class _Declared(t.NamedTuple):
    var: ContextVar[t.Any]
    name: str
    dumps: t.Callable[[t.Any], t.Any] | None
    loads: t.Callable[[t.Any], t.Any] | None


_by_name: dict[str, _Declared] = {}
# The same declarations as a tuple, read on every publish and task.
_declared: tuple[_Declared, ...] = ()


def carry(
    var: ContextVar[T],
    name: str | None = None,
    dumps: t.Callable[[T], t.Any] | None = None,
    loads: t.Callable[[t.Any], T] | None = None,
) -> ContextVar[T]:
    """Declare that ``var`` travels with every Celery task published from a
    Context where it is set; returns ``var``.

    ``name`` (default: ``var.name``) is its key in the header: the publisher
    and the worker must declare the same name. ``dumps`` turns the value into
    something JSON can encode (default: the value itself) and ``loads`` turns
    that back in the worker. A variable that is not set (or only has its
    default) does not travel. Declare at import time, in both processes;
    declaring the same variable again replaces its codecs.

    .. versionadded:: 0.2
    """
    global _declared
    if not isinstance(var, ContextVar):
        raise TypeError(f"carry() takes a contextvars.ContextVar, not {type(var).__name__}")
    key = var.name if name is None else name
    if not isinstance(key, str) or not key:
        raise ValueError(f"carry(): the name must be a non-empty string, not {key!r}")
    known = _by_name.get(key)
    if known is not None and known.var is not var:
        raise ValueError(f"carry(): the name {key!r} is already declared for another ContextVar ({known.var!r})")
    for other in _declared:
        if other.var is var and other.name != key:
            raise ValueError(f"carry(): {var!r} is already declared as {other.name!r}")
    _by_name[key] = _Declared(var, key, dumps, loads)
    _declared = tuple(_by_name.values())
    return var


def carried() -> dict[str, ContextVar[t.Any]]:
    """The declared variables, by header name.

    .. versionadded:: 0.2
    """
    return {d.name: d.var for d in _declared}


class _Settings:
    __slots__ = ("max_header_bytes", "on_error")

    def __init__(self, max_header_bytes: int, on_error: _OnError) -> None:
        self.max_header_bytes = max_header_bytes
        self.on_error = on_error


_DEFAULTS = _Settings(DEFAULT_MAX_HEADER_BYTES, "raise")


def _settings_of(app: t.Any) -> _Settings:
    settings: _Settings = getattr(app, "_geventctx_celery", _DEFAULTS)
    return settings


# -- publish side -----------------------------------------------------------


def _refuse(settings: _Settings, message: str) -> None:
    if settings.on_error == "raise":
        raise CarryError(message)
    warnings.warn(message, CarryWarning, stacklevel=2)


def encode_current(app: t.Any = None) -> str | None:
    """The ``geventctx`` header a publish made here (to ``app``) would carry:
    JSON text, or ``None`` when no declared variable is set.

    Raises :class:`~geventctx.CarryError` for a value that cannot travel or
    a header over the limit (with ``install(app, on_error="warn")``: warns
    and leaves it out).

    .. versionadded:: 0.2
    """
    return _encode(_settings_of(app), "?")


def _encode(settings: _Settings, task_name: str) -> str | None:
    context = copy_context()
    values: dict[str, t.Any] = {}
    for declared in _declared:
        if declared.var in context:
            value = context[declared.var]
            if declared.dumps is not None:
                try:
                    value = declared.dumps(value)
                except Exception as exc:
                    _refuse(
                        settings, f"{declared.name!r} cannot travel with task {task_name}: its dumps raised {exc!r}"
                    )
                    continue
            values[declared.name] = value
    if not values:
        return None
    try:
        text: str = _encoder.encode(values)
    except (TypeError, ValueError):
        text = _encode_safe(settings, task_name, values)
        if not text:
            return None
    if len(text) > settings.max_header_bytes:  # ASCII: one character, one byte
        _refuse(
            settings,
            f"the declared context of task {task_name} encodes to {len(text)} bytes, over the "
            f"{settings.max_header_bytes}-byte limit (install(app, max_header_bytes=...)): "
            f"names {sorted(values)}",
        )
        return None
    return text


def _encode_safe(settings: _Settings, task_name: str, values: dict[str, t.Any]) -> str:
    # The whole object failed to encode: name the culprits (and, warning,
    # send the rest).
    for name in list(values):
        try:
            _encoder.encode(values[name])
        except (TypeError, ValueError) as exc:
            _refuse(
                settings,
                f"{name!r} cannot travel with task {task_name}: {type(values[name]).__name__} value is not "
                f"JSON-safe ({exc}); give carry() a dumps/loads pair",
            )
            del values[name]
    return _encoder.encode(values) if values else ""


# True once this process is a worker: worker_init was sent, or a task ran here
# from a message.
_in_worker = False


def _worker_started(**_: t.Any) -> None:
    global _in_worker
    _in_worker = True


_signals.worker_init.connect(_worker_started, weak=False)


def _header_for_publish(app: t.Any, task_name: str) -> str | None:
    if _in_worker and task_id.get() is None:
        # Outside any task body in a worker: the tracer publishing for the
        # task it runs (its chain's next link, its callbacks) passes that
        # task's header on; anywhere else the current Context counts.
        # (Only in a worker: reading Celery's task stack costs ~3 µs, the
        # publish budget.)
        task = app.current_worker_task if _task_stack.top is not None else None
        if task is not None:
            request = task.request
            if not request.is_eager:
                header = request.get(HEADER)
                return header if isinstance(header, str) else None
    return _encode(_settings_of(app), task_name)


def _carrying_sender(app: t.Any, send: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    if getattr(send, "_geventctx", False):
        return send

    def send_task_message(producer: t.Any, name: str, message: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        header = _header_for_publish(app, name)
        if header is not None:
            # message is Celery's task_message (headers, properties, body,
            # sent_event); an explicit headers={"geventctx": ...} of the
            # caller is applied after this, by Celery, and wins.
            message[0][HEADER] = header
        return send(producer, name, message, *args, **kwargs)

    send_task_message._geventctx = True  # type: ignore[attr-defined]
    return send_task_message


class CarryingAMQP(_AMQP):
    """The app's AMQP class once installed: its ``send_task_message`` (made
    once per app, from the configuration) puts the header on every message.

    .. versionadded:: 0.2
    """

    @_cached_property
    def send_task_message(self) -> t.Callable[..., t.Any]:
        return _carrying_sender(self.app, super().send_task_message)


_carrying_amqp_classes: dict[type, type] = {_AMQP: CarryingAMQP}


def _install_sender(app: t.Any) -> None:
    if "amqp" in vars(app):
        # Already made (and configured): wrap its sender in place, the one
        # instance patch of this module.
        amqp = app.amqp
        amqp.send_task_message = _carrying_sender(app, amqp.send_task_message)
        return
    cls: type = _symbol_by_name(app.amqp_cls)  # type: ignore[no-untyped-call]
    if not issubclass(cls, CarryingAMQP):
        made = _carrying_amqp_classes.get(cls)
        if made is None:
            made = _carrying_amqp_classes[cls] = type(cls.__name__, (CarryingAMQP, cls), {})
        # Made when first used, after the app is configured.
        app.amqp_cls = made


# -- worker side ------------------------------------------------------------


def _bad_header(task: t.Any, request: t.Any, why: str) -> dict[ContextVar[t.Any], t.Any]:
    warnings.warn_explicit(
        f"task {task.name}[{request.id}] runs without its carried context: the {HEADER!r} header {why}",
        CarryWarning,
        __file__,
        0,
        registry={},  # one warning per task, not once per process
    )
    return {}


def _decode(task: t.Any, request: t.Any, header: t.Any) -> dict[ContextVar[t.Any], t.Any]:
    """The declared variables and values a task's ``header`` carries.

    A header that is not ours (not JSON text of an object) or a value its
    ``loads`` refuses: one :class:`CarryWarning`, and no values at all. A
    name this process does not declare is left out (a publisher deployed
    ahead of its worker).
    """
    if not isinstance(header, str):
        return _bad_header(task, request, f"is a {type(header).__name__}, not JSON text")
    try:
        raw = json.loads(header)
    except ValueError as exc:
        return _bad_header(task, request, f"is not JSON ({exc})")
    if not isinstance(raw, dict):
        return _bad_header(task, request, f"holds a {type(raw).__name__}, not an object")
    values: dict[ContextVar[t.Any], t.Any] = {}
    for name, value in raw.items():
        declared = _by_name.get(name)
        if declared is None:
            continue
        if declared.loads is not None:
            try:
                value = declared.loads(value)
            except Exception as exc:
                return _bad_header(task, request, f"holds {name!r} that its loads refused ({exc!r})")
        values[declared.var] = value
    return values


def _task_context(values: dict[ContextVar[t.Any], t.Any]) -> Context:
    # A copy of the worker's context (what other libraries set for the
    # worker, or in task_prerun, stays visible) ...
    context = copy_context()
    for declared in _declared:
        if declared.var in context and declared.var not in values:
            # ... unless it holds a declared value this task did not carry
            # (set at worker level, or handed down by patch()): not this
            # task's, so a Context without the declared ones.
            stale = {d.var for d in _declared}
            fresh = Context()
            fresh.run(_fill, [(var, value) for var, value in context.items() if var not in stale])
            return fresh
    return context


def _fill(pairs: list[tuple[ContextVar[t.Any], t.Any]]) -> None:
    for var, value in pairs:
        var.set(value)


def _body(
    request: t.Any,
    values: dict[ContextVar[t.Any], t.Any],
    call: t.Callable[..., t.Any],
    args: tuple[t.Any, ...],
    kwargs: dict[str, t.Any],
) -> t.Any:
    # Runs in the task's own Context: every set here ends with it.
    task_id.set(request.id)
    parent_task_id.set(request.parent_id)
    for var, value in values.items():
        var.set(value)
    return call(*args, **kwargs)


class CarryingTask:
    """Mixed into an installed app's task classes (``app.Task`` and any other
    base its tasks have): the task body runs in its own Context holding the
    carried values.

    .. versionadded:: 0.2
    """

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        request = self.request_stack.top  # type: ignore[attr-defined]
        if request is None or request.called_directly:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]  # a plain call: no task run
        cls = type(self)
        plain = _plain_call.get(cls)
        if plain is None:
            plain = _plain_call[cls] = _next_call(cls) is _BaseTask.__call__
        # The tracer already pushed the task and its request: with no other
        # __call__ to honour, run the body as Celery's tracer does for a task
        # without one (Task.__call__ would push both again: ~25 µs, the
        # worker-side budget).
        call = self.run if plain else super().__call__  # type: ignore[attr-defined,misc]
        header = request.get(HEADER)
        if request.is_eager:
            if header is None:
                header = (request.headers or {}).get(HEADER)
        elif not _in_worker:
            _worker_started()
        values = {} if header is None else _decode(self, request, header)
        return _task_context(values).run(_body, request, values, call, args, kwargs)

    def apply(self, args: t.Any = None, kwargs: t.Any = None, *more: t.Any, **options: t.Any) -> t.Any:
        # Eager runs publish nothing: the header is made here, at the call
        # (a CarryError reaches the caller, as a publish's would), and read
        # back by __call__ through the request's headers.
        header = _header_for_publish(self.app, self.name)  # type: ignore[attr-defined]
        if header is not None:
            headers = dict(options.get("headers") or {})
            headers.setdefault(HEADER, header)
            options["headers"] = headers
        return super().apply(args, kwargs, *more, **options)  # type: ignore[misc]


_carrying_classes: dict[type, type] = {}
# Per task class: is Celery's own Task.__call__ the next __call__ after ours?
_plain_call: dict[type, bool] = {}


def _next_call(cls: type) -> t.Any:
    mro = cls.__mro__
    for klass in mro[mro.index(CarryingTask) + 1 :]:
        if "__call__" in vars(klass):
            return vars(klass)["__call__"]
    return None


def _carrying_class(cls: type) -> type:
    made = _carrying_classes.get(cls)
    if made is None:
        made = type(cls.__name__, (CarryingTask, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _carrying_classes[cls] = made
    return made


def _adopt(task: t.Any) -> None:
    if not isinstance(task, CarryingTask):
        # A task of this app made from a base other than app.Task (a
        # celery.Task subclass of the user's, or made before install()):
        # its class is swapped for one with the mixin, once.
        task.__class__ = _carrying_class(type(task))


def _adopt_all(app: t.Any) -> None:
    for task in list(app.tasks.values()):
        _adopt(task)


def _on_finalized(sender: t.Any, **_: t.Any) -> None:
    _adopt_all(sender)


def install(app: t.Any, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, on_error: _OnError = "raise") -> t.Any:
    """Make ``app``'s tasks carry the declared context; returns ``app``.

    Call it where the app is made, so that both the publishing process and
    the worker run it. Idempotent; a second call changes the options.
    ``max_header_bytes`` limits the encoded header; ``on_error`` says what a
    publish does with a value that cannot travel or a header over the limit:
    ``"raise"`` (:class:`~geventctx.CarryError`, nothing is sent) or
    ``"warn"`` (:class:`~geventctx.CarryWarning`, sent without it).

    .. versionadded:: 0.2
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"install(): on_error must be 'raise' or 'warn', not {on_error!r}")
    if not isinstance(max_header_bytes, int) or max_header_bytes <= 0:
        raise ValueError(f"install(): max_header_bytes must be a positive int, not {max_header_bytes!r}")
    first = not hasattr(app, "_geventctx_celery")
    app._geventctx_celery = _Settings(max_header_bytes, on_error)
    if not first:
        return app
    base = app.Task
    if not issubclass(base, CarryingTask):
        # Tasks made from now on (every @app.task and @shared_task once the
        # app is finalized) are of this class.
        app.Task = _carrying_class(base)
    _install_sender(app)
    if app.finalized:
        _adopt_all(app)
    app.on_after_finalize.connect(_on_finalized, weak=False)
    return app
