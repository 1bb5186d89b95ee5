"""Temporary re-exports of the names that moved to ``store``, ``rebuild`` and ``assign``, and the
per-process cache of the active set's centres (until serving has its own cache).
"""

# Temporary shim for issue 11's parallel work: the lead removes it at merge.

from __future__ import annotations

import threading

import numpy as np
from django.db.models.signals import post_save

from imagetags.models import ClusterSet
from imagetags.services.assign import _add_posts_to_clusters, assign_to_active_set
from imagetags.services.errors import ClusteringError
from imagetags.services.rebuild import (
    check_library_extractor,
    current_extractor_key,
    fits_in_memory,
    rebuild_clusters,
    rebuild_thread_limit,
    resolve_k,
)
from imagetags.services.store import (
    LibraryVectors,
    batched,
    increment,
    library_ids,
    library_shape,
    no_vectors_message,
    read_centers,
    read_library_vectors,
    read_vectors_by_id,
    ready_images,
    rows_per_read,
    stack_rows,
)

__all__ = [
    "ClusteringError",
    "LibraryVectors",
    "_add_posts_to_clusters",
    "_centers_cache",
    "_invalidate_centers_cache",
    "assign_to_active_set",
    "batched",
    "check_library_extractor",
    "current_extractor_key",
    "fits_in_memory",
    "increment",
    "library_ids",
    "library_shape",
    "load_centers",
    "no_vectors_message",
    "read_library_vectors",
    "read_vectors_by_id",
    "ready_images",
    "rebuild_clusters",
    "rebuild_thread_limit",
    "resolve_k",
    "rows_per_read",
    "stack_rows",
]


# The active set's centres, kept per process: suggestions compare a query with every centre, and
# reading K blobs from the database on each request would dominate its cost.
_centers_lock = threading.Lock()
_centers_cache: dict[int, tuple[np.ndarray, list[int], list[int]]] = {}


def load_centers(cluster_set: ClusterSet) -> tuple[np.ndarray, list[int], list[int]]:
    """(k, d) unit centres of a set, with their Cluster ids and indexes, cached per process."""
    with _centers_lock:
        cached = _centers_cache.get(cluster_set.pk)
    if cached is not None:
        return cached
    value = read_centers(cluster_set)
    with _centers_lock:
        _centers_cache.clear()  # keep one set: sets are replaced, not used side by side
        _centers_cache[cluster_set.pk] = value
    return value


def _invalidate_centers_cache() -> None:
    with _centers_lock:
        _centers_cache.clear()


def _forget_centers_on_save(sender: type[ClusterSet], instance: ClusterSet, **kwargs) -> None:
    # The rebuild (services.rebuild) sits below serving and no longer clears this cache itself;
    # activating a set saves it, and a new set may reuse a rolled-back set's primary key (SQLite).
    _invalidate_centers_cache()


post_save.connect(_forget_centers_on_save, sender=ClusterSet, dispatch_uid="imagetags-centers")
