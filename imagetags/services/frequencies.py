"""Keeping TagFrequency true: how many posts of each cluster carry each counted tag.

The patent's ``cluster`` method ranks a cluster's tags by these counts, so they must follow every
change of a post's counted tags (``PostTag.objects.counted()``), by whatever path: ``tagging``'s
functions, a tag merge, the admin's PostTag inline, the API, a deleted post, image or tag.

Two kinds of update, both in the caller's transaction and under the clusters' row locks, taken
in primary-key order as ``assign_to_active_set`` takes them (so a recount and an assignment of
the same clusters run one after the other and neither can lose the other's change, nor deadlock):

- :func:`add_posts_to_clusters`: increments, for images assigned between rebuilds.
- :func:`recount_posts` / :func:`recount_clusters`: exact counts recomputed from the members, for
  (cluster, tag) pairs whose count a tag change may have moved. Recomputed rather than adjusted
  by ±1, so a count that was wrong for any reason is right again after the next change.

Which sets: the active set and the retired ones (a rollback activates a retired set, and a tag
merge always kept them right). A ``building`` set is left alone: the rebuild writes its members
chunk by chunk and its counts in one insert at the end, so a recount meanwhile would count half
its members and break that insert; tags changed while it builds are recounted once it is active
(:func:`recount_changed_since`, given the rebuild's snapshot of counted tags).

One mechanism for every path: ``signal_handlers`` reports each saved or deleted PostTag (and
each deleted StockImage) to :func:`posts_changed` / :func:`clusters_changed`, which recount at
once, or, inside a :func:`deferred_recount` block, collect and recount once when the block ends.
Services that change many rows (``tagging.add_tags``, ``vocabulary.merge_tags``) open such a
block, so a post given 20 tags is recounted once, not 20 times.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from django.db import models
from django.db.models import Count

from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    PostTag,
    TagFrequency,
)
from imagetags.services.store import IDS_PER_QUERY, batched, update_rows

# Sets whose counts follow tag changes (see the module docstring for why not `building`).
KEPT_TRUE = (ClusterSetStatus.ACTIVE, ClusterSetStatus.RETIRED)

# Ids per `IN (...)` list: below SQLite's historical limit of 999 bound parameters.
_ID_CHUNK = IDS_PER_QUERY


@dataclass
class PendingRecount:
    """What a :func:`deferred_recount` block collected; ``clusters_recounted`` is set when the
    outermost block ends."""

    post_ids: set[int] = field(default_factory=set)
    tag_ids: set[int] = field(default_factory=set)
    cluster_ids: set[int] = field(default_factory=set)  # whose size and post count changed too
    cluster_tag_ids: set[int] = field(default_factory=set)
    clusters_recounted: int = 0


_pending: contextvars.ContextVar[PendingRecount | None] = contextvars.ContextVar(
    "imagetags_pending_recount", default=None
)


@contextlib.contextmanager
def deferred_recount() -> Iterator[PendingRecount]:
    """Collect the tag changes reported inside the block and recount them once at its end.

    Use it inside the caller's ``transaction.atomic()`` (the recount then commits or rolls back
    with the changes). Nested blocks recount once, when the outermost ends; a block left by an
    exception recounts nothing (its transaction is rolled back).
    """
    outer = _pending.get()
    if outer is not None:
        yield outer
        return
    pending = PendingRecount()
    token = _pending.set(pending)
    try:
        yield pending
    finally:
        _pending.reset(token)
    # Not reached when the block raised: nothing to recount in a transaction being rolled back.
    _recount_pending(pending)


def posts_changed(post_ids: Iterable[int], tag_ids: Iterable[int] = ()) -> None:
    """Report that the counted tags of ``post_ids`` may have changed; ``tag_ids``: tags taken
    off them (a removed row, the old tag of a row given another one), which the posts no longer
    show. Recounted at once, or at the end of the enclosing :func:`deferred_recount` block."""
    pending = _pending.get()
    if pending is None:
        recount_posts(post_ids, tag_ids)
        return
    pending.post_ids.update(post_ids)
    pending.tag_ids.update(tag_ids)


def clusters_changed(cluster_ids: Iterable[int], tag_ids: Iterable[int]) -> None:
    """Report that members of ``cluster_ids`` went (a deleted image): their sizes, post counts
    and the counts of ``tag_ids`` (the tags of the posts that lost members) are recounted, at
    once or at the end of the enclosing :func:`deferred_recount` block."""
    pending = _pending.get()
    if pending is None:
        recount_clusters(cluster_ids, tag_ids, sizes=True)
        return
    pending.cluster_ids.update(cluster_ids)
    pending.cluster_tag_ids.update(tag_ids)


def _recount_pending(pending: PendingRecount) -> None:
    if pending.cluster_ids:
        recount_clusters(pending.cluster_ids, pending.cluster_tag_ids, sizes=True)
    if pending.post_ids:
        pending.clusters_recounted = recount_posts(pending.post_ids, pending.tag_ids)


def clusters_of_images(image_ids: Collection[int]) -> list[int]:
    """The clusters that hold these images, in the sets whose counts are kept true."""
    return _distinct(
        ClusterMembership.objects.filter(
            image_id__in=chunk, cluster_set__status__in=KEPT_TRUE
        ).values_list("cluster_id", flat=True)
        for chunk in _chunks(image_ids)
    )


def recount_posts(post_ids: Iterable[int], tag_ids: Iterable[int] = ()) -> int:
    """Make TagFrequency exact for every (cluster, tag) pair these posts touch: clusters of the
    active and retired sets holding an image of one of them, tags on them (any source, so a
    tag that stopped or started counting is included) plus ``tag_ids`` (tags taken off them).

    Runs in the caller's transaction with the clusters' row locks (key order); a fixed number
    of queries for one post, however many tags it has. Returns how many clusters were recounted.
    """
    posts = sorted(set(post_ids))
    if not posts:
        return 0
    clusters = _distinct(
        ClusterMembership.objects.filter(
            image__post_id__in=chunk, cluster_set__status__in=KEPT_TRUE
        ).values_list("cluster_id", flat=True)
        for chunk in _chunks(posts)
    )
    if not clusters:  # e.g. a new upload, whose images are not embedded yet: one query
        return 0
    tags = set(tag_ids) | set(
        _distinct(
            PostTag.objects.filter(post_id__in=chunk).values_list("tag_id", flat=True)
            for chunk in _chunks(posts)
        )
    )
    recount_clusters(clusters, tags)
    return len(clusters)


def recount_clusters(
    cluster_ids: Iterable[int], tag_ids: Iterable[int], *, sizes: bool = False
) -> None:
    """Make the TagFrequency rows of ``cluster_ids`` × ``tag_ids`` exact (created, updated, or
    deleted at 0), from the clusters' members and their posts' counted tags, each post once.
    With ``sizes``, the clusters' ``size`` and ``post_count`` (and their sets' ``n_images``)
    are recounted too, for members that went. Locks the clusters first, in key order."""
    clusters = sorted(set(cluster_ids))
    tags = sorted(set(tag_ids))
    if not clusters:
        return
    # Locked before anything is read, in the order assign_to_active_set locks them; chunks are
    # taken in ascending order, so the whole lock order stays ascending.
    for chunk in _chunks(clusters):
        list(Cluster.objects.select_for_update().filter(pk__in=chunk).order_by("pk").values("pk"))
    if sizes:
        _recount_sizes(clusters)
    for cluster_chunk in _chunks(clusters):
        for tag_chunk in _chunks(tags):
            _recount_pairs(cluster_chunk, tag_chunk)


def _recount_pairs(clusters: list[int], tags: list[int]) -> None:
    # Posts, not images: a post with three images in one cluster counts once there. The join
    # runs from the counted tags to their posts' memberships, filtered in one filter() call so
    # that values() groups over the same joined rows.
    counts = {
        (cluster_id, tag_id): posts
        for cluster_id, tag_id, posts in PostTag.objects.counted()
        .filter(tag_id__in=tags, post__images__cluster_memberships__cluster_id__in=clusters)
        .order_by()
        .values_list("post__images__cluster_memberships__cluster_id", "tag_id")
        .annotate(posts=Count("post_id", distinct=True))
    }
    stale: list[int] = []
    changed: list[TagFrequency] = []
    for pk, cluster_id, tag_id, stored in (
        TagFrequency.objects.filter(cluster_id__in=clusters, tag_id__in=tags)
        .order_by()  # the model's ordering would join clusters and tags for nothing
        .values_list("pk", "cluster_id", "tag_id", "post_count")
    ):
        count = counts.pop((cluster_id, tag_id), 0)
        if not count:
            stale.append(pk)
        elif count != stored:
            changed.append(TagFrequency(pk=pk, post_count=count))
    if stale:
        TagFrequency.objects.filter(pk__in=stale).delete()
    if changed:
        TagFrequency.objects.bulk_update(changed, ["post_count"], batch_size=_ID_CHUNK)
    if counts:  # what is left has no row yet
        TagFrequency.objects.bulk_create(
            [
                TagFrequency(cluster_id=cluster_id, tag_id=tag_id, post_count=posts)
                for (cluster_id, tag_id), posts in counts.items()
            ],
            batch_size=_ID_CHUNK,
        )


def _recount_sizes(clusters: list[int]) -> None:
    members: dict[int, tuple[int, int]] = {}
    stored: dict[int, tuple[int, int, int]] = {}
    for chunk in _chunks(clusters):
        for cluster_id, size, posts in (
            ClusterMembership.objects.filter(cluster_id__in=chunk)
            .order_by()
            .values_list("cluster_id")
            .annotate(size=Count("pk"), posts=Count("image__post_id", distinct=True))
        ):
            members[cluster_id] = (size, posts)
        for cluster_id, set_id, size, posts in (
            Cluster.objects.filter(pk__in=chunk)
            .order_by()
            .values_list("pk", "cluster_set_id", "size", "post_count")
        ):
            stored[cluster_id] = (set_id, size, posts)
    changed = []
    lost_images: dict[int, int] = defaultdict(int)
    for cluster_id, (set_id, size, posts) in stored.items():
        new_size, new_posts = members.get(cluster_id, (0, 0))
        if (new_size, new_posts) != (size, posts):
            changed.append(Cluster(pk=cluster_id, size=new_size, post_count=new_posts))
            lost_images[set_id] += size - new_size
    if changed:
        Cluster.objects.bulk_update(changed, ["size", "post_count"], batch_size=_ID_CHUNK)
    for set_id, lost in lost_images.items():
        if lost:
            ClusterSet.objects.filter(pk=set_id).update(n_images=models.F("n_images") - lost)


def counted_tags_by_post(post_ids: Collection[int] | None = None) -> dict[int, set[int]]:
    """Each post's counted tag ids (all posts with a counted tag when ``post_ids`` is None)."""
    tags_of: dict[int, set[int]] = defaultdict(set)
    queries = (
        [PostTag.objects.counted()]
        if post_ids is None
        else [PostTag.objects.counted().filter(post_id__in=chunk) for chunk in _chunks(post_ids)]
    )
    for queryset in queries:
        for post_id, tag_id in queryset.values_list("post_id", "tag_id").iterator():
            tags_of[post_id].add(tag_id)
    return dict(tags_of)


def recount_changed_since(snapshot: Mapping[int, Iterable[int]]) -> int:
    """Recount the posts whose counted tags differ from ``snapshot`` (post id -> tag ids, as
    :func:`counted_tags_by_post` gives), with the tags they gained or lost.

    For a rebuild to call right after activating its set: it counted the tags it read before
    writing the set, and changes made meanwhile were recounted in the sets active then, not in
    the one being built. Returns how many posts differed.
    """
    now = counted_tags_by_post()
    before = {post: set(tags) for post, tags in snapshot.items()}
    changed_posts: set[int] = set()
    changed_tags: set[int] = set()
    for post in before.keys() | now.keys():
        old, new = before.get(post, set()), now.get(post, set())
        if old != new:
            changed_posts.add(post)
            changed_tags |= old ^ new
    if changed_posts:
        recount_posts(changed_posts, changed_tags)
    return len(changed_posts)


def add_posts_to_clusters(sizes: dict[int, int], new_posts: dict[int, set[int]]) -> None:
    """Grow clusters by ``sizes`` images and ``new_posts`` posts (cluster id -> posts new to
    it), and add one to the count of each of those posts' counted tags there.

    Increments, not recomputed totals: an assignment of a few images must not recount whole
    clusters, and a concurrent assignment to other clusters is kept. The caller holds the
    clusters' row locks (``assign_to_active_set``).
    """
    all_posts = set().union(*new_posts.values()) if new_posts else set()
    tags_of = counted_tags_by_post(all_posts) if all_posts else {}
    increments: dict[tuple[int, int], int] = defaultdict(int)
    for cluster_id, posts in new_posts.items():
        for post_id in posts:
            for tag_id in tags_of.get(post_id, ()):
                increments[cluster_id, tag_id] += 1
    update_rows(
        Cluster,
        ("size", "post_count"),
        ("pk",),
        [
            (size, len(new_posts.get(cluster_id, ())), cluster_id)
            for cluster_id, size in sizes.items()
        ],
        add=True,
    )
    if not increments:
        return
    touched_clusters = sorted({cluster for cluster, _tag in increments})
    touched_tags = sorted({tag for _cluster, tag in increments})
    existing = {
        pair
        for cluster_chunk in _chunks(touched_clusters)
        for tag_chunk in _chunks(touched_tags)
        for pair in TagFrequency.objects.filter(cluster_id__in=cluster_chunk, tag_id__in=tag_chunk)
        .order_by()
        .values_list("cluster_id", "tag_id")
    }
    update_rows(
        TagFrequency,
        ("post_count",),
        ("cluster", "tag"),
        [(count, *pair) for pair, count in increments.items() if pair in existing],
        add=True,
    )
    TagFrequency.objects.bulk_create(
        [
            TagFrequency(cluster_id=cluster_id, tag_id=tag_id, post_count=count)
            for (cluster_id, tag_id), count in increments.items()
            if (cluster_id, tag_id) not in existing
        ],
        batch_size=_ID_CHUNK,
    )


def _chunks(ids: Collection[int]) -> Iterator[list[int]]:
    return batched(sorted(ids), _ID_CHUNK)


def _distinct(querysets: Iterable[Iterable[int]]) -> list[int]:
    return sorted({value for queryset in querysets for value in queryset})
