"""What a process keeps in memory to serve suggestions: one cache object, one ``reset()``.

``ServingCache`` holds the active cluster set's row, its centres and its voting index
(``services.index``), all for the same set. Every entry is keyed by the set's version (its key,
activation time and extractor), so a rebuild that activates another set is picked up by the next
suggestion without anyone invalidating anything; ``reset()`` forgets it all (tests, a process that
wants its memory back).
"""

from __future__ import annotations

import threading

import numpy as np
from django.db import connections, router

from imagetags.models import ClusterSet, ClusterSetStatus
from imagetags.services import store
from imagetags.services.index import VotingIndex, voting_index

#: The methods ``suggest()`` serves; the offline evaluation adds its baselines to these.
METHODS = ("ivf", "cluster")

Centers = tuple[np.ndarray, list[int], list[int]]


def set_version(cluster_set: ClusterSet) -> tuple:
    # The primary key alone is not enough: a database rolled back (tests) or restored can give a
    # new set an old set's key. The activation time tells them apart.
    return (cluster_set.pk, cluster_set.activated, cluster_set.extractor_key)


class ServingCache:
    """The active set's row, centres and voting index, per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: tuple[tuple, ClusterSet] | None = None  # ((key, activated), row)
        self._centers: tuple[tuple, Centers] | None = None  # (version, centres)
        self._index: tuple[tuple, VotingIndex] | None = None  # (version, index)
        # (set id, n_images) as this thread's last active_set() read them, for the index's
        # refresh() in the same suggestion: taken once, so never older than that read.
        self._assigned_seen = threading.local()

    def reset(self) -> None:
        with self._lock:
            self._active = self._centers = self._index = None

    def active_set(self) -> ClusterSet | None:
        """The active cluster set, or None: its key and activation time are looked up on every
        call (one indexed query, plain SQL: it runs on every suggestion), the row itself is read
        again only when another set has been activated since. What a suggestion reads of the row
        (key, extractor, dimension, activation time) does not change while a set is active."""
        connection = connections[router.db_for_read(ClusterSet)]
        meta = ClusterSet._meta
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {quote(meta.pk.column)}, {quote(meta.get_field('activated').column)}, "
                f"{quote(meta.get_field('n_images').column)} "
                f"FROM {quote(meta.db_table)} WHERE {quote(meta.get_field('status').column)} = %s",
                [ClusterSetStatus.ACTIVE],
            )
            row = cursor.fetchone()
        if row is None:
            return None
        # The set's member count, read with its key: what the index's refresh() would query.
        self._assigned_seen.value = (row[0], row[2])
        key = (row[0], row[1])
        active = self._active
        if active is not None and active[0] == key:
            return active[1]
        cluster_set = ClusterSet.objects.get(pk=row[0])
        self._active = (key, cluster_set)
        return cluster_set

    def centers(self, cluster_set: ClusterSet) -> Centers:
        """(k, d) unit centres of a set with their Cluster ids and indexes, read once: a query
        compares itself with every centre, and reading K blobs per request would dominate it.
        One set is kept: sets are replaced, not used side by side."""
        version = set_version(cluster_set)
        cached = self._centers
        if cached is not None and cached[0] == version:
            return cached[1]
        value = store.read_centers(cluster_set)
        with self._lock:
            self._centers = (version, value)
        return value

    def voting_index(self, cluster_set: ClusterSet) -> VotingIndex:
        """The voting index of ``cluster_set`` (built on first use), with new members added."""
        version = set_version(cluster_set)
        centers, cluster_ids, _indexes = self.centers(cluster_set)
        with self._lock:
            cached = self._index
            if cached is None or cached[0] != version:
                cached = self._index = (version, voting_index(cluster_set, centers, cluster_ids))
        index = cached[1]
        seen = getattr(self._assigned_seen, "value", None)
        self._assigned_seen.value = None
        index.refresh(seen[1] if seen is not None and seen[0] == cluster_set.pk else None)
        return index

    @property
    def loaded_index(self) -> VotingIndex | None:
        """The index built so far, if any (without building one)."""
        cached = self._index
        return None if cached is None else cached[1]


_cache = ServingCache()


def serving_cache() -> ServingCache:
    """The process's one serving cache."""
    return _cache


def reset() -> None:
    """Forget the active set, centres and voting index held by this process."""
    _cache.reset()
