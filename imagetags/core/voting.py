"""Ranking tags for a query: neighbour voting (``ivf`` and the offline ``knn``/``vote``) and the
patent's nearest-cluster ranking (``cluster``).

:func:`vote` and :func:`cluster_tags` are the whole of each method once the data is at hand:
serving (``services.index`` / ``services.suggest``) and the offline evaluation
(``services.evaluation``) call them with their own search and their own way of reading tags, so
what ``evaluate_suggestions`` measures is the code that serves suggestions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# --- the patent: the nearest cluster's tags by post frequency ---------------------------------


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


def nearest_cluster(vector: np.ndarray, centers: np.ndarray) -> tuple[int, float]:
    """Index of the centre most similar to a unit ``vector`` (the first on a tie), and that
    cosine similarity."""
    similarities = centers @ vector
    best = int(similarities.argmax())
    return best, float(similarities[best])


@dataclass(frozen=True)
class ClusterAnswer:
    """The ``cluster`` method's answer for one query."""

    index: int  # position of the nearest centre
    similarity: float  # cosine similarity to it
    tags: list[RankedTag]


def cluster_tags(
    vector: np.ndarray,
    centers: np.ndarray,
    counts_of: Callable[[int], tuple[Mapping[Hashable, int], int]],
    *,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Collection[Hashable] = (),
) -> ClusterAnswer:
    """The ``cluster`` method: the nearest centre, then its tags by :func:`rank_cluster_tags`.

    ``counts_of(index)`` gives that cluster's (tag → posts carrying it, posts in the cluster):
    counted in memory offline, read from ``TagFrequency`` when serving.
    """
    index, similarity = nearest_cluster(vector, centers)
    counts, cluster_posts = counts_of(index)
    ranked = rank_cluster_tags(
        counts, cluster_posts, limit=limit, threshold=threshold, exclude=exclude
    )
    return ClusterAnswer(index=index, similarity=similarity, tags=ranked)


# --- beyond the patent: neighbour voting --------------------------------------------------------

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


# A candidate search for one query: (ids, similarities) of the n most similar library images,
# most similar first.
Search = Callable[[int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Voters:
    """The neighbours whose votes ranked the tags of one query, most similar first."""

    ids: np.ndarray  # the caller's ids of the neighbour images
    similarities: np.ndarray
    voters: list[Hashable]  # the voter of each neighbour (voter_of)
    tag_sets: list[frozenset[Hashable]]  # the tags of each neighbour, as tags_of gave them


def vote(
    search: Search,
    voter_of_id: Callable[[int], Hashable],
    tags_of: Callable[[np.ndarray], Sequence[Iterable[Hashable]]],
    params: VoteParams,
    *,
    available: int,
    prior: Mapping[Hashable, float] | None = None,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Collection[Hashable] = (),
) -> tuple[list[VotedTag], Voters]:
    """Neighbour voting for one query: the ``params.neighbours`` nearest voters
    (:func:`nearest_voters` over ``search``, ``available`` candidates at most), their tags once
    each (:func:`neighbour_votes`), ranked by :func:`rank_votes` against ``prior``.

    ``tags_of(ids)`` returns the tags of each neighbour image, called once for the chosen
    neighbours only (serving reads them from the database then). ``prior`` is only used when
    ``params.prior_weight`` is not 0.
    """
    ids, similarities, voters = nearest_voters(search, voter_of_id, params.neighbours, available)
    tag_sets = [frozenset(tags) for tags in tags_of(ids)]
    votes = neighbour_votes(voters, tag_sets, similarities, temperature=params.temperature)
    ranked = rank_votes(
        votes,
        prior=prior if params.prior_weight else None,
        prior_weight=params.prior_weight,
        limit=limit,
        threshold=threshold,
        exclude=exclude,
    )
    return ranked, Voters(ids=ids, similarities=similarities, voters=voters, tag_sets=tag_sets)
