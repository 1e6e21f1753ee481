"""Find the user's line that started a hand-off.

Frames of geventctx itself and of gevent are skipped, so a spawn through
``Pool.spawn`` reports the caller of ``Pool.spawn``. A site is a
``(filename, lineno)`` pair: it keeps no frame (and so no locals) alive.
"""

from __future__ import annotations

import os
import types
import typing as t

import gevent

Site = t.Tuple[str, int]

_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(gevent.__file__)) + os.sep,
)


def is_internal(filename: str) -> bool:
    """True for files of geventctx and gevent, whose frames are not user sites."""
    return filename.startswith(_INTERNAL_DIRS)


def package_dirs(*modules: str) -> tuple[str, ...]:
    """Directories of the named (imported) packages, for ``site_of(skip=...)``."""
    import sys

    dirs = []
    for name in modules:
        module = sys.modules.get(name)
        filename = getattr(module, "__file__", None)
        if filename:
            dirs.append(os.path.dirname(os.path.abspath(filename)) + os.sep)
    return tuple(dirs)


def site_of(frame: types.FrameType | None, skip: tuple[str, ...] = _INTERNAL_DIRS) -> Site | None:
    """The first frame at or above ``frame`` that is user code, as a site.

    ``skip`` lists directory prefixes whose frames are not user code.
    """
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(skip):
            return (code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return None


def format_site(site: Site | None) -> str:
    """``"file.py:12"``, or ``"<unknown>"``."""
    if site is None:
        return "<unknown>"
    return f"{site[0]}:{site[1]}"
