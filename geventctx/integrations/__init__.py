"""Opt-in integrations with neighbours that keep per-request state of their own.

Each module here imports its neighbour and is imported only by an
application that uses it; ``import geventctx`` imports none of them.

.. versionadded:: 0.2
"""
