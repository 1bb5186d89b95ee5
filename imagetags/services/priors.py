"""The library-wide tag shares neighbour voting subtracts (``VOTING["PRIOR_WEIGHT"]``), per set.

A share is the fraction of the set's voters (posts, or uploaders) whose posts carry a counted
tag. Computing it is one aggregate over every member of the set: 2 s at 100,000 images, 9 s at
1,000,000 (docs/performance.md §6), far too slow for a web process's first suggestion. So the
worker computes it — the rebuild for a new set, and an assignment once new members have grown
the set by 1 % since the stored shares (:func:`refresh_if_grown`) — and stores it with the set
(``ClusterSet.priors``); a web process reads one row. A set without stored shares (built before
they were stored) has them computed where they are first needed, as before.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count

from imagetags.conf import imagetags_settings
from imagetags.core import counting, voting
from imagetags.models import ClusterMembership, ClusterSet, PostTag, Tag

#: New members, as a share of the set, after which the stored shares are computed again.
GROWTH = 0.01


def owner_key(owner_id: int | None, external_owner: str | None) -> str | None:
    """A post's uploader: a site user, else the source system's owner (imports), else unknown."""
    if owner_id is not None:
        return f"user:{owner_id}"
    if external_owner:
        return f"external:{external_owner}"
    return None


def compute(cluster_set_id: int, vote_by: str) -> dict[str, float]:
    """Library-wide share of voters carrying each counted tag, over the set's members."""
    posts = ClusterMembership.objects.filter(cluster_set_id=cluster_set_id).values("image__post_id")
    if vote_by == "post":
        # One SQL aggregate: posts of the set, and per tag how many of them carry it. A
        # (post, tag) pair is unique, so rows per tag are its posts: grouping by the key,
        # without joining Tag and counting DISTINCT, keeps it affordable on a large set; names
        # come for the tags found.
        n_posts = posts.order_by().distinct().count()
        counts = dict(
            PostTag.objects.counted()
            .filter(post_id__in=posts)
            .order_by()
            .values_list("tag_id")
            .annotate(n=Count("pk"))
        )
        names = Tag.objects.filter(pk__in=list(counts)).values_list("pk", "name")
        return {name: counts[pk] / n_posts for pk, name in names} if n_posts else {}
    owners = {
        pk: owner_key(owner_id, external)
        for pk, owner_id, external in ClusterMembership.objects.filter(
            cluster_set_id=cluster_set_id
        ).values_list("image__post_id", "image__post__owner_id", "image__post__external_owner")
    }
    post_tags: dict[int, set[str]] = {pk: set() for pk in owners}
    for post_id, name in (
        PostTag.objects.counted().filter(post_id__in=posts).values_list("post_id", "tag__name")
    ):
        post_tags[post_id].add(name)
    return counting.prior_shares(
        post_tags, {pk: voting.voter_of(pk, owner, vote_by) for pk, owner in owners.items()}
    )


def _modes() -> list[str]:
    # The configured way of voting, and "post" (the default) for a site that switches back.
    configured = (imagetags_settings.VOTING or {}).get("VOTE_BY", "post")
    return list(dict.fromkeys(["post", str(configured)]))


def store(cluster_set: ClusterSet) -> None:
    """Compute the set's shares (for the configured ``VOTE_BY`` and ``"post"``) and store them
    with it, with the number of members they were computed over."""
    if not (imagetags_settings.VOTING or {}).get("PRIOR_WEIGHT", 0.1):
        return  # voting subtracts no prior: nothing to keep
    n_images = ClusterSet.objects.filter(pk=cluster_set.pk).values_list("n_images", flat=True)
    value: dict[str, Any] = {
        "n_images": n_images.first() or 0,
        "shares": {mode: compute(cluster_set.pk, mode) for mode in _modes()},
    }
    ClusterSet.objects.filter(pk=cluster_set.pk).update(priors=value)


def refresh_if_grown(cluster_set: ClusterSet) -> bool:
    """Store the shares again when the set has grown by :data:`GROWTH` since they were stored
    (after an assignment; a set without stored shares is left to :func:`stored`'s fallback)."""
    row = ClusterSet.objects.filter(pk=cluster_set.pk).values_list("n_images", "priors").first()
    if row is None or not row[1]:
        return False
    n_images, stored_value = row
    if n_images - stored_value.get("n_images", 0) <= max(10, GROWTH * n_images):
        return False
    store(cluster_set)
    return True


def stored(cluster_set_id: int, vote_by: str) -> tuple[dict[str, float], int] | None:
    """(shares, members they were computed over) stored with the set, or None."""
    value = ClusterSet.objects.filter(pk=cluster_set_id).values_list("priors", flat=True).first()
    shares = (value or {}).get("shares", {}).get(vote_by)
    if shares is None:
        return None
    return shares, int(value.get("n_images", 0))
