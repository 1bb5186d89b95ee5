"""The serving index for neighbour voting: the active cluster set as an inverted file in memory.

``suggest()`` with ``SUGGEST_METHOD = "ivf"`` compares a new image with the K centres of the
active set and then with the member vectors of its ``PROBES`` nearest clusters only. Those
vectors are read from the database (``ClusterMembership`` + ``StockImage.vector``) the first
time a query needs their cluster — all the clusters a query misses in one query — and kept per
process, one cluster ("block") at a time, so a process holds only the clusters queries have
touched (a small set, up to ``VotingIndex.preload_below_bytes``, is read whole at once). It holds
NumPy arrays only: the vectors, and the image, post and owner of each member (about 20 bytes per
member besides the vector).

The vectors and the search itself are ``search.exact.ExactSearch`` (the search the offline
evaluation runs too), which decides float32 or bfloat16 (``ExactSearch.compact_above_bytes``:
1 GB instead of 2 GB at 1,000,000 × 512-d) and reads a cluster through this module the first
time a query probes it. What stays here is the database side: reading members, freshness, which
candidates still exist and whose they are, and the voters' counted tags.

Freshness: every query first reads the set's assignment counter (``ClusterSet.n_images``, which
``assign_to_active_set`` raises in the transaction that adds the members; one row by its key);
only when it moved are the recent membership keys read, and the new members among them. Keys
are not handed out in commit order on PostgreSQL, so keys somewhat below the newest one seen are
looked at again (``_RECHECK_KEYS``): a batch that commits after a later one still joins. Images
that ``assign_to_active_set`` put into the active set between rebuilds therefore vote at once,
as they count at once in the ``cluster`` method. Tags are never cached: each suggestion reads
which candidates still exist (a deleted image does not vote) and the counted tags of the voters'
posts. A rebuild activates a new set,
and the next query builds a new index for it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.core.signals import setting_changed
from django.db import connections, router
from django.db.models import QuerySet

from imagetags.core import voting
from imagetags.models import (
    ClusterMembership,
    ClusterSet,
    FeatureStatus,
    PostTag,
    StockImage,
)
from imagetags.search.base import VectorSearch
from imagetags.search.exact import ExactSearch
from imagetags.search.pgvector import PgvectorSearch
from imagetags.services import engines, priors, store, vectors
from imagetags.services.priors import owner_key
from imagetags.services.store import IDS_PER_QUERY

# Columns read for each member: enough to vote without touching the post again.
_MEMBER_FIELDS = (
    "cluster_id",
    "image_id",
    "image__vector",
    "pk",
    "image__post_id",
    "image__post__owner_id",
    "image__post__external_owner",
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
_SQL_BATCH = IDS_PER_QUERY


@dataclass(frozen=True)
class Neighbours:
    """The images that vote for one query, most similar first, with their posts' counted tags."""

    image_ids: np.ndarray
    post_ids: list[int]
    similarities: np.ndarray
    voters: list[Hashable]
    tag_sets: list[frozenset[str]]  # read by this query: tags edited a moment ago count
    probes: int  # clusters searched (0: an engine searched the whole set)
    searched: int  # member vectors compared (an engine: most candidates it may return)
    engine: str = "exact"  # IMAGETAGS["SEARCH"]'s backend that found them


@dataclass(frozen=True)
class _Finder:
    """How one query finds its candidates: ``search(n)`` the ``n`` nearest (ids, similarities),
    most similar first; ``alive(ids)`` the (post, owner) of those that still exist; the clusters
    probed and the vectors compared (for the evidence)."""

    search: Callable[[int], tuple[np.ndarray, np.ndarray]]
    alive: Callable[[list[int]], dict[int, tuple[int, str | None]]]
    probes: int
    searched: int


class VotingIndex:
    """The active set's centres and, loaded on first use, its clusters' member vectors."""

    #: The IMAGETAGS["SEARCH"] backend whose candidates this index votes over.
    backend: str = "exact"

    #: A set whose vectors take at most this many bytes (32,768 × 512-d) is read whole by the
    #: first query, in one go (~0.1 s at 10,000 images), rather than a cluster at a time by each
    #: query that probes a new one: a small site never pays a load inside a later suggestion.
    preload_below_bytes: int = 64 * 2**20

    def __init__(
        self, cluster_set: ClusterSet, centers: np.ndarray, cluster_ids: Sequence[int]
    ) -> None:
        """The index of ``cluster_set``, whose centres (and their Cluster ids) the serving cache
        has read."""
        self.cluster_set_id = cluster_set.pk
        self.extractor_key = cluster_set.extractor_key
        self._usable_images = _usable_candidates(cluster_set.extractor_key, "pk")
        self.dim = cluster_set.dim
        self.preload = cluster_set.n_images * cluster_set.dim * 4 <= self.preload_below_bytes
        self.centers = centers
        self.cluster_ids = list(cluster_ids)
        self._position = {cluster_id: n for n, cluster_id in enumerate(self.cluster_ids)}
        self.search = ExactSearch(centers, size=cluster_set.n_images, loader=self._read_clusters)
        self.members = _Members()
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
        # Members up to this key are read by every cluster load; later ones come by refresh().
        self.watermark = self._newest_member()
        # Keys above watermark - _RECHECK_KEYS already in a loaded cluster.
        self._recent: set[int] = set()

    @property
    def compact(self) -> bool:
        """Whether the vectors are held as bfloat16 (``ExactSearch``'s rule)."""
        return self.search.compact

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
        # Rows laid out as _NEW_MEMBER_FIELDS: vector, ..., extractor, status.
        return row[2] is not None and row[7] == self.extractor_key and row[8] == FeatureStatus.READY

    def _columns(self, rows: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """Image ids and vectors of member rows laid out as ``_MEMBER_FIELDS`` (the vectors
        decoded in one NumPy step, ``vectors.stack``, not row by row); their posts and owners
        go into ``self.members``."""
        n = len(rows)
        matrix = vectors.stack([row[2] for row in rows], self.dim, count=n)
        ids = np.fromiter((row[1] for row in rows), dtype=np.int64, count=n)
        self.members.add(
            ids,
            np.fromiter((row[4] for row in rows), dtype=np.int64, count=n),
            [owner_key(row[5], row[6]) for row in rows],
        )
        return ids, matrix

    def _read_clusters(
        self, positions: Sequence[int]
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The search's loader: the members of some clusters (positions in ``cluster_ids``),
        one query for the few a query misses, streamed in groups when many are loaded at once
        (a warm-up of a million images must not hold every row as Python objects)."""
        with self._lock:
            for start in range(0, len(positions), _CLUSTERS_PER_READ):
                group = positions[start : start + _CLUSTERS_PER_READ]
                rows: dict[int, list[tuple]] = {self.cluster_ids[p]: [] for p in group}
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
                for position in group:
                    members = rows.pop(self.cluster_ids[position])
                    self._recent.update(row[3] for row in members if row[3] > floor)
                    yield (position, *self._columns(members))

    def refresh(self, assigned: int | None = None) -> int:
        """Add the members assigned since the last look to the loaded clusters; returns how many
        new memberships there were. ``assigned``: the set's ``n_images`` if the caller has just
        read it (the serving cache, with the active set's row): one query fewer."""
        with self._lock:
            assigned = self._assigned_count() if assigned is None else assigned
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
                and (pk > self.watermark or self._loaded(self._position.get(cluster_id)))
            ]
            rows = list(
                ClusterMembership.objects.filter(pk__in=new)
                .order_by("pk")
                .values_list(*_NEW_MEMBER_FIELDS)
            )
            joining = [
                row
                for row in rows
                if self._loaded(self._position.get(row[0])) and self._usable(row)
            ]
            if joining:
                ids, matrix = self._columns(joining)
                lists = np.fromiter((self._position[row[0]] for row in joining), np.int64)
                self.search.add(ids, matrix, lists)
            self._assigned = assigned
            self.watermark = max([self.watermark, *(pk for pk, _cluster in keys)])
            floor = self.watermark - _RECHECK_KEYS
            self._recent = {pk for pk in self._recent if pk > floor}
            self._recent.update(pk for pk in new if pk > floor)
            self._added += len(rows)
            if self._added - self._priors_added > max(10, 0.01 * self._size):
                self._priors.clear()  # new posts have moved the library-wide shares
            return len(rows)

    def _loaded(self, position: int | None) -> bool:
        return position is not None and self.search.is_loaded(position)

    # --- queries -----------------------------------------------------------------------------

    def vote(
        self,
        query: np.ndarray,
        params: voting.VoteParams,
        *,
        limit: int | None = None,
        threshold: float | None = None,
        exclude: Collection[str] = (),
    ) -> tuple[list[voting.VotedTag], Neighbours]:
        """Neighbour voting (``core.voting.vote``, as the evaluation runs it) among the members
        of the ``params.probes`` nearest clusters (all when ``probes`` is None): the ranked tags
        and the images that voted, with the counted tags of their posts read now."""
        finder = self._finder(query, params)
        search, probes, searched = finder.search, finder.probes, finder.searched
        # image -> (post, owner) of the candidates that still exist (one loaded into the index
        # may have been deleted since: it does not vote).
        found: dict[int, tuple[int, str | None]] = {}
        checked: set[int] = set()

        def candidates(n: int) -> tuple[np.ndarray, np.ndarray]:
            ids, sims = search(n)
            listed = ids.tolist()
            unknown = [pk for pk in listed if pk not in checked]
            found.update(finder.alive(unknown))
            checked.update(unknown)
            keep = np.fromiter((pk in found for pk in listed), bool, len(listed))
            return ids[keep], sims[keep]

        def voter(image_id: int) -> Hashable:
            post, owner = found[image_id]
            return voting.voter_of(post, owner, params.vote_by)

        def post_of(image_id: int) -> int:
            return found[image_id][0]

        def tags_of(ids: np.ndarray) -> list[frozenset[str]]:
            # Tags of the voters' posts only, read now: the candidates are four times as many,
            # and a library's posts carry 15-20 tags each (feedme-dev): reading theirs cost ~1 ms.
            posts = [post_of(int(i)) for i in ids]
            tags = _post_tags(posts)
            return [tags.get(post, frozenset()) for post in posts]

        ranked, voters = voting.vote(
            candidates,
            voter,
            tags_of,
            params,
            available=searched,
            prior=self.priors(params.vote_by) if params.prior_weight else None,
            limit=limit,
            threshold=threshold,
            exclude=exclude,
        )
        neighbours = Neighbours(
            image_ids=voters.ids,
            post_ids=[post_of(int(i)) for i in voters.ids],
            similarities=voters.similarities,
            voters=voters.voters,
            tag_sets=voters.tag_sets,  # type: ignore[arg-type]  # tag names
            probes=probes,
            searched=searched,
            engine=self.backend,
        )
        return ranked, neighbours

    def _finder(self, query: np.ndarray, params: voting.VoteParams) -> _Finder:
        """How this query's candidates are found: the inverted file's lists it probes."""
        if self.preload:
            self.search.load(range(len(self.cluster_ids)))
        probed = self.search.probe(query, params.probes)
        self.search.load(probed.tolist())  # before counting the candidates they hold
        searched = sum(self.search.list_size(int(p)) for p in probed)
        return _Finder(
            lambda n: self.search.search_lists(query, n, probed),
            self._alive,
            int(probed.shape[0]),
            searched,
        )

    def _alive(self, image_ids: list[int]) -> dict[int, tuple[int, str | None]]:
        """(post, owner) of those of these candidates that still exist, features current."""
        usable = {pk for (pk,) in self._usable_images.rows(list(dict.fromkeys(image_ids)))}
        alive = [pk for pk in image_ids if pk in usable]
        return dict(zip(alive, self.members.lookup(alive), strict=True))

    def neighbours(self, query: np.ndarray, params: voting.VoteParams) -> Neighbours:
        """The images of the ``params.neighbours`` nearest voters (see :meth:`vote`)."""
        return self.vote(query, params)[1]

    def load_all(self, vote_by: str) -> None:
        """Load every cluster, the library-wide tag shares and the per-suggestion SQL now (a
        warm-up), so that no request pays for them: at 1,000,000 images they cost seconds
        (docs/performance.md)."""
        self.search.load(range(len(self.cluster_ids)))
        self.members.merge()
        self._usable_images.prepare()
        _POST_TAGS.prepare()
        self.priors(vote_by)

    def priors(self, vote_by: str) -> dict[str, float]:
        """Library-wide share of voters carrying each counted tag, over the set's members:
        those the worker stored with the set (``services.priors``), read again once new members
        have grown the set by 1 %; computed here only for a set that has none stored."""
        with self._lock:
            cached = self._priors.get(vote_by)
            if cached is not None:
                return cached
            found = priors.stored(self.cluster_set_id, vote_by)
            shares = found[0] if found is not None else priors.compute(self.cluster_set_id, vote_by)
            self._priors[vote_by] = shares
            self._priors_added = self._added
            return shares

    @property
    def loaded_clusters(self) -> int:
        return len(self.search.loaded_lists)

    @property
    def nbytes(self) -> int:
        """Bytes held by the loaded clusters (vectors, ids, posts, owners)."""
        return self.search.nbytes + self.members.nbytes


class EngineVotingIndex(VotingIndex):
    """Neighbour voting whose candidates come from a search engine (``IMAGETAGS["SEARCH"]``:
    pgvector or usearch, ``services.engines``) over the whole set, not from clusters read into
    this process. Voting, priors and the checks that candidates still exist are the base
    class's; what this process holds is the engine's handle and, for usearch, the members newer
    than the mapped file (a small exact search, filled from the database)."""

    #: Most candidates one query asks an engine for when the first ``4 × NEIGHBOURS`` do not
    #: hold enough distinct voters (the exact index then searches all it holds).
    max_candidates = 2000

    def __init__(
        self, cluster_set: ClusterSet, centers: np.ndarray, cluster_ids: Sequence[int]
    ) -> None:
        super().__init__(cluster_set, centers, cluster_ids)
        self.preload = False
        self.backend = engines.search_setting().backend
        self.file: engines.IndexFile | None = None
        self.newer: ExactSearch | None = None  # usearch: members newer than the file
        self.engine: VectorSearch
        if self.backend == "pgvector":
            self.engine = engines.open_pgvector(cluster_set)
        else:
            self._open_newest_file(cluster_set)
        #: One statement finds the candidates and their posts and owners (pgvector beside the
        #: images' tables); otherwise the owners are a query of their own.
        self.joined = engines.joins_models(self.engine)
        self._alive_rows = _usable_candidates(
            cluster_set.extractor_key, "pk", "post_id", "post__owner_id", "post__external_owner"
        )
        self._cluster_set = cluster_set

    def _open_newest_file(self, cluster_set: ClusterSet) -> None:
        self.engine, self.file = engines.open_usearch(cluster_set)
        # Members the file does not hold yet: those above its watermark, and those just below
        # it that committed late (engines.RECHECK_KEYS), read into an exact search of one list.
        self.newer = ExactSearch(np.zeros((1, self.dim), dtype=np.float32))
        self._newer_seen = self.file.watermark
        self._add_newer()

    def _add_newer(self) -> int:
        """Read the members the file lacks into ``newer``: keys first (those just below the
        newest seen too, as they may commit late), vectors only for images neither holds."""
        keys = list(
            ClusterMembership.objects.filter(
                cluster_set_id=self.cluster_set_id,
                pk__gt=self._newer_seen - engines.RECHECK_KEYS,
            ).values_list("pk", "image_id")
        )
        if not keys:
            return 0
        self._newer_seen = max(self._newer_seen, max(pk for pk, _image in keys))
        assert self.newer is not None
        ids = np.unique(np.fromiter((image for _pk, image in keys), np.int64, len(keys)))
        ids = ids[~self.engine.contains(ids) & ~self.newer.contains(ids)]  # type: ignore[attr-defined]  # usearch
        rows = [
            row
            for part in store.batched(ids.tolist())
            for row in ClusterMembership.objects.filter(
                cluster_set_id=self.cluster_set_id, image_id__in=part
            ).values_list(*_NEW_MEMBER_FIELDS)
            if self._usable(row)
        ]
        if rows:
            matrix = vectors.stack([row[2] for row in rows], self.dim, count=len(rows))
            found = np.fromiter((row[1] for row in rows), np.int64, len(rows))
            self.newer.add(found, matrix, np.zeros(len(rows), dtype=np.int64))
        return len(rows)

    def refresh(self, assigned: int | None = None) -> int:
        """Take in what the worker added since the last look: for usearch, a newer file of the
        set (reopened) or the newer members (read from the database); pgvector's table already
        holds every committed member. ``assigned`` as the base class's."""
        with self._lock:
            assigned = self._assigned_count() if assigned is None else assigned
            if assigned == self._assigned:
                return 0
            added = assigned - self._assigned
            if self.backend == "usearch":
                newest = engines.index_files(self._cluster_set)
                if newest and self.file is not None and newest[0].watermark > self.file.watermark:
                    self._open_newest_file(self._cluster_set)
                else:
                    self._add_newer()
            self._assigned = assigned
            self._added += max(0, added)
            if self._added - self._priors_added > max(10, 0.01 * self._size):
                self._priors.clear()
            return max(0, added)

    def _finder(self, query: np.ndarray, params: voting.VoteParams) -> _Finder:
        held = self._size + self._added
        if self.joined:
            return self._joined_finder(query, held)

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            n = min(n, self.max_candidates)
            ids, sims = engines.search(self.engine, query[None, :], n)
            ids, sims = ids[0], sims[0]
            newer = self.newer
            if newer is not None and len(newer):
                more_ids, more_sims = newer.search(query[None, :], n, None)
                ids, sims = np.concatenate([ids, more_ids[0]]), np.concatenate([sims, more_sims[0]])
            valid = ids >= 0
            ids, sims = ids[valid], sims[valid]
            # Most similar first, ties by id (as ExactSearch), one row per id.
            order = np.lexsort((ids, -sims))
            ids, sims = ids[order], sims[order]
            _unique, first = np.unique(ids, return_index=True)
            first.sort()
            return ids[first][:n], sims[first][:n]

        return _Finder(search, self._alive, 0, min(held, self.max_candidates))

    def _joined_finder(self, query: np.ndarray, held: int) -> _Finder:
        """pgvector in the images' database: each search also brings the post and owner of
        what it found (``engines.candidates_with_owners``), so checking that the candidates
        still exist costs no query of its own."""
        known: dict[int, tuple[int, str | None] | None] = {}
        assert isinstance(self.engine, PgvectorSearch)
        engine = self.engine

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            rows = engines.candidates_with_owners(
                engine, query, min(n, self.max_candidates), self.extractor_key
            )
            for image_id, _similarity, post_id, owner_id, external in rows:
                known[image_id] = (
                    None if post_id is None else (post_id, owner_key(owner_id, external))
                )
            ids = np.fromiter((row[0] for row in rows), np.int64, len(rows))
            return ids, np.fromiter((row[1] for row in rows), np.float32, len(rows))

        def alive(image_ids: list[int]) -> dict[int, tuple[int, str | None]]:
            rest = [pk for pk in image_ids if pk not in known]
            found = self._alive(rest) if rest else {}
            for pk in image_ids:
                if known.get(pk) is not None:
                    found[pk] = known[pk]  # type: ignore[assignment]  # not None here
            return found

        return _Finder(search, alive, 0, min(held, self.max_candidates))

    def _alive(self, image_ids: list[int]) -> dict[int, tuple[int, str | None]]:
        return {
            pk: (post_id, owner_key(owner_id, external))
            for pk, post_id, owner_id, external in self._alive_rows.rows(
                list(dict.fromkeys(image_ids))
            )
        }

    def load_all(self, vote_by: str) -> None:
        self._alive_rows.prepare()
        _POST_TAGS.prepare()
        self.priors(vote_by)

    @property
    def nbytes(self) -> int:
        """Bytes this process holds for search: the newer members (the mapped file's pages are
        shared, pgvector's are the server's)."""
        return 0 if self.newer is None else self.newer.nbytes


def voting_index(
    cluster_set: ClusterSet, centers: np.ndarray, cluster_ids: Sequence[int]
) -> VotingIndex:
    """The voting index of ``IMAGETAGS["SEARCH"]``'s backend for ``cluster_set``."""
    if engines.uses_engine():
        return EngineVotingIndex(cluster_set, centers, cluster_ids)
    return VotingIndex(cluster_set, centers, cluster_ids)


class _Members:
    """The post and owner of every loaded member, by image id: sorted NumPy columns (about 20
    bytes a member, not a Python object each), merged when members were added since the last
    lookup. Owners are few (people, import sources): a small code per member."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = np.empty(0, dtype=np.int64)
        self._posts = np.empty(0, dtype=np.int64)
        self._owners = np.empty(0, dtype=np.int32)  # position in owner_keys, -1 when unknown
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.owner_keys: list[str] = []
        self._owner_codes: dict[str, int] = {}

    def add(self, ids: np.ndarray, posts: np.ndarray, owners: Sequence[str | None]) -> None:
        with self._lock:
            codes = np.fromiter((self._code(o) for o in owners), np.int32, len(owners))
            self._pending.append((ids, posts, codes))

    def _code(self, owner: str | None) -> int:
        if owner is None:
            return -1
        code = self._owner_codes.get(owner)
        if code is None:
            code = self._owner_codes[owner] = len(self.owner_keys)
            self.owner_keys.append(owner)
        return code

    def merge(self) -> None:
        """Sort the members added since the last lookup into the columns."""
        with self._lock:
            if self._pending:
                ids, posts, owners = (
                    np.concatenate([mine, *(chunk[n] for chunk in self._pending)])
                    for n, mine in enumerate((self._ids, self._posts, self._owners))
                )
                order = np.argsort(ids, kind="stable")
                self._ids, self._posts, self._owners = ids[order], posts[order], owners[order]
                self._pending = []

    def lookup(self, image_ids: Sequence[int]) -> list[tuple[int, str | None]]:
        """(post, owner) of loaded members."""
        self.merge()
        with self._lock:
            at = np.searchsorted(self._ids, np.asarray(image_ids, dtype=np.int64))
            posts, codes = self._posts[at].tolist(), self._owners[at].tolist()
        return [
            (post, self.owner_keys[code] if code >= 0 else None)
            for post, code in zip(posts, codes, strict=True)
        ]

    @property
    def nbytes(self) -> int:
        return self._ids.nbytes + self._posts.nbytes + self._owners.nbytes


# --- the reads every suggestion makes -----------------------------------------------------------


class _CompiledIn:
    """A queryset over ``IN (ids)``, compiled by the ORM once per database, then run as plain
    SQL with the ids' placeholders spliced in: building and compiling it on every suggestion
    cost more (~0.4-1 ms) than the database took to answer, and compiling it once per number
    of ids would still compile inside most of a process's first suggestions."""

    def __init__(self, build: Callable[[list[int]], QuerySet], model: type) -> None:
        self._build = build
        self._model = model
        # alias -> (SQL before the ids' placeholder, after it, parameters before, after)
        self._compiled: dict[str, tuple[str, str, list[Any], list[Any]]] = {}
        self._sql: dict[tuple[str, int], str] = {}  # (alias, number of ids) -> SQL

    def clear(self) -> None:
        self._compiled.clear()
        self._sql.clear()

    def _split(self, alias: str) -> tuple[str, str, list[Any], list[Any]]:
        compiled = self._compiled.get(alias)
        if compiled is None:
            # Compiled with one id no row has; its parameter is the n-th placeholder of the SQL
            # (the ORM writes one ``%s`` per parameter, in order, and a literal % as ``%%``).
            sql, params = self._build([-1]).query.get_compiler(using=alias).as_sql()
            params = list(params)
            at = next(i for i, value in enumerate(params) if type(value) is int and value == -1)
            slots = [m for m in _PLACEHOLDER.finditer(sql) if m.group() == "%s"]
            if len(slots) != len(params):
                raise ValueError(f"Cannot tell the parameters of {sql!r} apart.")
            slot = slots[at]
            compiled = (sql[: slot.start()], sql[slot.end() :], params[:at], params[at + 1 :])
            self._compiled[alias] = compiled
        return compiled

    def prepare(self) -> None:
        """Compile now (a warm-up), not in the first suggestion."""
        self._split(router.db_for_read(self._model))

    def rows(self, ids: Sequence[int]) -> list[tuple]:
        alias = router.db_for_read(self._model)
        before, after, params_before, params_after = self._split(alias)
        out: list[tuple] = []
        for start in range(0, len(ids), _SQL_BATCH):
            batch = list(ids[start : start + _SQL_BATCH])
            sql = self._sql.get((alias, len(batch)))
            if sql is None:
                sql = self._sql[alias, len(batch)] = before + ", ".join(["%s"] * len(batch)) + after
            with connections[alias].cursor() as cursor:
                cursor.execute(sql, [*params_before, *batch, *params_after])
                out.extend(cursor.fetchall())
        return out


_PLACEHOLDER = re.compile("%%|%s")
_POST_TAGS = _CompiledIn(
    lambda ids: (
        PostTag.objects.counted()
        .filter(post_id__in=ids)
        .order_by()
        .values_list("post_id", "tag__name")
    ),
    PostTag,
)


def _forget_compiled(**_kwargs: Any) -> None:
    # COUNTED_TAG_SOURCES (inside counted()) or the databases may have changed (tests).
    _POST_TAGS.clear()


setting_changed.connect(_forget_compiled)


def _usable_candidates(extractor_key: str, *fields: str) -> _CompiledIn:
    """``fields`` of the candidates that may vote: images that still exist, with current
    features of the set's extractor (one whose file is being re-extracted is not what its
    vector shows). One rule for every backend (pgvector's joined search applies it in SQL:
    ``engines.candidates_with_owners``)."""
    return _CompiledIn(
        lambda ids: (
            StockImage.objects.filter(
                pk__in=ids, feature_status=FeatureStatus.READY, extractor_key=extractor_key
            )
            .order_by()
            .values_list(*fields)
        ),
        StockImage,
    )


def _post_tags(post_ids: Iterable[int]) -> dict[int, frozenset[str]]:
    """The counted tags (``PostTag.objects.counted()``) of some posts, read now."""
    found: dict[int, set[str]] = {}
    for post_id, name in _POST_TAGS.rows(list(dict.fromkeys(post_ids))):
        found.setdefault(post_id, set()).add(name)
    return {post_id: frozenset(names) for post_id, names in found.items()}
