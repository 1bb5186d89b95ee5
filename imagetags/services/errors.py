"""Exceptions shared by services that must not import each other.

``ClusteringError`` is raised by the rebuild (``services.rebuild``) and by the rebuild lock
(``services.locks``, whose ``RebuildInProgress`` is one); living here, below both, it lets the
rebuild import the lock without the lock importing the rebuild back. ``services.rebuild`` re-exports
it, as the place a caller of ``rebuild_clusters`` looks.
"""

from __future__ import annotations


class ClusteringError(Exception):
    """A rebuild cannot go ahead. The message tells the person what to do."""


class SuggestionUnavailable(Exception):
    """Suggestions cannot be made right now; the message says why and what fixes it.

    Here, below serving, so that the search engines' errors (``services.engines``) can be
    ones; ``services.suggest`` re-exports it, where callers catch it."""
