"""django-q2 task functions: thin, taking ids, safe to run twice.

This is also the one place that chains the feature pipeline: embed and store the vectors
(``features.compute_features``), put them into the active clustering, then auto-tag the posts
they complete (:func:`run_feature_pipeline`). The task and the synchronous callers (the
``compute_features`` and ``import_library --compute-features`` commands) all run it, so a vector
stored by any of them joins the clustering and tags its post the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import QuerySet

from imagetags.conf import imagetags_settings
from imagetags.models import Post, StockImage
from imagetags.services import features
from imagetags.services.assign import assign_to_active_set
from imagetags.services.extractors import FeatureExtractor
from imagetags.services.locks import release_queued_rebuild
from imagetags.services.rebuild import rebuild_clusters as rebuild
from imagetags.services.tagging import apply_auto_tags

logger = logging.getLogger(__name__)


def run_feature_pipeline(
    images: Iterable[int] | QuerySet[StockImage],
    *,
    extractor: FeatureExtractor | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> features.FeatureRunSummary:
    """Embed ``images`` (ids or a queryset), add each stored batch to the active clustering and
    auto-tag the posts it completes; the options and the summary are ``compute_features``'."""
    # Looked up on the module at each call, so a worker that patches
    # features.compute_features (tests/test_faults.py) is obeyed.
    return features.compute_features(
        images,
        extractor=extractor,
        batch_size=batch_size,
        progress=progress,
        force=force,
        on_ready=after_vectors_stored,
    )


def after_vectors_stored(ready: list[StockImage], key: str) -> None:
    """Put fresh vectors into the active clustering, then auto-tag posts that are complete.

    The vectors are committed already; a failure here must not turn them into failed images, so
    it is logged and the next rebuild (which reads every ready vector) makes up for it.
    """
    try:
        assign_to_active_set(ready)
    except Exception:
        logger.exception("Could not add %d new vectors to the active clustering", len(ready))

    if not imagetags_settings.AUTO_TAG:
        return
    post_ids = {row.post_id for row in ready}
    # A post is auto-tagged once none of its images is still waiting for a vector of this
    # extractor (failed images do not hold it back forever).
    waiting = set(
        StockImage.objects.filter(
            features.waiting_for_vector(key), post_id__in=post_ids
        ).values_list("post_id", flat=True)
    )
    for post in Post.objects.filter(pk__in=post_ids - waiting):
        try:
            apply_auto_tags(post)
        except Exception:
            logger.exception("Auto-tagging post %s failed", post.pk)


def extract_features(image_id: int) -> dict[str, Any]:
    """Run the feature pipeline for one StockImage (a no-op if its vector is already current)."""
    return run_feature_pipeline([image_id]).as_dict()


def rebuild_clusters(queued_as: str = "", **options: Any) -> dict[str, Any]:
    """Rebuild the clustering in a worker (the admin's "rebuild" button enqueues this).

    ``queued_as`` is the token of the one queued place the button took
    (``locks.reserve_queued_rebuild``): given back when the rebuild ends, however it ends.
    """
    try:
        cluster_set = rebuild(**options)
    finally:
        if queued_as:
            release_queued_rebuild(queued_as)
    return {"cluster_set": cluster_set.pk, "k": cluster_set.k, "status": cluster_set.status}
