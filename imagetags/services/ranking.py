"""The numeric core of the patent's method, free of the database.

Both the site (``clustering.rebuild_clusters``, ``suggest.suggest``) and the offline evaluation
(``evaluation.py``) call these functions, so what ``evaluate_suggestions`` measures is exactly the
code that serves suggestions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from imagetags.services.vectors import l2_normalize

ALGORITHMS = ("kmeans", "minibatch")


def auto_k(n_vectors: int) -> int:
    """K chosen from the library size when the setting says ``"auto"``.

    About one cluster per 16 images, at least 2 and at most 150 (the patent's example K).
    Measured on feedme-dev with ``evaluate_suggestions --k-sweep`` (docs/quality.md): P@5 of the
    cluster method is flat within ±0.02 for K from 5 to 60 on 485 library images, while the
    number of distinct correct tags grows with K; past ~6 images per cluster the per-cluster
    counts get thin and P@1 drops. K = n/16 keeps ~16 images per cluster: counts stay robust and
    the patent's K = 150 is reached at 2,400 images.
    """
    return max(2, min(150, round(n_vectors / 16)))


def parse_k(value: str) -> int | str:
    """A command-line K: a whole number or ``"auto"`` (argparse ``type=``)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"K must be a whole number or 'auto', not {value!r}") from None


@dataclass
class ClusteringResult:
    centers: np.ndarray  # (k, d) float32, unit length
    labels: np.ndarray  # (n,) int, index into centers
    similarities: np.ndarray  # (n,) float32, cosine similarity to the own centre
    inertia: float  # the k-means objective as the algorithm reported it
    iterations: int
    algorithm: str
    seconds: float
    params: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


def nearest_centers(
    vectors: np.ndarray, centers: np.ndarray, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the most similar centre for each unit vector, and that cosine similarity."""
    n = vectors.shape[0]
    labels = np.empty(n, dtype=np.int64)
    sims = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        block = vectors[start : start + chunk] @ centers.T
        labels[start : start + chunk] = block.argmax(axis=1)
        sims[start : start + chunk] = block[
            np.arange(block.shape[0]), labels[start : start + chunk]
        ]
    return labels, sims


def fit_clusters(
    vectors: np.ndarray,
    k: int,
    *,
    algorithm: str = "minibatch",
    batch_size: int = 10_000,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    init_centers: np.ndarray | None = None,
) -> ClusteringResult:
    """Cluster unit vectors with k-means or mini-batch k-means until the objective converges.

    ``init_centers`` warm-starts from existing centres (the patent's incremental update): one
    initialisation, no k-means++ restarts. Centres are returned L2-normalised, and every vector
    is (re)assigned to its most *cosine*-similar centre, the same rule ``suggest`` uses for a new
    image, so members and queries are placed consistently. Clusters left empty by that rule are
    dropped, so ``result.k`` can be below ``k``.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = vectors.shape[0]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
    if k < 1:
        raise ValueError("K must be at least 1.")
    if n < k:
        raise ValueError(f"Only {n} vectors for K={k} clusters: lower K or add images.")
    if init_centers is not None and init_centers.shape != (k, vectors.shape[1]):
        raise ValueError(
            f"Warm start needs {k}×{vectors.shape[1]} centres, got "
            f"{init_centers.shape[0]}×{init_centers.shape[1]}."
        )
    init = init_centers.astype(np.float32) if init_centers is not None else "k-means++"
    started = time.perf_counter()
    if algorithm == "kmeans":
        model = KMeans(
            n_clusters=k,
            init=init,
            n_init=1 if init_centers is not None else 3,
            max_iter=max_iter,
            tol=tol,
            random_state=seed,
        )
    else:
        model = MiniBatchKMeans(
            n_clusters=k,
            init=init,
            n_init=1 if init_centers is not None else 3,
            batch_size=max(1, min(batch_size, n)),
            max_iter=max_iter,
            tol=tol,
            random_state=seed,
            max_no_improvement=10,
        )
    model.fit(vectors)
    centers = l2_normalize(model.cluster_centers_)
    labels, sims = nearest_centers(vectors, centers)
    used = np.unique(labels)
    if used.shape[0] < centers.shape[0]:
        remap = np.full(centers.shape[0], -1, dtype=np.int64)
        remap[used] = np.arange(used.shape[0])
        centers, labels = centers[used], remap[labels]
    return ClusteringResult(
        centers=np.ascontiguousarray(centers, dtype=np.float32),
        labels=labels,
        similarities=sims,
        inertia=float(model.inertia_),
        iterations=int(model.n_iter_),
        algorithm=algorithm,
        seconds=time.perf_counter() - started,
        params={
            "k_requested": k,
            "batch_size": batch_size if algorithm == "minibatch" else None,
            "max_iter": max_iter,
            "tol": tol,
            "seed": seed,
            "warm_start": init_centers is not None,
        },
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
