"""Offline evaluation of tag suggestions on a throwaway library held in memory.

The library and the queries are read with the import's parser (``library.parse_manifest``),
opened with the upload rules (``images.open_image``), embedded with a real extractor, clustered
with ``ranking.fit_clusters``, counted with ``core.counting.count_tag_frequencies`` and ranked by
every method in ``METHODS``: ``popularity`` (``core.counting.popularity_ranking``), the patent's
``cluster`` (``core.voting.cluster_tags``), exact ``knn`` voting, and the ``VOTING`` setting's
neighbour voting over the whole library (``vote``) or over the inverted file of the nearest
clusters (``ivf``): ``core.voting.vote`` over ``search.exact.ExactSearch``, the functions and the
search that serve the site's suggestions, so the numbers describe the serving code.
Nothing is read from or written to the site's database or media storage; the only file written
is the optional vector cache.

Protocol (docs/quality.md): split by *post* (one hold-out split, or F folds in which every post is
a query once), so the images of one post are never on both sides; images byte-identical to an
earlier one are dropped, as ``import_library`` skips them; query images whose post has no tags are
not scored (counted separately); untagged library images still take part in clustering. Metrics
per method: P@1, P@3, P@k, R@k, the number of *distinct* tags suggested correctly at least once,
and the mean ranking time per query (extraction excluded). ``tune_parameters`` chooses parameters
by cross-validation inside a library only; ``run_tuning`` nests it in the outer folds.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagetags.core import counting
from imagetags.core import voting as core_voting
from imagetags.images import InvalidImage, file_sha256, open_image
from imagetags.search.exact import ExactSearch
from imagetags.services import ranking
from imagetags.services.extractors import FeatureExtractor
from imagetags.services.library import (
    ManifestEntry,
    Rejection,
    group_posts,
    parse_manifest,
    post_tags,
)
from imagetags.services.suggest import METHODS as SERVING_METHODS

# Called with (images embedded so far, images to embed).
Progress = Callable[[int, int], None]


class EvaluationError(Exception):
    """The evaluation cannot run as asked. The message says what to change."""


# --- data ------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Usable images of a manifest, one row per image, with their posts' tags."""

    entries: list[ManifestEntry]
    sha256: list[str]
    posts: list[str]  # post of each image (ManifestEntry.post_group)
    post_tags: dict[str, frozenset[str]]  # only posts that have an image here
    vectors: np.ndarray | None = None  # (n, d) unit rows once embedded
    # Uploader of each post where the manifest names one (Post.external_owner on import).
    owners: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def take(self, indexes: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indexes``, with only their posts' tags."""
        indexes = [int(i) for i in indexes]
        posts = [self.posts[i] for i in indexes]
        return ImageSet(
            entries=[self.entries[i] for i in indexes],
            sha256=[self.sha256[i] for i in indexes],
            posts=posts,
            post_tags={post: self.post_tags[post] for post in dict.fromkeys(posts)},
            vectors=None if self.vectors is None else self.vectors[indexes],
            owners={
                post: self.owners[post] for post in dict.fromkeys(posts) if post in self.owners
            },
        )

    def tags_of(self, index: int) -> frozenset[str]:
        return self.post_tags[self.posts[index]]

    def tagged(self) -> ImageSet:
        """Only the images whose post has tags (the ones a query can be scored on)."""
        return self.take([index for index in range(len(self)) if self.tags_of(index)])


@dataclass
class ReadResult:
    images: ImageSet
    rejected: list[Rejection]  # lines the import would reject
    duplicates: int  # images dropped as byte-identical to an earlier (or excluded) one


def read_image_set(
    manifest: str | os.PathLike, *, exclude_sha256: Collection[str] = ()
) -> ReadResult:
    """Parse a manifest and checksum its images (cheap: nothing is decoded yet).

    An image byte-identical to an earlier one, or to one in ``exclude_sha256``, is dropped, as
    ``import_library`` would skip it.
    """
    entries = parse_manifest(manifest)
    kept: list[ManifestEntry] = []
    sums: list[str] = []
    rejected: list[Rejection] = []
    seen = set(exclude_sha256)
    duplicates = 0
    for entry in entries:
        if not entry.ok:
            rejected.append(Rejection(entry.line, entry.path, "; ".join(entry.errors)))
            continue
        try:
            sha256 = file_sha256(entry.file)
        except OSError as exc:
            rejected.append(Rejection(entry.line, entry.path, f"unreadable ({exc})"))
            continue
        if sha256 in seen:
            duplicates += 1
            continue
        seen.add(sha256)
        kept.append(entry)
        sums.append(sha256)
    # A post's tags are the union over all its valid lines, exactly as the import saves them.
    tags_by_post = {key: frozenset(post_tags(group)) for key, group in group_posts(entries).items()}
    posts = [entry.post_group for entry in kept]
    owners: dict[str, str] = {}
    for entry in entries:  # the first owner named on a post's lines, as the import keeps it
        if entry.ok and entry.owner and entry.post_group not in owners:
            owners[entry.post_group] = entry.owner
    images = ImageSet(
        entries=kept,
        sha256=sums,
        posts=posts,
        post_tags={post: tags_by_post[post] for post in dict.fromkeys(posts)},
        owners={post: owners[post] for post in dict.fromkeys(posts) if post in owners},
    )
    return ReadResult(images=images, rejected=rejected, duplicates=duplicates)


def split_by_post(
    posts: Sequence[str], holdout: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image indexes (library, queries): a seeded random ``holdout`` share of the *posts* are
    queries, so every post lies wholly on one side."""
    if not 0 < holdout < 1:
        raise EvaluationError(f"--holdout must be between 0 and 1 (exclusive), not {holdout}.")
    unique = list(dict.fromkeys(posts))
    if len(unique) < 2:
        raise EvaluationError(
            f"The library has {len(unique)} post(s); a hold-out split needs at least 2."
        )
    n_queries = min(len(unique) - 1, max(1, round(holdout * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    query_posts = {unique[i] for i in order[:n_queries]}
    is_query = np.array([post in query_posts for post in posts], dtype=bool)
    return np.flatnonzero(~is_query), np.flatnonzero(is_query)


# --- embedding -------------------------------------------------------------------------------


class VectorCache:
    """Vectors by image SHA-256 for one extractor key, in ``<dir>/<key slug>-<hash>.npz``.

    Vectors depend only on the file's bytes and the extractor, so repeated runs (seeds, K sweeps)
    skip extraction. The key is stored in the file and checked, so a changed extractor never
    reads another one's vectors.
    """

    def __init__(self, directory: str | os.PathLike, extractor_key: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", extractor_key).strip("-")[:60]
        digest = hashlib.sha256(extractor_key.encode()).hexdigest()[:16]
        self.path = Path(directory) / f"{slug}-{digest}.npz"
        self.key = extractor_key
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["key"]) != self.key:
                    return
                self.vectors = dict(zip(data["sha256"].tolist(), data["vectors"], strict=True))
        except (OSError, ValueError, KeyError):
            self.vectors = {}  # unreadable or old format: rebuild it

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sums = sorted(self.vectors)
        # Per-process temporary name: two sweeps sharing a cache must not write one file.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            key=np.array(self.key),
            sha256=np.array(sums),
            vectors=np.stack([self.vectors[s] for s in sums]).astype(np.float32),
        )
        os.replace(tmp, self.path)  # readers never see half a file
        self.dirty = False


@dataclass
class EmbedResult:
    images: ImageSet  # the images that could be embedded, with ``vectors`` set
    rejected: list[Rejection]  # files ``open_image`` refused
    cache_hits: int


def embed_image_set(
    image_set: ImageSet,
    extractor: FeatureExtractor,
    *,
    cache: VectorCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    full_decode: bool = False,
) -> EmbedResult:
    """Embed every image in batches; images found in ``cache`` are not even decoded.
    ``full_decode``: see :func:`evaluate`."""
    found: dict[int, np.ndarray] = {}
    if cache is not None:
        for index, sha256 in enumerate(image_set.sha256):
            if sha256 in cache.vectors:
                found[index] = cache.vectors[sha256]
    hits = len(found)
    todo = [index for index in range(len(image_set)) if index not in found]
    rejected: list[Rejection] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch: list[int] = []
        images: list[Image.Image] = []
        for index in chunk:
            entry = image_set.entries[index]
            try:
                if full_decode:
                    image, _info = open_image(entry.file)
                else:
                    image = extractor.open_image(entry.file)
            except (InvalidImage, OSError) as exc:
                rejected.append(Rejection(entry.line, entry.path, str(exc)))
                continue
            batch.append(index)
            images.append(_shrunk(image, extractor))
        if batch:
            matrix = extractor.embed_batch(images)
            for index, vector in zip(batch, matrix, strict=True):
                found[index] = vector
                if cache is not None:
                    cache.vectors[image_set.sha256[index]] = vector
                    cache.dirty = True
        if progress is not None:
            progress(start + len(chunk), len(todo))
    keep = sorted(found)
    embedded = image_set.take(keep)
    embedded.vectors = (
        np.stack([found[index] for index in keep]).astype(np.float32)
        if keep
        else np.empty((0, extractor.dim), dtype=np.float32)
    )
    return EmbedResult(images=embedded, rejected=rejected, cache_hits=hits)


def _shrunk(image: Image.Image, extractor: FeatureExtractor) -> Image.Image:
    """The image at model input size, so a batch of large photos is not held at full size.

    ``embed_batch`` prepares it again, a no-op at that size, so the vector is the same
    (``features._decode`` does the same for stored images).
    """
    prepared = extractor.prepare(image)
    if isinstance(prepared, np.ndarray) and prepared.dtype == np.uint8 and prepared.ndim == 3:
        return Image.fromarray(prepared, "RGB")
    return image


# --- scoring ---------------------------------------------------------------------------------


@dataclass
class MethodScores:
    p_at_k: float
    r_at_k: float
    distinct_correct: int
    p_at_1: float
    p_at_3: float
    query_ms: float
    # The tags behind distinct_correct (not reported; pooled over folds).
    correct_tags: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["correct_tags"]
        return data


def score_rankings(
    rankings: Sequence[Sequence[str]],
    truths: Sequence[Collection[str]],
    k: int,
    *,
    query_seconds: float = 0.0,
) -> MethodScores:
    """Precision and recall of ranked tag lists against each query's true tags.

    P@n divides the hits in the top ``n`` by ``n`` (a method that offers fewer than ``n`` tags is
    not rewarded for it); R@k divides them by the number of true tags. ``distinct_correct``
    counts different tags that were a hit in some query's top ``k``: a method that always says
    "food, delicious, ..." scores well on P@5 and poorly here.
    """
    if not rankings or len(rankings) != len(truths):
        raise ValueError("score_rankings needs one ranking per query, and at least one query.")

    def precision(n: int) -> float:
        return float(
            np.mean([len(set(r[:n]) & set(t)) / n for r, t in zip(rankings, truths, strict=True)])
        )

    recall = float(
        np.mean([len(set(r[:k]) & set(t)) / len(t) for r, t in zip(rankings, truths, strict=True)])
    )
    distinct: set[str] = set()
    for ranked, truth in zip(rankings, truths, strict=True):
        distinct.update(set(ranked[:k]) & set(truth))
    return MethodScores(
        p_at_k=precision(k),
        r_at_k=recall,
        distinct_correct=len(distinct),
        p_at_1=precision(1),
        p_at_3=precision(3),
        query_ms=1000.0 * query_seconds / len(rankings),
        correct_tags=frozenset(distinct),
    )


@dataclass
class ClusterModel:
    """The patent's model of a library: centres, and per cluster its post count and tag counts."""

    result: ranking.ClusteringResult
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
    result = ranking.fit_clusters(
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
    from threadpoolctl import threadpool_limits

    assert queries.vectors is not None
    depth = max(k, 3)
    rankings, seconds = [], 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for vector in queries.vectors:
            started = time.perf_counter()
            rankings.append(rank(vector, depth))
            seconds += time.perf_counter() - started
    return score_rankings(rankings, _truths(queries), k, query_seconds=seconds)


def score_popularity(library: ImageSet, queries: ImageSet, k: int) -> MethodScores:
    """The baseline: the library's most common tags (by post count), whatever the image."""
    popular = [str(tag) for tag, _count in counting.popularity_ranking(library.post_tags)]
    return score_method(lambda _vector, depth: popular[:depth], queries, k)


def score_cluster(model: ClusterModel, queries: ImageSet, k: int) -> MethodScores:
    """The patent's method: nearest centre by cosine, that cluster's tags by post frequency."""
    return score_method(model.rank, queries, k)


def _truths(queries: ImageSet) -> list[frozenset[str]]:
    return [queries.tags_of(index) for index in range(len(queries))]


# --- methods ---------------------------------------------------------------------------------

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
class SplitResult:
    methods: dict[str, MethodScores]
    clusters: int
    sweep: list[dict[str, Any]]  # per K: {"clusters_requested", "clusters", method: scores}
    cluster_seconds: float


def evaluate_split(
    library: ImageSet,
    queries: ImageSet,
    *,
    k: int,
    n_clusters: Sequence[int],
    cluster_params: dict[str, Any],
    voting: core_voting.VoteParams,
) -> SplitResult:
    """Score every method on one library/queries split; ``n_clusters[1:]`` is the K sweep."""
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
    )


# --- folds and the tuning protocol -----------------------------------------------------------


def folds_by_post(posts: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every image: posts are dealt round-robin in a seeded random
    order, so folds differ by at most one post and a post's images share one fold."""
    unique = list(dict.fromkeys(posts))
    if folds < 2:
        raise EvaluationError(f"--folds must be at least 2, not {folds}.")
    if len(unique) < folds:
        raise EvaluationError(
            f"The library has {len(unique)} post(s), too few for {folds} folds: use fewer folds."
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[p]: n % folds for n, p in enumerate(order)}
    return np.array([fold_of[post] for post in posts], dtype=np.int64)


def fold_splits(images: ImageSet, folds: int, seed: int) -> list[tuple[ImageSet, ImageSet]]:
    """(library, queries) for each fold: the fold's posts are the queries, the others the library."""
    assignment = folds_by_post(images.posts, folds, seed)
    return [
        (images.take(np.flatnonzero(assignment != f)), images.take(np.flatnonzero(assignment == f)))
        for f in range(folds)
    ]


_METRICS = ("p_at_k", "r_at_k", "distinct_correct", "p_at_1", "p_at_3", "query_ms")


def summarise(per_fold: Sequence[MethodScores]) -> dict[str, Any]:
    """Mean of each metric over folds, its standard deviation under ``"sd"``, and the distinct
    correct tags pooled over all folds' queries under ``"distinct_correct_pooled"``."""
    metrics = _METRICS
    rows = np.array([[getattr(scores, name) for name in metrics] for scores in per_fold], float)
    means = rows.mean(axis=0)
    sd = rows.std(axis=0, ddof=1) if len(per_fold) > 1 else np.zeros(len(metrics))
    out: dict[str, Any] = {name: float(means[i]) for i, name in enumerate(metrics)}
    out["sd"] = {name: float(sd[i]) for i, name in enumerate(metrics)}
    pooled: set[str] = set()
    for scores in per_fold:
        pooled |= scores.correct_tags
    out["distinct_correct_pooled"] = len(pooled)
    return out


# Grids searched by --tune. The rule (docs/quality.md): on the library side of each outer fold,
# 5-fold cross-validation by post; among the settings whose mean P@5 and mean P@1 are within one
# standard error of the best, take the one with the most distinct correct tags (the first in the
# grid on a tie). Probes: the fewest whose mean P@5 is within PROBE_TOLERANCE of exact voting.
KNN_GRID = [5, 10, 15, 20, 30, 50]
VOTE_GRID = [
    core_voting.VoteParams(neighbours=n, temperature=t, vote_by=by, prior_weight=w, probes=None)
    for n in (10, 20, 30, 50)
    for t in (None, 0.1, 0.05, 0.02)
    for by in ("post", "owner")
    for w in (0.0, 0.1, 0.2, 0.3)
]
PROBES_GRID = [1, 2, 3, 4, 6, 8, 12]
PROBE_TOLERANCE = 0.005
INNER_FOLDS = 5


def choose_one_se(candidates: Sequence[Any], per_fold: Sequence[Sequence[MethodScores]]) -> int:
    """Index of the candidate the one-standard-error rule picks (see the grids above)."""

    def stats(metric: str) -> tuple[np.ndarray, np.ndarray]:
        values = np.array([[getattr(s, metric) for s in folds] for folds in per_fold], float)
        se = values.std(axis=1, ddof=1) / np.sqrt(values.shape[1])
        return values.mean(axis=1), se

    p5, p5_se = stats("p_at_k")
    p1, p1_se = stats("p_at_1")
    distinct, _se = stats("distinct_correct")
    best5, best1 = int(p5.argmax()), int(p1.argmax())
    eligible = (p5 >= p5[best5] - p5_se[best5] - 1e-12) & (p1 >= p1[best1] - p1_se[best1] - 1e-12)
    ranked = sorted(np.flatnonzero(eligible), key=lambda i: (-distinct[i], i))
    return int(ranked[0])


def _cached_search(search: Search, cap: int) -> Search:
    """``search`` run once for ``cap`` candidates; smaller requests are slices of that."""
    ids, sims = search(cap)

    def cached(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (ids[:n], sims[:n]) if n <= cap else search(n)

    return cached


def _score_votes(
    model: LibraryModel,
    test: ImageSet,
    params: core_voting.VoteParams,
    k: int,
    searches: Sequence[Search] | None = None,
) -> MethodScores:
    ranks = [
        model.vote(vector, params, max(k, 3), searches[q] if searches else None)
        for q, vector in enumerate(test.vectors)
    ]
    return score_rankings(ranks, _truths(test), k)


def tune_parameters(
    library: ImageSet,
    *,
    k: int,
    n_clusters: int | str,
    cluster_params: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Choose the methods' parameters by cross-validation inside ``library`` only (never looking
    at the outer queries): returns the chosen ``knn`` neighbours, ``vote`` parameters and
    ``probes``, with the inner means behind each choice."""
    # Inner folds whose queries have no tags cannot be scored (tiny libraries): leave them out.
    inner = [
        (train, test)
        for train, test in fold_splits(library, min(INNER_FOLDS, len(set(library.posts))), seed)
        if len(test.tagged())
    ]
    if len(inner) < 2:
        raise EvaluationError(
            f"A library of {len(library)} images is too small to tune in: --tune needs at "
            "least two inner folds with tagged images. Give a larger library or leave out --tune."
        )
    knn_scores: list[list[MethodScores]] = [[] for _ in KNN_GRID]
    vote_scores: list[list[MethodScores]] = [[] for _ in VOTE_GRID]
    models = []
    cap = 4 * max(max(KNN_GRID), max(p.neighbours for p in VOTE_GRID))
    for train, test in inner:
        test = test.tagged()
        wanted = resolve_clusters(n_clusters, len(train))
        model = LibraryModel.build(train, fit_cluster_model(train, wanted, **cluster_params))
        models.append((model, test))
        # One exact search per query serves every grid point (smaller requests are slices).
        searches = [
            _cached_search(model.search(vector, None), min(cap, len(train)))
            for vector in test.vectors
        ]
        for n, scores in zip(KNN_GRID, knn_scores, strict=True):
            scores.append(_score_votes(model, test, replace(KNN, neighbours=n), k, searches))
        for params, scores in zip(VOTE_GRID, vote_scores, strict=True):
            scores.append(_score_votes(model, test, params, k, searches))
    knn_n = KNN_GRID[choose_one_se(KNN_GRID, knn_scores)]
    vote_index = choose_one_se(VOTE_GRID, vote_scores)
    vote = VOTE_GRID[vote_index]
    exact_p5 = float(np.mean([s.p_at_k for s in vote_scores[vote_index]]))
    probes_p5: dict[int, float] = {}
    probes = PROBES_GRID[-1]
    for m in PROBES_GRID:
        params = replace(vote, probes=m)
        values = []
        for model, test in models:
            values.append(_score_votes(model, test, params, k).p_at_k)
        probes_p5[m] = float(np.mean(values))
        if probes_p5[m] >= exact_p5 - PROBE_TOLERANCE:
            probes = m
            break

    def means(scores: Sequence[MethodScores]) -> dict[str, float]:
        return {
            "p_at_k": float(np.mean([s.p_at_k for s in scores])),
            "p_at_1": float(np.mean([s.p_at_1 for s in scores])),
            "distinct_correct": float(np.mean([s.distinct_correct for s in scores])),
        }

    return {
        "knn": {"neighbours": knn_n, "inner": means(knn_scores[KNN_GRID.index(knn_n)])},
        "vote": {**asdict(vote), "inner": means(vote_scores[vote_index])},
        "probes": {"probes": probes, "inner_p_at_k": probes_p5, "exact_p_at_k": exact_p5},
    }


def run_tuning(
    splits: Sequence[tuple[ImageSet, ImageSet]],
    *,
    k: int,
    n_clusters: int | str,
    cluster_params: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Nested cross-validation: parameters chosen inside each outer fold's library, then scored
    on that fold's queries. The outer means are an honest estimate of the tuned methods."""
    folds_out = []
    outer: dict[str, list[MethodScores]] = {}
    for number, (library, queries) in enumerate(splits):
        chosen = tune_parameters(
            library, k=k, n_clusters=n_clusters, cluster_params=cluster_params, seed=seed
        )
        vote = core_voting.VoteParams(
            **{key: chosen["vote"][key] for key in core_voting.VoteParams.__dataclass_fields__}
        )
        model = LibraryModel.build(
            library,
            fit_cluster_model(
                library, resolve_clusters(n_clusters, len(library)), **cluster_params
            ),
        )
        rankers = method_rankers(
            model,
            replace(vote, probes=chosen["probes"]["probes"]),
            knn=replace(KNN, neighbours=chosen["knn"]["neighbours"]),
        )
        scored = queries.tagged()
        fold_scores = {name: score_method(rank, scored, k) for name, rank in rankers.items()}
        for name, scores in fold_scores.items():
            outer.setdefault(name, []).append(scores)
        folds_out.append(
            {
                "fold": number,
                "chosen": chosen,
                "outer": {name: scores.as_dict() for name, scores in fold_scores.items()},
            }
        )
    return {
        "rule": "inner 5-fold CV by post on each outer library; within one standard error of "
        "the best mean P@5 and P@1, the most distinct correct tags; probes: fewest within "
        f"{PROBE_TOLERANCE} P@5 of exact voting",
        "folds": folds_out,
        "outer": {name: summarise(scores) for name, scores in outer.items()},
    }


# --- the whole run ---------------------------------------------------------------------------


def resolve_clusters(clusters: int | str, n_library: int) -> int:
    """K as asked: a number, or ``"auto"`` (``ranking.auto_k`` of the library size)."""
    if clusters == "auto":
        return ranking.auto_k(n_library)
    try:
        value = int(clusters)
    except (TypeError, ValueError):
        raise EvaluationError(
            f"--clusters must be a whole number or 'auto', not {clusters!r}."
        ) from None
    if value < 1:
        raise EvaluationError(f"--clusters must be at least 1, not {value}.")
    return value


def run_evaluation(
    library_manifest: str | os.PathLike,
    *,
    extractor: FeatureExtractor,
    queries_manifest: str | os.PathLike | None = None,
    holdout: float | None = None,
    folds: int | None = None,
    k: int = 5,
    clusters: int | str | None = None,
    algorithm: str | None = None,
    seed: int = 0,
    k_sweep: Sequence[int | str] = (),
    tune: bool = False,
    voting: core_voting.VoteParams | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    full_decode: bool = False,
) -> dict[str, Any]:
    """Build a throwaway library and score every method (``METHODS``) on the queries.

    Queries come from ``queries_manifest``; or, with ``holdout``, from a seeded split of the
    library's posts; or, with ``folds``, every post is a query once (F-fold by post, the scores
    are means over folds with their standard deviations under ``"sd"``). ``seed`` drives the
    split and the clustering. ``clusters``, ``algorithm`` and the clustering parameters default
    to ``IMAGETAGS['CLUSTERING']``; ``voting`` (the ``vote`` and ``ivf`` methods) to
    ``IMAGETAGS['VOTING']``. ``k_sweep`` also scores the K-dependent methods for each K listed.
    ``tune`` (with ``folds``) adds the nested cross-validation of the methods' parameters.
    ``full_decode`` decodes JPEGs in full instead of at the model's scale (what every serving
    path does, ``FeatureExtractor.open_image``): it measures what that decoding changes.

    Returns the report ``evaluate_suggestions --json`` prints. Raises :class:`EvaluationError`
    before any extraction when the request cannot give a result.
    """
    from imagetags.conf import imagetags_settings

    started = time.perf_counter()
    sources = [value is not None for value in (queries_manifest, holdout, folds)]
    if sum(sources) != 1:
        raise EvaluationError(
            "Give exactly one source of queries: --queries Q.jsonl (a separate manifest), "
            "--holdout F (hold out that share of the library's posts, e.g. --holdout 0.3) or "
            "--folds N (every post a query once, e.g. --folds 5)."
        )
    if holdout is not None and not 0 < holdout < 1:
        raise EvaluationError(
            f"--holdout must be between 0 and 1 (exclusive), not {holdout}; e.g. --holdout 0.3."
        )
    if tune and folds is None:
        raise EvaluationError("--tune needs --folds (e.g. --folds 5): it is cross-validation.")
    if k < 1:
        raise EvaluationError(f"--k must be at least 1, not {k}.")
    defaults = imagetags_settings.CLUSTERING
    clusters = defaults["K"] if clusters is None else clusters
    algorithm = algorithm or defaults["ALGORITHM"]
    if algorithm not in ranking.ALGORITHMS:
        raise EvaluationError(
            f"Unknown algorithm {algorithm!r}: choose {' or '.join(ranking.ALGORITHMS)}."
        )
    try:
        voting = voting or core_voting.VoteParams.from_setting(imagetags_settings.VOTING)
    except ValueError as exc:
        raise EvaluationError(f"IMAGETAGS['VOTING'] is not usable: {exc}") from None
    batch_size = batch_size or imagetags_settings.BATCH_SIZE

    read = read_image_set(library_manifest)
    rejected = _labelled(library_manifest, read.rejected)
    duplicates = read.duplicates
    to_embed: list[tuple[ImageSet, str | os.PathLike]]
    if folds is not None:
        assignment = folds_by_post(read.images.posts, folds, seed)
        smallest = min(int((assignment != f).sum()) for f in range(folds))
        to_embed = [(read.images, library_manifest)]
        split: dict[str, Any] = {"folds": folds, "seed": seed}
        check_library = read.images.take(np.flatnonzero(assignment != 0)[:smallest])
        check_queries = read.images
    elif holdout is not None:
        library_idx, query_idx = split_by_post(read.images.posts, holdout, seed)
        library, queries = read.images.take(library_idx), read.images.take(query_idx)
        to_embed = [(library, library_manifest), (queries, library_manifest)]
        split = {"holdout": holdout, "seed": seed}
        check_library, check_queries = library, queries
    else:
        library = read.images
        # A query that is also in the library would find its own vector: drop it like a duplicate.
        query_read = read_image_set(queries_manifest, exclude_sha256=set(library.sha256))
        queries = query_read.images
        rejected += _labelled(queries_manifest, query_read.rejected)
        duplicates += query_read.duplicates
        to_embed = [(library, library_manifest), (queries, queries_manifest)]
        split = {"queries": str(queries_manifest)}
        check_library, check_queries = library, queries

    wanted_of = lambda n_library: [  # noqa: E731
        resolve_clusters(value, n_library) for value in [clusters, *k_sweep]
    ]
    _check_sizes(check_library, check_queries, wanted_of(len(check_library)))

    extract_started = time.perf_counter()
    # The decoding is part of what made a vector: the two kinds never share a cache file.
    decoding = "full-decode" if full_decode else "model-scale-decode"
    cache = VectorCache(cache_dir, f"{extractor.key}|{decoding}") if cache_dir else None
    if cache is not None:
        cache.load()
    cache_hits = 0
    embedded: list[ImageSet] = []
    # One progress count over every set: images still to embed (cached ones are not).
    todo = [
        sum(1 for sha256 in image_set.sha256 if cache is None or sha256 not in cache.vectors)
        for image_set, _source in to_embed
    ]
    offset = 0
    for (image_set, source), count in zip(to_embed, todo, strict=True):

        def report_progress(done: int, _total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, sum(todo))

        result = embed_image_set(
            image_set,
            extractor,
            cache=cache,
            batch_size=batch_size,
            progress=report_progress,
            full_decode=full_decode,
        )
        embedded.append(result.images)
        rejected += _labelled(source, result.rejected)
        offset += count
        cache_hits += result.cache_hits
    if cache is not None:
        cache.save()
    extract_seconds = time.perf_counter() - extract_started

    if folds is not None:
        splits = fold_splits(embedded[0], folds, seed)
    else:
        splits = [(embedded[0], embedded[1])]
    for library, queries in splits:  # again: undecodable files may have been dropped
        _check_sizes(library, queries, wanted_of(len(library)))

    cluster_params = {
        "algorithm": algorithm,
        "seed": seed,
        "batch_size": defaults["BATCH_SIZE"],
        "max_iter": defaults["MAX_ITER"],
        "tol": defaults["TOL"],
    }
    results = [
        evaluate_split(
            library,
            queries.tagged(),
            k=k,
            n_clusters=wanted_of(len(library)),
            cluster_params=cluster_params,
            voting=voting,
        )
        for library, queries in splits
    ]
    libraries = [library for library, _queries in splits]
    scored = [queries.tagged() for _library, queries in splits]
    if folds is None:
        methods = {name: scores.as_dict() for name, scores in results[0].methods.items()}
    else:
        methods = {
            name: summarise([result.methods[name] for result in results])
            for name in results[0].methods
        }
    report: dict[str, Any] = {
        "k": k,
        "library": round(float(np.mean([len(library) for library in libraries]))),
        "queries": sum(len(queries) for queries in scored),
        "default": suggest_method(),
        "methods": methods,
        "unscored_queries": sum(len(q) for _l, q in splits) - sum(len(q) for q in scored),
        "library_posts": round(float(np.mean([len(library.post_tags) for library in libraries]))),
        "query_posts": sum(len(queries.post_tags) for queries in scored),
        "split": split,
        "extractor": extractor.key,
        "clusters": results[0].clusters,
        "clusters_requested": wanted_of(len(libraries[0]))[0],
        "algorithm": algorithm,
        "seed": seed,
        "voting": asdict(voting),
        "knn": asdict(KNN),
        "rejected": rejected,
        "duplicates_dropped": duplicates,
        "vectors_from_cache": cache_hits,
    }
    if folds is not None:
        report["per_fold"] = [
            {
                "library": len(library),
                "queries": len(queries),
                "clusters": result.clusters,
                "methods": {name: scores.as_dict() for name, scores in result.methods.items()},
            }
            for library, queries, result in zip(libraries, scored, results, strict=True)
        ]
    if k_sweep:
        report["k_sweep"] = []
        for row, _wanted in enumerate(k_sweep):
            rows = [result.sweep[row] for result in results]
            entry: dict[str, Any] = {
                "clusters_requested": rows[0]["clusters_requested"],
                "clusters": round(float(np.mean([r["clusters"] for r in rows]))),
            }
            for name in K_DEPENDENT:
                entry[name] = (
                    rows[0][name].as_dict() if folds is None else summarise([r[name] for r in rows])
                )
            # The cluster method's figures also at the top level, as before the other methods.
            entry.update(
                {
                    key: entry["cluster"][key]
                    for key in MethodScores.__dataclass_fields__
                    if key != "correct_tags"
                }
            )
            report["k_sweep"].append(entry)
    if tune:
        report["tune"] = run_tuning(
            splits, k=k, n_clusters=clusters, cluster_params=cluster_params, seed=seed
        )
    report["seconds"] = {
        "extract": round(extract_seconds, 3),
        "cluster": round(sum(result.cluster_seconds for result in results), 3),
        "total": round(time.perf_counter() - started, 3),
    }
    return report


def suggest_method() -> str:
    """The method ``suggest()`` serves (``IMAGETAGS['SUGGEST_METHOD']``)."""
    from imagetags.services.suggest import suggest_method as configured

    return configured()


# --- acceptance of real suggestions ----------------------------------------------------------


def feedback_report(*, top: int | None = None) -> dict[str, Any]:
    """Acceptance of the suggestions people were shown (``SuggestionFeedback``): overall, per
    channel, per method that made them, and per tag (most shown first; ``top`` limits the tags).

    The counting is ``services.feedback.acceptance_stats``, the same figures the admin shows.
    """
    from imagetags.models import SuggestionFeedback
    from imagetags.services.feedback import acceptance_stats

    stats = acceptance_stats()
    data = stats.as_dict()
    if top is not None:
        data["per_tag"] = dict(list(data["per_tag"].items())[:top])
    methods = SuggestionFeedback.objects.order_by().values_list("method", flat=True).distinct()
    data["per_method"] = {
        (method or "(unrecorded)"): acceptance_stats(method=method).overall.as_dict()
        for method in sorted(methods)
    }
    data["tags"] = len(stats.per_tag)
    return data


def _labelled(manifest: str | os.PathLike, rejections: list[Rejection]) -> list[str]:
    name = Path(manifest).name
    return [f"{name} {rejection}" for rejection in rejections]


def _check_sizes(library: ImageSet, queries: ImageSet, wanted: Sequence[int]) -> None:
    largest = max(wanted)
    if len(library) < largest:
        raise EvaluationError(
            f"The library has {len(library)} usable images, too few for K={largest} clusters: "
            "lower --clusters (or use --clusters auto), shorten --k-sweep, use a smaller "
            "--holdout, or give a larger library."
        )
    if not len(queries.tagged()):
        raise EvaluationError(
            f"None of the {len(queries)} query images has tags, so nothing can be scored: give "
            "queries whose lines (or posts) carry tags."
        )
