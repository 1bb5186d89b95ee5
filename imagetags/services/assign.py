"""Keeping the active cluster set fresh between rebuilds: new images join their nearest cluster.

Centres do not move until the next rebuild (the patent's batch update); each assigned image grows
its cluster, and a post new to a cluster adds one to the counts of its counted tags there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from django.db import transaction
from django.db.models import F

from imagetags.core import kmeans
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    FeatureStatus,
    StockImage,
)
from imagetags.services import engines, priors, vectors
from imagetags.services.frequencies import add_posts_to_clusters
from imagetags.services.store import read_centers


def assign_to_active_set(images: Iterable[StockImage]) -> int:
    """Put freshly embedded images into the nearest cluster of the active set, at once.

    Each cluster's size grows; a post not yet in a cluster adds one to its post count and one
    post to each of its counted tags (once per post, as in a rebuild, also when several images of
    one post arrive together). Safe to call twice: an image already in the active set is left
    alone. Centres do not move until the next rebuild (the patent's batch update); returns how
    many images were assigned.

    A whole batch is added in one transaction with a fixed number of queries: per image, a
    transaction and its row lock cost more than a MobileNetV2 forward pass (docs/performance.md).
    """
    active = ClusterSet.objects.active()
    if active is None:
        return 0
    candidates = {
        image.pk: image
        for image in images
        if image.feature_status == FeatureStatus.READY
        and image.extractor_key == active.extractor_key
        and image.vector is not None
    }
    if not candidates:
        return 0
    centers, cluster_ids, _indexes = read_centers(active)
    matrix = vectors.stack(
        (image.vector for image in candidates.values()), active.dim, count=len(candidates)
    )
    labels, sims = kmeans.nearest_centers(matrix, centers)
    position = {pk: n for n, pk in enumerate(candidates)}
    placed = {
        pk: (cluster_ids[int(label)], float(sim))
        for pk, label, sim in zip(candidates, labels, sims, strict=True)
    }
    with transaction.atomic():
        # Lock the clusters, in key order so two workers cannot deadlock, before reading what
        # they hold: two workers adding images of one post must count the post once.
        touched = sorted({cluster_id for cluster_id, _sim in placed.values()})
        list(Cluster.objects.select_for_update().filter(pk__in=touched).order_by("pk").values("pk"))
        already = set(
            ClusterMembership.objects.filter(
                cluster_set=active, image_id__in=list(candidates)
            ).values_list("image_id", flat=True)
        )
        new = [pk for pk in candidates if pk not in already]
        if not new:
            return 0
        post_ids = {candidates[pk].post_id for pk in new}
        seen = set(
            ClusterMembership.objects.filter(
                cluster_id__in=touched, image__post_id__in=post_ids
            ).values_list("cluster_id", "image__post_id")
        )
        ClusterMembership.objects.bulk_create(
            [
                ClusterMembership(
                    cluster_set=active,
                    cluster_id=placed[pk][0],
                    image_id=pk,
                    similarity=placed[pk][1],
                )
                for pk in new
            ]
        )
        sizes: dict[int, int] = defaultdict(int)
        new_posts: dict[int, set[int]] = defaultdict(set)  # cluster -> posts new to it
        for pk in new:
            cluster_id, post_id = placed[pk][0], candidates[pk].post_id
            sizes[cluster_id] += 1
            if (cluster_id, post_id) not in seen:
                new_posts[cluster_id].add(post_id)
        add_posts_to_clusters(sizes, new_posts)
        # pgvector: the rows commit with the memberships, so the images vote once committed.
        engines.add_members(active, new, matrix[[position[pk] for pk in new]])
        ClusterSet.objects.filter(pk=active.pk).update(n_images=F("n_images") + len(new))
        # usearch: a newer file once enough members are newer than the served one.
        transaction.on_commit(lambda: engines.save_new_members(active))
        # And the tag shares again once the set has grown by 1 % (a web process reads them).
        transaction.on_commit(lambda: priors.refresh_if_grown(active))
    return len(new)
