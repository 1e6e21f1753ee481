"""`make demo`: geventctx in action, printed as a short report.

Each section runs real code and prints what the children saw. The script
exits non-zero if anything it shows did not happen as claimed.
"""

from __future__ import annotations

import contextvars
import sys

import gevent
import gevent.pool

import geventctx

request_id = contextvars.ContextVar("request_id", default="<none>")
failures: list[str] = []


def check(label: str, got: object, want: object) -> None:
    ok = got == want
    print(f"  {'ok ' if ok else 'BAD'} {label}: {got!r}")
    if not ok:
        failures.append(f"{label}: got {got!r}, want {want!r}")


def section_handoff() -> None:
    print("\n1. A child sees its spawner's contextvars (a snapshot at spawn)")
    request_id.set("req-42")
    check("plain gevent.spawn sees", gevent.spawn(request_id.get).get(), "<none>")
    check("geventctx.spawn sees", geventctx.spawn(request_id.get).get(), "req-42")

    def child_writes() -> str:
        request_id.set("child's own")
        return request_id.get()

    check("child's write, in the child", geventctx.spawn(child_writes).get(), "child's own")
    check("child's write, in the parent", request_id.get(), "req-42")


def section_pool() -> None:
    print("\n2. Pools: every worker of Pool.map runs in the caller's context")
    request_id.set("req-43")
    pool = geventctx.Pool(2)
    check("geventctx.Pool(2).map sees", pool.map(lambda i: f"{i}:{request_id.get()}", range(3)),
          ["0:req-43", "1:req-43", "2:req-43"])
    check("gevent.pool.Pool(2).map sees", gevent.pool.Pool(2).map(lambda i: request_id.get(), range(2)),
          ["<none>", "<none>"])


def section_patch() -> None:
    print("\n3. patch(): plain gevent.spawn inherits too (visibility only)")
    request_id.set("req-44")
    geventctx.patch()
    try:
        check("patched gevent.spawn sees", gevent.spawn(request_id.get).get(), "req-44")
    finally:
        geventctx.unpatch()
    check("after unpatch(), gevent.spawn sees", gevent.spawn(request_id.get).get(), "<none>")


def main() -> int:
    print("geventctx demo")
    for section in (section_handoff, section_pool, section_patch):
        contextvars.Context().run(section)
    print()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("All demonstrated behaviour checked.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
