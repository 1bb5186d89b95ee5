"""The bottom of the services: reading what the database holds, in the shapes the core needs.

Nothing here caches and nothing here imports another service except ``errors`` and ``vectors``;
every service above reads the library through these functions, so "which images are usable" and
"which tags count" are decided once.
"""

from __future__ import annotations

import numpy as np

from imagetags.models import Cluster, ClusterSet
from imagetags.services import vectors


def read_centers(cluster_set: ClusterSet) -> tuple[np.ndarray, list[int], list[int]]:
    """(k, d) unit centres of a set, with their Cluster ids and indexes, read now (uncached:
    serving keeps its own copy, see ``services.serving``)."""
    rows = list(
        Cluster.objects.filter(cluster_set=cluster_set)
        .order_by("index")
        .values_list("pk", "index", "centroid")
    )
    centers = vectors.stack((row[2] for row in rows), cluster_set.dim, count=len(rows))
    return centers, [row[0] for row in rows], [row[1] for row in rows]
