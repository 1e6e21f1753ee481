"""Sphinx configuration for geventctx's documentation (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import geventctx  # noqa: E402

project = "geventctx"
author = "geventctx developers"
copyright = "2026, geventctx developers"  # noqa: A001 - Sphinx's name
release = geventctx.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
# Docstrings are written for the reader of the code and the page alike;
# members are documented in source order, type hints in the description.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# gevent and celery classes are bases of ours; Sphinx need not resolve them.
nitpicky = False

intersphinx_mapping: dict[str, tuple[str, None]] = {}
exclude_patterns = ["_build"]

html_theme = "furo"
html_title = f"geventctx {release}"
