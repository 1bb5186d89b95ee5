"""Exceptions shared by services that must not import each other.

``ClusteringError`` is raised by the rebuild (``services.clustering``) and by the rebuild lock
(``services.locks``, whose ``RebuildInProgress`` is one); living here, it lets clustering import
the lock without the lock importing clustering back. ``services.clustering.ClusteringError``
stays the public import path.
"""

from __future__ import annotations


class ClusteringError(Exception):
    """A rebuild cannot go ahead. The message tells the person what to do."""
