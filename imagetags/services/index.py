"""The serving index for neighbour voting: the active cluster set as an inverted file in memory.

``suggest()`` with ``SUGGEST_METHOD = "ivf"`` compares a new image with the K centres of the
active set and then with the member vectors of its ``PROBES`` nearest clusters only. Those
vectors are read from the database (``ClusterMembership`` + ``StockImage.vector``) the first
time a query needs their cluster, and kept per process, one cluster at a time, so a process
holds only the clusters queries have touched (at most N × d × 4 bytes: 512 MB for 100,000
MobileNetV2 vectors, 205 MB with VGG16's 512-d).

Freshness: every query first reads the memberships added since the index last looked (one
indexed range query on the primary key, normally empty). Images that ``assign_to_active_set``
put into the active set between rebuilds therefore vote at once, as they count at once in the
``cluster`` method. Tags are never cached: they are read for the few neighbour posts of each
query, so tags edited on a post count from the next suggestion on. A rebuild activates a new
set, and the next query builds a new index for it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from django.db.models import Count, Max

from imagetags.conf import imagetags_settings
from imagetags.models import ClusterMembership, ClusterSet, FeatureStatus, PostTag, StockImage
from imagetags.services import ranking, vectors
from imagetags.services.clustering import load_centers

# Columns read for each member: enough to vote without touching the post again.
_MEMBER_FIELDS = (
    "pk",
    "cluster_id",
    "image_id",
    "image__post_id",
    "image__post__owner_id",
    "image__post__external_owner",
    "image__vector",
    "image__extractor_key",
    "image__feature_status",
)


def owner_key(owner_id: int | None, external_owner: str | None) -> str | None:
    """A post's uploader: a site user, else the source system's owner (imports), else unknown."""
    if owner_id is not None:
        return f"user:{owner_id}"
    if external_owner:
        return f"external:{external_owner}"
    return None


@dataclass
class _Block:
    """One cluster's members: vectors, and for each the image, its post and the post's owner."""

    vectors: np.ndarray
    image_ids: np.ndarray
    post_ids: list[int] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class Neighbours:
    """The images that vote for one query, most similar first."""

    image_ids: np.ndarray
    post_ids: list[int]
    similarities: np.ndarray
    voters: list[Hashable]
    probes: int  # clusters searched
    searched: int  # member vectors compared


class VotingIndex:
    """The active set's centres and, loaded on first use, its clusters' member vectors."""

    def __init__(self, cluster_set: ClusterSet) -> None:
        self.cluster_set_id = cluster_set.pk
        self.version = _version(cluster_set)
        self.extractor_key = cluster_set.extractor_key
        self.dim = cluster_set.dim
        self.centers, self.cluster_ids, _indexes = load_centers(cluster_set)
        self._position = {cluster_id: n for n, cluster_id in enumerate(self.cluster_ids)}
        self._blocks: dict[int, _Block] = {}
        # Post and owner of every loaded member, so a query looks up only its candidates.
        self._members: dict[int, tuple[int, str | None]] = {}
        self._lock = threading.RLock()
        self._priors: dict[str, dict[str, float]] = {}
        # Library-wide shares move slowly: they are recomputed once the set has grown by 1 %.
        self._added = 0
        self._priors_added = 0
        self._size = max(1, cluster_set.n_images)
        # Members up to this primary key are in every loaded block; later ones come by refresh().
        self.watermark = (
            ClusterMembership.objects.filter(cluster_set_id=self.cluster_set_id).aggregate(
                last=Max("pk")
            )["last"]
            or 0
        )

    # --- members -----------------------------------------------------------------------------

    def _usable(self, row: tuple) -> bool:
        # A vector recomputed since the rebuild (another extractor) no longer fits the centres.
        return row[6] is not None and row[7] == self.extractor_key and row[8] == FeatureStatus.READY

    def _block(self, position: int) -> _Block:
        with self._lock:
            block = self._blocks.get(position)
            if block is None:
                rows = [
                    row
                    for row in ClusterMembership.objects.filter(
                        cluster_id=self.cluster_ids[position], pk__lte=self.watermark
                    )
                    .order_by("pk")
                    .values_list(*_MEMBER_FIELDS)
                    if self._usable(row)
                ]
                block = _Block(
                    vectors=vectors.stack((row[6] for row in rows), self.dim, count=len(rows)),
                    image_ids=np.array([row[2] for row in rows], dtype=np.int64),
                    post_ids=[row[3] for row in rows],
                    owners=[owner_key(row[4], row[5]) for row in rows],
                )
                self._blocks[position] = block
                self._remember(block.image_ids.tolist(), block.post_ids, block.owners)
            return block

    def _remember(self, image_ids: list[int], post_ids: list[int], owners: list) -> None:
        self._members.update(zip(image_ids, zip(post_ids, owners, strict=True), strict=True))

    def refresh(self) -> int:
        """Add the members assigned since the last look to the loaded clusters; returns how many
        new memberships there were."""
        with self._lock:
            rows = list(
                ClusterMembership.objects.filter(
                    cluster_set_id=self.cluster_set_id, pk__gt=self.watermark
                )
                .order_by("pk")
                .values_list(*_MEMBER_FIELDS)
            )
            if not rows:
                return 0
            by_block: dict[int, list[tuple]] = {}
            for row in rows:
                position = self._position.get(row[1])
                if position in self._blocks and self._usable(row):
                    by_block.setdefault(position, []).append(row)
            for position, new in by_block.items():
                block = self._blocks[position]
                self._blocks[position] = _Block(
                    vectors=np.concatenate(
                        [block.vectors, vectors.stack((r[6] for r in new), self.dim, len(new))]
                    ),
                    image_ids=np.concatenate(
                        [block.image_ids, np.array([r[2] for r in new], dtype=np.int64)]
                    ),
                    post_ids=block.post_ids + [r[3] for r in new],
                    owners=block.owners + [owner_key(r[4], r[5]) for r in new],
                )
                self._remember(
                    [r[2] for r in new], [r[3] for r in new], [owner_key(r[4], r[5]) for r in new]
                )
            self.watermark = rows[-1][0]
            self._added += len(rows)
            if self._added - self._priors_added > max(10, 0.01 * self._size):
                self._priors.clear()  # new posts have moved the library-wide shares
            return len(rows)

    # --- queries -----------------------------------------------------------------------------

    def neighbours(self, query: np.ndarray, params: ranking.VoteParams) -> Neighbours:
        """The images of the ``params.neighbours`` nearest voters among the members of the
        ``params.probes`` nearest clusters (all clusters when ``probes`` is None)."""
        probes = self.centers.shape[0] if params.probes is None else params.probes
        order = ranking.nearest_lists(query, self.centers, probes)
        blocks = [self._block(int(position)) for position in order]
        searched = sum(block.image_ids.shape[0] for block in blocks)
        members = self._members

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            ids, sims = ranking.search_blocks(
                query, [b.vectors for b in blocks], [b.image_ids for b in blocks], n
            )
            # Images deleted since they were loaded must not vote (one small query).
            alive = set(StockImage.objects.filter(pk__in=ids.tolist()).values_list("pk", flat=True))
            keep = np.array([int(i) in alive for i in ids], dtype=bool)
            return ids[keep], sims[keep]

        def voter(image_id: int) -> Hashable:
            post_id, owner = members[image_id]
            return ranking.voter_of(post_id, owner, params.vote_by)

        ids, sims, voters = ranking.nearest_voters(search, voter, params.neighbours, searched)
        return Neighbours(
            image_ids=ids,
            post_ids=[members[int(i)][0] for i in ids],
            similarities=sims,
            voters=voters,
            probes=len(blocks),
            searched=searched,
        )

    def priors(self, vote_by: str) -> dict[str, float]:
        """Library-wide share of voters carrying each counted tag, over the set's members
        (computed on first use, and again once new members have grown the set by 1 %)."""
        with self._lock:
            cached = self._priors.get(vote_by)
            if cached is not None:
                return cached
            counted = imagetags_settings.COUNTED_TAG_SOURCES
            posts = ClusterMembership.objects.filter(cluster_set_id=self.cluster_set_id).values(
                "image__post_id"
            )
            if vote_by == "post":
                # One SQL aggregate: posts of the set, and per tag how many of them carry it.
                n_posts = posts.order_by().distinct().count()
                rows = (
                    PostTag.objects.filter(source__in=counted, post_id__in=posts)
                    .order_by()
                    .values_list("tag__name")
                    .annotate(n=Count("post_id", distinct=True))
                )
                shares = {name: n / n_posts for name, n in rows} if n_posts else {}
            else:
                owners = {
                    pk: owner_key(owner_id, external)
                    for pk, owner_id, external in ClusterMembership.objects.filter(
                        cluster_set_id=self.cluster_set_id
                    ).values_list(
                        "image__post_id", "image__post__owner_id", "image__post__external_owner"
                    )
                }
                post_tags: dict[int, set[str]] = {pk: set() for pk in owners}
                for post_id, name in PostTag.objects.filter(
                    source__in=counted, post_id__in=posts
                ).values_list("post_id", "tag__name"):
                    post_tags[post_id].add(name)
                shares = ranking.prior_shares(
                    post_tags,
                    {pk: ranking.voter_of(pk, owner, vote_by) for pk, owner in owners.items()},
                )
            self._priors[vote_by] = shares
            self._priors_added = self._added
            return shares

    @property
    def loaded_clusters(self) -> int:
        return len(self._blocks)


def post_tags_of(post_ids: Sequence[int]) -> dict[int, set[str]]:
    """The counted tags (``COUNTED_TAG_SOURCES``) of some posts, read now."""
    tags: dict[int, set[str]] = {post_id: set() for post_id in post_ids}
    for post_id, name in PostTag.objects.filter(
        post_id__in=list(tags), source__in=imagetags_settings.COUNTED_TAG_SOURCES
    ).values_list("post_id", "tag__name"):
        tags[post_id].add(name)
    return tags


# One index per process, for the active set; replaced when another set becomes active.
_index_lock = threading.Lock()
_index: VotingIndex | None = None


def voting_index(cluster_set: ClusterSet) -> VotingIndex:
    """The index of ``cluster_set`` (built on first use), with new members added."""
    global _index
    with _index_lock:
        if _index is None or _index.version != _version(cluster_set):
            _index = VotingIndex(cluster_set)
        index = _index
    index.refresh()
    return index


def _version(cluster_set: ClusterSet) -> tuple:
    # The primary key alone is not enough: a database rolled back (tests) or restored can give a
    # new set an old set's key. The activation time tells them apart.
    return (cluster_set.pk, cluster_set.activated, cluster_set.extractor_key)


def reset_voting_index() -> None:
    """Forget the in-process index (tests; a process that wants its memory back)."""
    global _index
    with _index_lock:
        _index = None
