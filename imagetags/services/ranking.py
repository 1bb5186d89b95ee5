"""The numeric core of the patent's method, free of the database.

Both the site (``clustering.rebuild_clusters``, ``suggest.suggest``) and the offline evaluation
(``evaluation.py``) call these functions, so what ``evaluate_suggestions`` measures is exactly the
code that serves suggestions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# The spherical k-means lives in the core; these names keep today's callers working.
from imagetags.core.kmeans import (  # noqa: F401
    ALGORITHMS,
    ClusteringResult,
    auto_k,
    fit_clusters,
    nearest_centers,
    parse_k,
)


def count_tag_frequencies(
    labels: Sequence[int] | np.ndarray,
    post_ids: Sequence[Hashable],
    post_tags: Mapping[Hashable, Iterable[Hashable]],
    k: int,
) -> tuple[list[int], list[Counter]]:
    """Per cluster: how many distinct posts it holds, and in how many of them each tag occurs.

    A tag counts **once per post** per cluster, however many of the post's images fall into the
    cluster: a 9-image post gets one vote, like a 1-image post. A post whose images fall into two
    clusters votes in both.
    """
    members: list[set[Hashable]] = [set() for _ in range(k)]
    for label, post in zip(labels, post_ids, strict=True):
        members[int(label)].add(post)
    post_counts = [len(posts) for posts in members]
    frequencies: list[Counter] = []
    for posts in members:
        counter: Counter = Counter()
        for post in posts:
            counter.update(set(post_tags.get(post, ())))
        frequencies.append(counter)
    return post_counts, frequencies


@dataclass(frozen=True)
class RankedTag:
    tag: Hashable  # a tag name (or id, in callers that work with ids)
    score: float  # share of the cluster's posts that carry the tag, 0..1
    post_count: int  # posts of the cluster with the tag
    cluster_posts: int  # posts in the cluster

    @property
    def evidence(self) -> str:
        noun = "post" if self.cluster_posts == 1 else "posts"
        return f"in {self.post_count} of {self.cluster_posts} similar {noun}"


def rank_cluster_tags(
    counts: Mapping[Hashable, int],
    cluster_posts: int,
    *,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Collection[Hashable] = (),
) -> list[RankedTag]:
    """The patent's ranking: a cluster's tags by how many of its posts carry them.

    Top ``limit`` tags, or all with a share of at least ``threshold``, or both; ties are broken
    by name so the order is stable. ``exclude`` drops tags already on the post.
    """
    if cluster_posts <= 0:
        return []
    ranked = sorted(
        ((tag, count) for tag, count in counts.items() if count > 0 and tag not in exclude),
        key=lambda item: (-item[1], str(item[0])),
    )
    out: list[RankedTag] = []
    for tag, count in ranked:
        score = count / cluster_posts
        if threshold is not None and score < threshold - 1e-12:
            break
        out.append(RankedTag(tag=tag, score=score, post_count=count, cluster_posts=cluster_posts))
        if limit is not None and len(out) >= limit:
            break
    return out


def popularity_ranking(
    post_tags: Mapping[Hashable, Iterable[Hashable]],
) -> list[tuple[Hashable, int]]:
    """Tags by how many posts of the whole library carry them (the baseline every method must beat)."""
    counter: Counter = Counter()
    for tags in post_tags.values():
        counter.update(set(tags))
    return sorted(counter.items(), key=lambda item: (-item[1], str(item[0])))


# --- beyond the patent: neighbour voting over an inverted file --------------------------------
#
# The functions below serve the methods measured against ``cluster`` in docs/quality.md. Like the
# ones above they are shared by ``suggest()`` (through ``services/index.py``) and the offline
# evaluation, so the numbers describe the serving code.

VOTE_BY = ("post", "owner")


@dataclass(frozen=True)
class VoteParams:
    """How neighbour voting ranks tags (the ``VOTING`` setting; docs/quality.md measures them).

    ``neighbours``: how many distinct voters are asked. ``temperature``: similarity weighting
    (``None``: every voter weighs 1). ``vote_by``: ``"post"`` or ``"owner"``. ``prior_weight``:
    how much of a tag's library-wide share is subtracted from its share among the neighbours.
    ``probes``: how many of the nearest clusters are searched (``None``: the whole library, exact).
    """

    neighbours: int = 20
    temperature: float | None = 0.05
    vote_by: str = "post"
    prior_weight: float = 0.1
    probes: int | None = 6

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, not {self.neighbours}.")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be positive or None, not {self.temperature}.")
        if self.vote_by not in VOTE_BY:
            raise ValueError(f"vote_by must be one of {', '.join(VOTE_BY)}, not {self.vote_by!r}.")
        if not 0 <= self.prior_weight <= 1:
            raise ValueError(f"prior_weight must be between 0 and 1, not {self.prior_weight}.")
        if self.probes is not None and self.probes < 1:
            raise ValueError(f"probes must be at least 1 or None, not {self.probes}.")

    @classmethod
    def from_setting(cls, value: Mapping[str, Any]) -> VoteParams:
        """From the ``VOTING`` setting's dict (upper-case keys, as in ``conf.DEFAULTS``)."""
        return cls(
            neighbours=int(value["NEIGHBOURS"]),
            temperature=None if value["TEMPERATURE"] is None else float(value["TEMPERATURE"]),
            vote_by=str(value["VOTE_BY"]),
            prior_weight=float(value["PRIOR_WEIGHT"]),
            probes=None if value["PROBES"] is None else int(value["PROBES"]),
        )

    def exact(self) -> VoteParams:
        """The same voting over the whole library."""
        return replace(self, probes=None)

    def describe(self) -> str:
        weighting = "equal votes" if self.temperature is None else f"T={self.temperature:g}"
        where = "all images" if self.probes is None else f"{self.probes} nearest clusters"
        return (
            f"{self.neighbours} nearest {self.vote_by}s, {weighting}, "
            f"prior weight {self.prior_weight:g}, {where}"
        )


def voter_of(post: Hashable, owner: Hashable | None, by: str = "post") -> Hashable:
    """Who casts the vote of an image: its post, or (``by="owner"``) its uploader when known.

    Counting once per owner keeps one prolific uploader, who tags a series of similar photos
    alike, from outvoting several people; an image whose owner is unknown votes as its post.
    """
    if by not in VOTE_BY:
        raise ValueError(f"Unknown vote_by {by!r}; choose one of {', '.join(VOTE_BY)}.")
    if by == "owner" and owner not in (None, ""):
        return ("owner", owner)
    return ("post", post)


def first_voters(voters_in_order: Sequence[Hashable], n: int) -> list[int]:
    """Positions of the neighbours that belong to the ``n`` first distinct voters.

    ``voters_in_order`` names the voter of each neighbour, most similar first. Later neighbours of
    a chosen voter are kept (they add their tags to its single vote); neighbours of the (n+1)-th
    and later voters are not.
    """
    chosen: set[Hashable] = set()
    keep: list[int] = []
    for position, voter in enumerate(voters_in_order):
        if voter not in chosen:
            if len(chosen) >= n:
                continue
            chosen.add(voter)
        keep.append(position)
    return keep


def nearest_voters(
    search: Callable[[int], tuple[np.ndarray, np.ndarray]],
    voter_of_id: Callable[[int], Hashable],
    n: int,
    available: int,
) -> tuple[np.ndarray, np.ndarray, list[Hashable]]:
    """The neighbours of the ``n`` nearest distinct voters: (ids, similarities, voters).

    ``search(c)`` returns the ``c`` most similar candidates, most similar first. Four times ``n``
    candidates almost always hold ``n`` distinct voters (a post's images, an owner's posts, are few);
    when they do not, the search is repeated over all ``available`` candidates.
    """
    wanted = min(available, 4 * n)
    while True:
        ids, sims = search(wanted)
        voters = [voter_of_id(int(i)) for i in ids]
        keep = first_voters(voters, n)
        if len({voters[p] for p in keep}) >= n or wanted >= available or len(ids) < wanted:
            return ids[keep], sims[keep], [voters[p] for p in keep]
        wanted = available


@dataclass(frozen=True)
class NeighbourVotes:
    """Tag votes of a group of similar images (or clusters)."""

    weights: dict[Hashable, float]  # summed weight of the voters carrying each tag
    counts: dict[Hashable, int]  # how many voters carry each tag (the evidence)
    total_weight: float  # summed weight of all voters
    voters: int  # distinct voters in the group

    def share(self, tag: Hashable) -> float:
        return self.weights.get(tag, 0.0) / self.total_weight if self.total_weight > 0 else 0.0


def neighbour_votes(
    voters: Sequence[Hashable],
    tag_sets: Sequence[Iterable[Hashable]],
    similarities: Sequence[float] | np.ndarray,
    *,
    temperature: float | None = None,
) -> NeighbourVotes:
    """Count each voter's tags once (the union over its images), weighting voters by similarity.

    Neighbours come most similar first. A voter's weight is ``exp((s - s_top) / temperature)``,
    ``s`` its most similar image's cosine similarity and ``s_top`` the nearest neighbour's: the
    nearest voter weighs 1, one 0.05 less similar weighs 1/e at ``temperature = 0.05``. With
    ``temperature=None`` every voter weighs 1 (plain k-NN voting).
    """
    tags_by_voter: dict[Hashable, set[Hashable]] = {}
    weight_by_voter: dict[Hashable, float] = {}
    top = float(similarities[0]) if len(similarities) else 0.0
    for voter, tags, sim in zip(voters, tag_sets, similarities, strict=True):
        if voter not in weight_by_voter:
            weight_by_voter[voter] = (
                1.0 if temperature is None else float(np.exp((float(sim) - top) / temperature))
            )
        tags_by_voter.setdefault(voter, set()).update(tags)
    weights: dict[Hashable, float] = {}
    counts: Counter = Counter()
    for voter, tags in tags_by_voter.items():
        for tag in tags:
            weights[tag] = weights.get(tag, 0.0) + weight_by_voter[voter]
        counts.update(tags)
    return NeighbourVotes(
        weights=weights,
        counts=dict(counts),
        total_weight=float(sum(weight_by_voter.values())),
        voters=len(weight_by_voter),
    )


#: Tags with less than this (weighted) share of the voters are not suggested.
MIN_SHARE = 0.01


@dataclass(frozen=True)
class VotedTag:
    """A tag suggested by similar images, with the evidence for it."""

    tag: Hashable
    score: float  # what the list is ordered by: share, less prior_weight × library-wide share
    share: float  # (weighted) share of the voters that carry the tag, 0..1
    votes: int  # voters that carry the tag
    voters: int  # voters asked


def rank_votes(
    votes: NeighbourVotes,
    *,
    prior: Mapping[Hashable, float] | None = None,
    prior_weight: float = 0.0,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Collection[Hashable] = (),
    min_share: float = MIN_SHARE,
) -> list[VotedTag]:
    """Tags by their share of the voters, less ``prior_weight`` × their library-wide share.

    ``prior_weight = 0`` is plain frequency; ``1`` is TagVote's full subtraction of the prior,
    which (measured, docs/quality.md) removes the generic tags users do want. In between, a
    specific tag well backed by the neighbours can overtake a generic one without the generic ones
    vanishing. ``threshold`` applies to the plain share. Tags below ``min_share`` are dropped:
    with similarity weighting, a tag carried only by far neighbours has a weight near zero and is
    noise, not a suggestion. Ties are broken by votes, then by name.
    """
    prior = prior or {}
    rows = []
    for tag, count in votes.counts.items():
        if count <= 0 or tag in exclude:
            continue
        share = votes.share(tag)
        if share < min_share or (threshold is not None and share < threshold - 1e-12):
            continue
        rows.append((share - prior_weight * prior.get(tag, 0.0), share, count, tag))
    rows.sort(key=lambda row: (-row[0], -row[2], str(row[3])))
    if limit is not None:
        rows = rows[:limit]
    return [
        VotedTag(tag=tag, score=score, share=share, votes=count, voters=votes.voters)
        for score, share, count, tag in rows
    ]


def voting_evidence(votes: int, voters: int, vote_by: str = "post") -> str:
    """What a voted tag rests on, for people: "on 6 of the 20 most similar posts"."""
    if vote_by == "owner":
        noun = "uploader" if voters == 1 else "uploaders"
        return f"from {votes} of the {voters} {noun} of the most similar posts"
    if voters == 1:
        return f"on {votes} of the 1 most similar post"
    return f"on {votes} of the {voters} most similar posts"


def prior_shares(
    post_tags: Mapping[Hashable, Iterable[Hashable]],
    voters: Mapping[Hashable, Hashable] | None = None,
) -> dict[Hashable, float]:
    """Library-wide share of voters carrying each tag (``voters`` maps post → voter; default:
    each post votes for itself), counted once per voter like the neighbour votes."""
    posts = list(post_tags)
    if not posts:
        return {}
    tags_by_voter: dict[Hashable, set[Hashable]] = {}
    for post in posts:
        voter = voters[post] if voters is not None else post
        tags_by_voter.setdefault(voter, set()).update(post_tags[post])
    counter: Counter = Counter()
    for tags in tags_by_voter.values():
        counter.update(tags)
    return {tag: count / len(tags_by_voter) for tag, count in counter.items()}


# Similarity search: exact, or restricted to the members of the m nearest clusters.


def top_similar(query: np.ndarray, matrix: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the ``n`` rows most similar to a unit ``query``, most similar first,
    and their similarities (exact: every row is compared)."""
    if matrix.shape[0] == 0 or n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    sims = matrix @ query
    order = top_order(sims, n)
    return order, sims[order]


def top_order(sims: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``n`` largest ``sims``, largest first; ties by ``tiebreak`` (default:
    position), so results do not depend on argpartition's internal order."""
    top = np.argpartition(-sims, n - 1)[:n] if n < sims.shape[0] else np.arange(sims.shape[0])
    keys = top if tiebreak is None else tiebreak[top]
    return top[np.lexsort((keys, -sims[top]))]


def nearest_lists(query: np.ndarray, centers: np.ndarray, m: int) -> np.ndarray:
    """Indexes of the ``m`` centres most similar to ``query``, most similar first."""
    order, _sims = top_similar(query, centers, min(m, centers.shape[0]))
    return order


def search_blocks(
    query: np.ndarray, blocks: Sequence[np.ndarray], ids: Sequence[np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most similar rows over several blocks of vectors: their ids and similarities,
    most similar first (ties by id). Blocks are float32 or :func:`to_bfloat16` rows."""
    if not blocks or n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    sims = np.concatenate([block_similarities(block, query) for block in blocks])
    all_ids = np.concatenate(ids)
    if sims.shape[0] == 0:
        return all_ids, sims
    order = top_order(sims, n, all_ids)
    return all_ids[order], sims[order]


# Compact blocks: bfloat16, the upper half of each float32, kept as uint16. Widening is one
# integer shift, which NumPy does at memory speed, while its float16 cast runs ~6× slower than
# the float32 scan itself (measured: docs/performance.md §2). A row's similarity moves by at most
# ~3e-4 (8 significant bits per value; the query stays float32).
BFLOAT16 = np.dtype(np.uint16)
# Rows widened at a time: 256 × 512-d float32 is 512 KB, within the L2 cache.
_WIDEN_BYTES = 2**19


def to_bfloat16(matrix: np.ndarray) -> np.ndarray:
    """float32 rows as bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(matrix, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(BFLOAT16)


def from_bfloat16(block: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns back to float32 (exact: every bfloat16 is a float32)."""
    return (block.astype(np.uint32) << np.uint32(16)).view(np.float32)


def block_similarities(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``block @ query`` for a float32 block, or for a bfloat16 one widened a few hundred rows
    at a time into a cache-sized buffer (never the whole block: that would undo the saving)."""
    if block.dtype != BFLOAT16:
        return block @ query
    n, dim = block.shape
    out = np.empty(n, dtype=np.float32)
    step = max(1, _WIDEN_BYTES // (4 * max(dim, 1)))
    buffer = np.empty((min(step, n), dim), dtype=np.uint32)
    query = np.asarray(query, dtype=np.float32)
    for start in range(0, n, step):
        rows = block[start : start + step]
        wide = buffer[: rows.shape[0]]
        np.left_shift(rows, 16, out=wide, dtype=np.uint32)
        np.dot(wide.view(np.float32), query, out=out[start : start + rows.shape[0]])
    return out


@dataclass
class InvertedLists:
    """Library vectors grouped by cluster (an inverted file), so a query compares itself with the
    K centres and then with the members of its ``m`` nearest clusters only: O(K + m·N/K) vectors
    instead of N. With ``m = K`` the search is exact.

    ``blocks[c]`` holds cluster c's member vectors and ``ids[c]`` the caller's ids of those
    members (library row numbers in the evaluation).
    """

    centers: np.ndarray  # (K, d) unit rows
    blocks: list[np.ndarray]  # per cluster: (n_c, d) float32
    ids: list[np.ndarray]  # per cluster: (n_c,) int64

    @classmethod
    def from_labels(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        centers: np.ndarray,
        ids: np.ndarray | None = None,
    ) -> InvertedLists:
        ids = np.arange(vectors.shape[0]) if ids is None else np.asarray(ids)
        labels = np.asarray(labels)
        blocks, block_ids = [], []
        for cluster in range(centers.shape[0]):
            rows = np.flatnonzero(labels == cluster)
            blocks.append(np.ascontiguousarray(vectors[rows], dtype=np.float32))
            block_ids.append(ids[rows].astype(np.int64))
        return cls(centers=centers, blocks=blocks, ids=block_ids)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.ids)

    def search(self, query: np.ndarray, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the ``n`` most similar members of the ``m`` nearest clusters, most similar
        first, and their similarities."""
        probe = nearest_lists(query, self.centers, m)
        return search_blocks(
            query, [self.blocks[c] for c in probe], [self.ids[c] for c in probe], n
        )
