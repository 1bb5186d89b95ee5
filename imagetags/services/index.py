"""The serving index for neighbour voting: the active cluster set as an inverted file in memory.

``suggest()`` with ``SUGGEST_METHOD = "ivf"`` compares a new image with the K centres of the
active set and then with the member vectors of its ``PROBES`` nearest clusters only. Those
vectors are read from the database (``ClusterMembership`` + ``StockImage.vector``) the first
time a query needs their cluster — all the clusters a query misses in one query — and kept per
process, one cluster ("block") at a time, so a process holds only the clusters queries have
touched (a small set, up to ``VotingIndex.preload_below_bytes``, is read whole at once). A block holds NumPy arrays only: the vectors, and the image, post and owner of each
member (about 20 bytes per member besides the vector).

Memory: blocks are float32 (exact) while the whole set's vectors fit in
``VotingIndex.compact_above_bytes`` (256 MB: 131,000 × 512-d); above that they are kept as
bfloat16, half the bytes (1 GB instead of 2 GB at 1,000,000 × 512-d), widened a few hundred rows
at a time during the scan. Similarities move by at most ~3e-4; docs/performance.md §2 measures
what that does to the neighbours and the suggested tags.

Freshness: every query first reads the set's assignment counter (``ClusterSet.n_images``, which
``assign_to_active_set`` raises in the transaction that adds the members; one row by its key);
only when it moved are the recent membership keys read, and the new members among them. Keys
are not handed out in commit order on PostgreSQL, so keys somewhat below the newest one seen are
looked at again (``_RECHECK_KEYS``): a batch that commits after a later one still joins. Images
that ``assign_to_active_set`` put into the active set between rebuilds therefore vote at once,
as they count at once in the ``cluster`` method. Tags are never cached: each suggestion reads
which candidates still exist (a deleted image does not vote) and the counted tags of the
voters' posts. A rebuild activates a new set,
and the next query builds a new index for it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.db import connections, router
from django.db.models import Count

from imagetags.conf import imagetags_settings
from imagetags.models import (
    ClusterMembership,
    ClusterSet,
    FeatureStatus,
    PostTag,
    StockImage,
    Tag,
)
from imagetags.services import ranking, vectors
from imagetags.services.clustering import load_centers

# Columns read for each member: enough to vote without touching the post again.
_MEMBER_FIELDS = (
    "cluster_id",
    "image_id",
    "image__post_id",
    "image__post__owner_id",
    "image__post__external_owner",
    "image__vector",
    "pk",
)
# New memberships also bring what decides whether their vector is usable.
_NEW_MEMBER_FIELDS = (*_MEMBER_FIELDS, "image__extractor_key", "image__feature_status")
# Membership keys this far below the newest one seen are looked at again when new members
# arrive: keys are not handed out in commit order (a PostgreSQL transaction takes its sequence
# values before it commits), so a batch can commit after a later one. A worker's batch is at
# most BATCH_SIZE (32) images; this covers dozens of workers committing out of order.
_RECHECK_KEYS = 4096
# Clusters read by one query when many are loaded at once (a warm-up reads them all): bounds
# the rows held as Python objects during a load. A query probes 6, read together.
_CLUSTERS_PER_READ = 16
_SQL_BATCH = 500  # ids per IN list: far below every backend's limit on query parameters


def owner_key(owner_id: int | None, external_owner: str | None) -> str | None:
    """A post's uploader: a site user, else the source system's owner (imports), else unknown."""
    if owner_id is not None:
        return f"user:{owner_id}"
    if external_owner:
        return f"external:{external_owner}"
    return None


@dataclass(frozen=True)
class _Block:
    """One cluster's members: vectors, and for each the image, its post and the post's owner."""

    vectors: np.ndarray  # (n, d) float32, or bfloat16 bits (ranking.to_bfloat16) when compact
    image_ids: np.ndarray  # (n,) int64
    post_ids: np.ndarray  # (n,) int64
    owners: np.ndarray  # (n,) int32: position in VotingIndex.owner_keys, -1 when unknown

    def __add__(self, other: _Block) -> _Block:
        return _Block(
            *(
                np.concatenate([mine, theirs])
                for mine, theirs in zip(self.columns, other.columns, strict=True)
            )
        )

    @property
    def columns(self) -> tuple[np.ndarray, ...]:
        return (self.vectors, self.image_ids, self.post_ids, self.owners)

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns)


@dataclass(frozen=True)
class Neighbours:
    """The images that vote for one query, most similar first, with their posts' counted tags."""

    image_ids: np.ndarray
    post_ids: list[int]
    similarities: np.ndarray
    voters: list[Hashable]
    tag_sets: list[frozenset[str]]  # read by this query: tags edited a moment ago count
    probes: int  # clusters searched
    searched: int  # member vectors compared


class VotingIndex:
    """The active set's centres and, loaded on first use, its clusters' member vectors."""

    #: Blocks are float32 up to this many bytes of vectors for the whole set, bfloat16 above.
    compact_above_bytes: int = 256 * 2**20
    #: A set whose vectors take at most this many bytes (32,768 × 512-d) is read whole by the
    #: first query, in one go (~0.1 s at 10,000 images), rather than a cluster at a time by each
    #: query that probes a new one: a small site never pays a load inside a later suggestion.
    preload_below_bytes: int = 64 * 2**20

    def __init__(self, cluster_set: ClusterSet) -> None:
        self.cluster_set_id = cluster_set.pk
        self.version = _version(cluster_set)
        self.extractor_key = cluster_set.extractor_key
        self.dim = cluster_set.dim
        set_bytes = cluster_set.n_images * cluster_set.dim * 4
        self.compact = set_bytes > self.compact_above_bytes
        self.preload = set_bytes <= self.preload_below_bytes
        self.centers, self.cluster_ids, _indexes = load_centers(cluster_set)
        self._position = {cluster_id: n for n, cluster_id in enumerate(self.cluster_ids)}
        self._blocks: dict[int, _Block] = {}
        # Owners are few (people, import sources): blocks store a small code per member.
        self.owner_keys: list[str] = []
        self._owner_codes: dict[str, int] = {}
        self._lock = threading.RLock()
        self._priors: dict[str, dict[str, float]] = {}
        # Library-wide shares move slowly: they are recomputed once the set has grown by 1 %.
        self._added = 0
        self._priors_added = 0
        self._size = max(1, cluster_set.n_images)
        # The freshness check runs before every query: plain SQL, so the ORM does not build
        # and compile the same statement each time (~1 ms of a ~2 ms suggestion at 1,000).
        self._db = router.db_for_read(ClusterMembership)
        meta = ClusterMembership._meta
        quote = connections[self._db].ops.quote_name
        self._newest_sql = (
            f"SELECT MAX({quote(meta.pk.column)}) FROM {quote(meta.db_table)} "
            f"WHERE {quote(meta.get_field('cluster_set').column)} = %s"
        )
        # assign_to_active_set raises ClusterSet.n_images in the transaction that adds the
        # members: unlike the newest key, it moves when any batch commits, in any order.
        set_meta = ClusterSet._meta
        self._assigned_sql = (
            f"SELECT {quote(set_meta.get_field('n_images').column)} "
            f"FROM {quote(set_meta.db_table)} WHERE {quote(set_meta.pk.column)} = %s"
        )
        # Read before the newest key: a batch committed in between is looked at again by the
        # next refresh() (and recognised), never missed.
        self._assigned = self._assigned_count()
        # Members up to this key are read by every block load; later ones come by refresh().
        self.watermark = self._newest_member()
        # Keys above watermark - _RECHECK_KEYS already in a loaded block.
        self._recent: set[int] = set()

    # --- members -----------------------------------------------------------------------------

    def _assigned_count(self) -> int:
        with connections[self._db].cursor() as cursor:
            cursor.execute(self._assigned_sql, [self.cluster_set_id])
            row = cursor.fetchone()
        return (row[0] if row else None) or 0

    def _newest_member(self) -> int:
        with connections[self._db].cursor() as cursor:
            cursor.execute(self._newest_sql, [self.cluster_set_id])
            row = cursor.fetchone()
        return (row[0] if row else None) or 0

    def _usable(self, row: tuple) -> bool:
        # A vector recomputed since the rebuild (another extractor) no longer fits the centres.
        # Rows laid out as _NEW_MEMBER_FIELDS: vector, key, extractor, status.
        return row[5] is not None and row[7] == self.extractor_key and row[8] == FeatureStatus.READY

    def _owner_code(self, owner_id: int | None, external_owner: str | None) -> int:
        key = owner_key(owner_id, external_owner)
        if key is None:
            return -1
        code = self._owner_codes.get(key)
        if code is None:
            code = self._owner_codes[key] = len(self.owner_keys)
            self.owner_keys.append(key)
        return code

    def _make_block(self, rows: Sequence[tuple]) -> _Block:
        """A block from member rows laid out as ``_MEMBER_FIELDS``: column by column, the
        vectors decoded in one NumPy step (``vectors.stack``), not row by row."""
        n = len(rows)
        matrix = vectors.stack([row[5] for row in rows], self.dim, count=n)
        return _Block(
            vectors=ranking.to_bfloat16(matrix) if self.compact else matrix,
            image_ids=np.fromiter((row[1] for row in rows), dtype=np.int64, count=n),
            post_ids=np.fromiter((row[2] for row in rows), dtype=np.int64, count=n),
            owners=np.fromiter(
                (self._owner_code(row[3], row[4]) for row in rows), dtype=np.int32, count=n
            ),
        )

    def _blocks_at(self, positions: Iterable[int]) -> list[_Block]:
        """The blocks of some clusters (positions in ``cluster_ids``), reading the ones not yet
        loaded: one query when a query misses a few, streamed in groups when many are loaded
        at once (a warm-up of a million images must not hold every row as Python objects)."""
        positions = list(positions)
        with self._lock:
            wanted = range(len(self.cluster_ids)) if self.preload else positions
            missing = [p for p in wanted if p not in self._blocks]
            for start in range(0, len(missing), _CLUSTERS_PER_READ):
                self._load(missing[start : start + _CLUSTERS_PER_READ])
            return [self._blocks[p] for p in positions]

    def _load(self, positions: list[int]) -> None:
        rows: dict[int, list[tuple]] = {self.cluster_ids[p]: [] for p in positions}
        # Unusable vectors are left out by the database, not in a Python loop.
        for row in (
            ClusterMembership.objects.filter(
                cluster_id__in=list(rows),
                pk__lte=self.watermark,
                image__vector__isnull=False,
                image__extractor_key=self.extractor_key,
                image__feature_status=FeatureStatus.READY,
            )
            .values_list(*_MEMBER_FIELDS)
            .iterator(chunk_size=2000)
        ):
            rows[row[0]].append(row)
        floor = self.watermark - _RECHECK_KEYS
        for position in positions:
            members = rows.pop(self.cluster_ids[position])
            self._recent.update(row[6] for row in members if row[6] > floor)
            self._blocks[position] = self._make_block(members)

    def refresh(self) -> int:
        """Add the members assigned since the last look to the loaded clusters; returns how many
        new memberships there were."""
        with self._lock:
            assigned = self._assigned_count()
            if assigned == self._assigned:
                return 0  # the usual case: one row read by its key, no ORM
            # Which recent keys are new: above the watermark, or below it but committed late
            # (see _RECHECK_KEYS) into a cluster already loaded. A cluster loaded later reads
            # its members itself.
            keys = list(
                ClusterMembership.objects.filter(
                    cluster_set_id=self.cluster_set_id, pk__gt=self.watermark - _RECHECK_KEYS
                ).values_list("pk", "cluster_id")
            )
            new = [
                pk
                for pk, cluster_id in keys
                if pk not in self._recent
                and (pk > self.watermark or self._position.get(cluster_id) in self._blocks)
            ]
            rows = list(
                ClusterMembership.objects.filter(pk__in=new)
                .order_by("pk")
                .values_list(*_NEW_MEMBER_FIELDS)
            )
            by_block: dict[int, list[tuple]] = {}
            for row in rows:
                position = self._position.get(row[0])
                if position in self._blocks and self._usable(row):
                    by_block.setdefault(position, []).append(row)
            for position, members in by_block.items():
                self._blocks[position] = self._blocks[position] + self._make_block(members)
            self._assigned = assigned
            self.watermark = max([self.watermark, *(pk for pk, _cluster in keys)])
            floor = self.watermark - _RECHECK_KEYS
            self._recent = {pk for pk in self._recent if pk > floor}
            self._recent.update(pk for pk in new if pk > floor)
            self._added += len(rows)
            if self._added - self._priors_added > max(10, 0.01 * self._size):
                self._priors.clear()  # new posts have moved the library-wide shares
            return len(rows)

    # --- queries -----------------------------------------------------------------------------

    def neighbours(self, query: np.ndarray, params: ranking.VoteParams) -> Neighbours:
        """The images of the ``params.neighbours`` nearest voters among the members of the
        ``params.probes`` nearest clusters (all clusters when ``probes`` is None), and the
        counted tags of their posts."""
        probes = self.centers.shape[0] if params.probes is None else params.probes
        blocks = self._blocks_at(int(p) for p in ranking.nearest_lists(query, self.centers, probes))
        image_ids = _concatenate([b.image_ids for b in blocks], np.int64)
        post_ids = _concatenate([b.post_ids for b in blocks], np.int64)
        owners = _concatenate([b.owners for b in blocks], np.int32)
        # One scan per query, even when nearest_voters asks for more candidates a second time.
        sims = _concatenate(
            [ranking.block_similarities(b.vectors, query) for b in blocks], np.float32
        )
        alive: dict[int, bool] = {}  # False: deleted since it was loaded
        positions: dict[int, int] = {}

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            if n <= 0 or sims.shape[0] == 0:
                return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
            top = ranking.top_order(sims, n, image_ids)
            ids = image_ids[top]
            unknown = [int(i) for i in ids if int(i) not in alive]
            existing = _existing_images(unknown)
            alive.update((pk, pk in existing) for pk in unknown)
            keep = top[np.fromiter((alive[int(i)] for i in ids), bool, ids.shape[0])]
            positions.update(zip(image_ids[keep].tolist(), keep.tolist(), strict=True))
            return image_ids[keep], sims[keep]

        def voter(image_id: int) -> Hashable:
            position = positions[image_id]
            code = int(owners[position])
            owner = self.owner_keys[code] if code >= 0 else None
            return ranking.voter_of(int(post_ids[position]), owner, params.vote_by)

        ids, similarities, voters = ranking.nearest_voters(
            search, voter, params.neighbours, image_ids.shape[0]
        )
        posts = [int(post_ids[positions[int(i)]]) for i in ids]
        # Tags of the voters' posts only, read now: the candidates are four times as many, and
        # a library's posts carry 15-20 tags each (feedme-dev), so reading theirs cost ~1 ms.
        tags = _post_tags(posts)
        return Neighbours(
            image_ids=ids,
            post_ids=posts,
            similarities=similarities,
            voters=voters,
            tag_sets=[tags.get(post, frozenset()) for post in posts],
            probes=len(blocks),
            searched=image_ids.shape[0],
        )

    def load_all(self, vote_by: str) -> None:
        """Load every cluster and the library-wide tag shares now (a warm-up), so that no
        request pays for them: at 1,000,000 images they cost seconds (docs/performance.md)."""
        self._blocks_at(range(len(self.cluster_ids)))
        self.priors(vote_by)

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
                # A (post, tag) pair is unique, so rows per tag are its posts: grouping by the
                # key, without joining Tag and counting DISTINCT, is what makes the first
                # suggestion of a large set affordable; names come for the tags found.
                n_posts = posts.order_by().distinct().count()
                counts = dict(
                    PostTag.objects.filter(source__in=counted, post_id__in=posts)
                    .order_by()
                    .values_list("tag_id")
                    .annotate(n=Count("pk"))
                )
                names = Tag.objects.filter(pk__in=list(counts)).values_list("pk", "name")
                shares = {name: counts[pk] / n_posts for pk, name in names} if n_posts else {}
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

    @property
    def nbytes(self) -> int:
        """Bytes held by the loaded blocks (vectors, ids, owners)."""
        return sum(block.nbytes for block in self._blocks.values())


def _concatenate(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)


# Both run on every suggestion, as plain SQL: building them with the ORM cost more (~0.4-1 ms)
# than the database took to answer.


def _existing_images(image_ids: list[int]) -> set[int]:
    """Which of these images still exist (one loaded into the index may have been deleted)."""
    found: set[int] = set()
    connection = connections[router.db_for_read(StockImage)]
    meta = StockImage._meta
    quote = connection.ops.quote_name
    for start in range(0, len(image_ids), _SQL_BATCH):
        batch = image_ids[start : start + _SQL_BATCH]
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {quote(meta.pk.column)} FROM {quote(meta.db_table)} "
                f"WHERE {quote(meta.pk.column)} IN ({', '.join(['%s'] * len(batch))})",
                batch,
            )
            found.update(pk for (pk,) in cursor.fetchall())
    return found


def _post_tags(post_ids: Sequence[int]) -> dict[int, frozenset[str]]:
    """The counted tags (``COUNTED_TAG_SOURCES``) of some posts, read now."""
    counted = list(imagetags_settings.COUNTED_TAG_SOURCES)
    unique = list(dict.fromkeys(post_ids))
    found: dict[int, set[str]] = {}
    connection = connections[router.db_for_read(PostTag)]
    quote = connection.ops.quote_name
    post_tag, tag = PostTag._meta, Tag._meta

    def column(meta: Any, name: str) -> str:
        return f"{quote(meta.db_table)}.{quote(meta.get_field(name).column)}"

    for start in range(0, len(unique), _SQL_BATCH):
        batch = unique[start : start + _SQL_BATCH]
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT {column(post_tag, 'post')}, {column(tag, 'name')} "
                f"FROM {quote(post_tag.db_table)} INNER JOIN {quote(tag.db_table)} "
                f"ON {column(tag, 'id')} = {column(post_tag, 'tag')} "
                f"WHERE {column(post_tag, 'source')} IN ({', '.join(['%s'] * len(counted))}) "
                f"AND {column(post_tag, 'post')} IN ({', '.join(['%s'] * len(batch))})",
                [*counted, *batch],
            )
            for post_id, name in cursor.fetchall():
                found.setdefault(post_id, set()).add(name)
    return {post_id: frozenset(names) for post_id, names in found.items()}


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
