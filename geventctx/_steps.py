"""Run every step, then raise the first error (STYLE 8: written once).

The rule, where a sequence of steps must all run (a request's deferred
teardown, a hand-off's ends, what became due while a Context was busy):
each step runs even if an earlier one raised anything — a
``BaseException`` such as ``gevent.Timeout`` or a kill included; then the
first error is raised. With ``log``, an ``Exception`` is passed to it
(called inside the ``except``, so ``logging``'s ``exception()`` sees it)
instead of being raised; a ``BaseException`` is always raised.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

__all__ = ["run_every"]


def run_every(
    steps: t.Iterable[t.Callable[[], t.Any]], log: t.Callable[[BaseException], None] | None = None
) -> None:
    """Call each of ``steps`` (an iterable: it may grow while it runs);
    then raise the first error (see the module's rule)."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception as exc:
            if log is not None:
                log(exc)
            elif first is None:
                first = exc
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first
