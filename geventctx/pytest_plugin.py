"""pytest plugin for projects that use geventctx (registered as ``pytest11``).

.. versionadded:: 0.1
"""
