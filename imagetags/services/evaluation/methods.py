"""The methods scored on one library: popularity, the patent's nearest cluster, k-NN and
neighbour voting, each ranking through the core functions and the search that serve the site."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagetags.core import counting, kmeans
from imagetags.core import voting as core_voting
from imagetags.core.metrics import MethodScores, score_rankings
from imagetags.search.base import VectorSearch
from imagetags.search.exact import ExactSearch
from imagetags.services.evaluation.backends import RECALL_DEPTH, SearchBuilder, exact_search
from imagetags.services.evaluation.data import ImageSet
from imagetags.services.suggest import METHODS as SERVING_METHODS


@dataclass
class ClusterModel:
    """The patent's model of a library: centres, and per cluster its post count and tag counts."""

    result: kmeans.ClusteringResult
    post_counts: list[int]
    frequencies: list[Counter]

    def ranked(
        self,
        vector: np.ndarray,
        limit: int | None,
        *,
        threshold: float | None = None,
        exclude: Collection[str] = (),
    ) -> list[core_voting.RankedTag]:
        """Tags of the cluster most similar to ``vector``, by how many of its posts carry them
        (``core.voting.cluster_tags``, as ``suggest(method="cluster")`` ranks them)."""
        answer = core_voting.cluster_tags(
            vector,
            self.result.centers,
            lambda label: (self.frequencies[label], self.post_counts[label]),
            limit=limit,
            threshold=threshold,
            exclude=exclude,
        )
        return answer.tags

    def rank(self, vector: np.ndarray, limit: int) -> list[str]:
        return [str(item.tag) for item in self.ranked(vector, limit)]


def fit_cluster_model(
    library: ImageSet,
    n_clusters: int,
    *,
    algorithm: str,
    seed: int,
    batch_size: int,
    max_iter: int,
    tol: float,
) -> ClusterModel:
    """Cluster the library's vectors and count each cluster's tags once per post."""
    assert library.vectors is not None
    result = kmeans.fit_clusters(
        library.vectors,
        n_clusters,
        algorithm=algorithm,
        batch_size=batch_size,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
    )
    post_counts, frequencies = counting.count_tag_frequencies(
        result.labels, library.posts, library.post_tags, result.k
    )
    return ClusterModel(result=result, post_counts=post_counts, frequencies=frequencies)


@dataclass
class LibraryModel:
    """Everything the methods need to answer queries against one library: its clusters (the
    patent's counts and the inverted lists over them), who votes for each image, and the tags'
    library-wide shares."""

    library: ImageSet
    clusters: ClusterModel
    lists: ExactSearch  # ids: library row numbers
    popular: list[str]
    voters: dict[str, list[Hashable]]  # vote_by -> the voter of each library image
    priors: dict[str, dict[str, float]]  # vote_by -> library-wide share of voters per tag

    @classmethod
    def build(cls, library: ImageSet, clusters: ClusterModel) -> LibraryModel:
        assert library.vectors is not None
        voters: dict[str, list[Hashable]] = {}
        priors: dict[str, dict[str, float]] = {}
        for by in core_voting.VOTE_BY:
            of_post = {
                post: core_voting.voter_of(post, library.owners.get(post), by)
                for post in library.post_tags
            }
            voters[by] = [of_post[post] for post in library.posts]
            priors[by] = counting.prior_shares(library.post_tags, of_post)
        return cls(
            library=library,
            clusters=clusters,
            lists=ExactSearch.from_labels(
                library.vectors, clusters.result.labels, clusters.result.centers
            ),
            popular=[str(tag) for tag, _n in counting.popularity_ranking(library.post_tags)],
            voters=voters,
            priors=priors,
        )

    def search(self, vector: np.ndarray, probes: int | None) -> Search:
        """The candidates search for a query: over the members of the ``probes`` nearest lists,
        or (``None``) exact over the library."""

        def candidates(n: int) -> tuple[np.ndarray, np.ndarray]:
            ids, sims = self.lists.search(vector[None, :], n, probes)
            return ids[0], sims[0]

        return candidates

    def voted(
        self,
        vector: np.ndarray,
        params: core_voting.VoteParams,
        limit: int | None,
        search: Search | None = None,
        *,
        threshold: float | None = None,
        exclude: Collection[str] = (),
    ) -> tuple[list[core_voting.VotedTag], core_voting.Voters]:
        """Neighbour voting as ``suggest()`` does it (``core.voting.vote``): the nearest
        voters, their tags once each, against the library-wide shares; and who voted (ids:
        library rows)."""
        return core_voting.vote(
            search or self.search(vector, params.probes),
            self.voters[params.vote_by].__getitem__,
            lambda ids: [self.library.tags_of(int(i)) for i in ids],
            params,
            available=len(self.library),
            prior=self.priors[params.vote_by],
            limit=limit,
            threshold=threshold,
            exclude=exclude,
        )

    def vote(
        self,
        vector: np.ndarray,
        params: core_voting.VoteParams,
        limit: int,
        search: Search | None = None,
    ) -> list[str]:
        ranked, _voters = self.voted(vector, params, limit, search)
        return [str(item.tag) for item in ranked]


# A candidate search: (ids, similarities) of the n most similar library images.
Search = core_voting.Search


def score_method(
    rank: Callable[[np.ndarray, int], list[str]], queries: ImageSet, k: int
) -> MethodScores:
    """Score ``rank(vector, depth)`` on every query, timing each call (extraction excluded).

    BLAS runs on one thread meanwhile, as for one request in a web worker: on a busy machine
    a multi-threaded product of one vector with a small matrix spends its time waiting for
    threads, and the timings would say more about the load than about the method.
    """
    rankings, seconds = rank_queries(rank, queries, max(k, 3))
    return score_rankings(rankings, truths(queries), k, query_seconds=seconds)


def rank_queries(
    rank: Callable[[np.ndarray, int], list[str]], queries: ImageSet, depth: int
) -> tuple[list[list[str]], float]:
    """``rank(vector, depth)`` of every query, and the seconds the calls took in all (BLAS on
    one thread: see :func:`score_method`)."""
    from threadpoolctl import threadpool_limits

    assert queries.vectors is not None
    rankings, seconds = [], 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for vector in queries.vectors:
            started = time.perf_counter()
            rankings.append(rank(vector, depth))
            seconds += time.perf_counter() - started
    return rankings, seconds


def score_popularity(library: ImageSet, queries: ImageSet, k: int) -> MethodScores:
    """The baseline: the library's most common tags (by post count), whatever the image."""
    popular = [str(tag) for tag, _count in counting.popularity_ranking(library.post_tags)]
    return score_method(lambda _vector, depth: popular[:depth], queries, k)


def score_cluster(model: ClusterModel, queries: ImageSet, k: int) -> MethodScores:
    """The patent's method: nearest centre by cosine, that cluster's tags by post frequency."""
    return score_method(model.rank, queries, k)


def truths(queries: ImageSet) -> list[frozenset[str]]:
    return [queries.tags_of(index) for index in range(len(queries))]


#: The research anchor: exact k-NN voting, each of the k nearest posts one equal vote (TagVote
#: without its prior). k = 10 was chosen by the tuning protocol (``--tune``, docs/quality.md).
KNN = core_voting.VoteParams(
    neighbours=10, temperature=None, vote_by="post", prior_weight=0.0, probes=None
)


#: The methods suggest() serves (``ivf``, ``cluster``) and the offline baselines around them.
METHODS = ("popularity", "knn", "vote", *SERVING_METHODS)


METHOD_HELP = {
    "popularity": "the library's most common tags, the same for every image",
    "cluster": "the patent: nearest cluster centre, its tags by post frequency",
    "knn": f"exact k-NN voting, {KNN.neighbours} nearest posts, one equal vote each",
    "vote": "the VOTING setting over the whole library (exact)",
    "ivf": "the VOTING setting over the members of the nearest clusters only (inverted file)",
}


def method_rankers(
    model: LibraryModel,
    voting: core_voting.VoteParams,
    *,
    knn: core_voting.VoteParams = KNN,
) -> dict[str, Callable[[np.ndarray, int], list[str]]]:
    """``rank(vector, depth)`` of every method on one library."""
    exact = voting.exact()
    return {
        "popularity": lambda _vector, depth: model.popular[:depth],
        "cluster": model.clusters.rank,
        "knn": lambda vector, depth: model.vote(vector, knn, depth),
        "vote": lambda vector, depth: model.vote(vector, exact, depth),
        "ivf": lambda vector, depth: model.vote(vector, voting, depth),
    }


# Methods whose answers depend on K (scored again for every K of a sweep).
K_DEPENDENT = ("cluster", "ivf")


@dataclass
class BackendResult:
    """One vector-search backend on one split: the ``ivf`` voting over the neighbours it finds
    in the whole library, scored like every method, and per query how it compares with exact
    k-NN (``backends.REFERENCE``)."""

    scores: MethodScores
    recall: np.ndarray  # per query: share of exact's RECALL_DEPTH nearest that it found too
    same_order: np.ndarray  # per query: its top k tags are exact's, in the same order
    same_set: np.ndarray  # per query: its top k tags are exact's, in any order
    build_seconds: float  # loading the library into the engine (and indexing it)


def engine_candidates(engine: VectorSearch, vector: np.ndarray) -> Search:
    """The candidate search voting asks for, answered by ``engine`` over everything it holds
    (``probes`` is an inverted-file notion: HNSW engines search their whole graph)."""

    def candidates(n: int) -> tuple[np.ndarray, np.ndarray]:
        ids, sims = engine.search(vector[None, :], n)
        found = ids[0] >= 0  # padding
        return ids[0][found], sims[0][found]

    return candidates


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row: the share of the ids of ``truth`` (padding -1 aside) that ``found`` holds too."""
    out = np.ones(truth.shape[0])
    for row, (found_row, truth_row) in enumerate(zip(found, truth, strict=True)):
        truth_row = truth_row[truth_row >= 0]
        if truth_row.shape[0]:
            hits = np.intersect1d(found_row[found_row >= 0], truth_row).shape[0]
            out[row] = hits / truth_row.shape[0]
    return out


def evaluate_backends(
    model: LibraryModel,
    queries: ImageSet,
    *,
    k: int,
    voting: core_voting.VoteParams,
    builders: Mapping[str, SearchBuilder],
) -> dict[str, BackendResult]:
    """Score ``ivf``'s voting (``voting`` over the whole library: ``core.voting.vote``, the same
    priors and evidence) with the neighbours each backend finds, and compare each with exact
    k-NN: recall@``RECALL_DEPTH`` of the neighbours, and whether the top ``k`` tags are exact's."""
    if not builders:
        return {}
    assert model.library.vectors is not None and queries.vectors is not None
    whole_library = voting.exact()
    depth = max(k, 3)
    library = model.library.vectors

    def rank_over(engine: VectorSearch) -> Callable[[np.ndarray, int], list[str]]:
        return lambda vector, n: model.vote(
            vector, whole_library, n, engine_candidates(engine, vector)
        )

    with exact_search(library) as reference:
        expected, _seconds = rank_queries(rank_over(reference), queries, depth)
        expected_ids, _sims = reference.search(queries.vectors, RECALL_DEPTH)
    expected_top = [ranking[:k] for ranking in expected]
    results = {}
    for alias, build in builders.items():
        started = time.perf_counter()
        with build(library) as engine:
            build_seconds = time.perf_counter() - started
            rankings, seconds = rank_queries(rank_over(engine), queries, depth)
            found_ids, _sims = engine.search(queries.vectors, RECALL_DEPTH)
        top = [ranking[:k] for ranking in rankings]
        pairs = list(zip(top, expected_top, strict=True))
        results[alias] = BackendResult(
            scores=score_rankings(rankings, truths(queries), k, query_seconds=seconds),
            recall=neighbour_recall(found_ids, expected_ids),
            same_order=np.array([mine == exact for mine, exact in pairs], dtype=bool),
            same_set=np.array([set(mine) == set(exact) for mine, exact in pairs], dtype=bool),
            build_seconds=build_seconds,
        )
    return results


@dataclass
class SplitResult:
    methods: dict[str, MethodScores]
    clusters: int
    sweep: list[dict[str, Any]]  # per K: {"clusters_requested", "clusters", method: scores}
    cluster_seconds: float
    backends: dict[str, BackendResult] = field(default_factory=dict)  # --search, by alias


def evaluate_split(
    library: ImageSet,
    queries: ImageSet,
    *,
    k: int,
    n_clusters: Sequence[int],
    cluster_params: dict[str, Any],
    voting: core_voting.VoteParams,
    search: Mapping[str, SearchBuilder] | None = None,
) -> SplitResult:
    """Score every method on one library/queries split; ``n_clusters[1:]`` is the K sweep;
    ``search``: the vector-search backends to measure against exact (:func:`evaluate_backends`)."""
    started = time.perf_counter()
    clusters = fit_cluster_model(library, n_clusters[0], **cluster_params)
    cluster_seconds = time.perf_counter() - started
    model = LibraryModel.build(library, clusters)
    methods = {
        name: score_method(rank, queries, k) for name, rank in method_rankers(model, voting).items()
    }
    sweep = []
    for wanted in n_clusters[1:]:
        swept = LibraryModel.build(library, fit_cluster_model(library, wanted, **cluster_params))
        rankers = method_rankers(swept, voting)
        sweep.append(
            {
                "clusters_requested": wanted,
                "clusters": swept.clusters.result.k,
                **{name: score_method(rankers[name], queries, k) for name in K_DEPENDENT},
            }
        )
    return SplitResult(
        methods=methods,
        clusters=clusters.result.k,
        sweep=sweep,
        cluster_seconds=cluster_seconds,
        backends=evaluate_backends(model, queries, k=k, voting=voting, builders=search or {}),
    )
