"""django-q2 task functions: thin, taking ids, safe to run twice."""

from __future__ import annotations

from typing import Any


def extract_features(image_id: int) -> dict[str, Any]:
    """Compute (or skip, if already current) the feature vector of one StockImage."""
    from imagetags.services.features import compute_features

    summary = compute_features([image_id])
    return summary.as_dict()


def rebuild_clusters(queued_as: str = "", **options: Any) -> dict[str, Any]:
    """Rebuild the clustering in a worker (the admin's "rebuild" button enqueues this).

    ``queued_as`` is the token of the one queued place the button took
    (``locks.reserve_queued_rebuild``): given back when the rebuild ends, however it ends.
    """
    from imagetags.services.locks import release_queued_rebuild
    from imagetags.services.rebuild import rebuild_clusters as rebuild

    try:
        cluster_set = rebuild(**options)
    finally:
        if queued_as:
            release_queued_rebuild(queued_as)
    return {"cluster_set": cluster_set.pk, "k": cluster_set.k, "status": cluster_set.status}
