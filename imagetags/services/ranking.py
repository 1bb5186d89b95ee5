"""The numeric core of the patent's method, free of the database.

Both the site (``clustering.rebuild_clusters``, ``suggest.suggest``) and the offline evaluation
(``evaluation.py``) call these functions, so what ``evaluate_suggestions`` measures is exactly the
code that serves suggestions.
"""

from __future__ import annotations

import time
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


# The counting and voting core moved to imagetags.core (counting, voting, vectors) and the
# inverted file to imagetags.search.exact; re-exported for the callers not moved yet. Shim of
# issue 11: the lead removes it with ranking.py.
from imagetags.core.counting import (  # noqa: E402
    count_tag_frequencies,
    popularity_ranking,
    prior_shares,
)
from imagetags.core.vectors import (  # noqa: E402
    BFLOAT16,
    block_similarities,
    from_bfloat16,
    to_bfloat16,
)
from imagetags.core.voting import (  # noqa: E402
    MIN_SHARE,
    VOTE_BY,
    NeighbourVotes,
    RankedTag,
    VotedTag,
    VoteParams,
    first_voters,
    nearest_voters,
    neighbour_votes,
    rank_cluster_tags,
    rank_votes,
    voter_of,
    voting_evidence,
)
from imagetags.search.exact import nearest_lists, top_order  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "BFLOAT16",
    "MIN_SHARE",
    "VOTE_BY",
    "ClusteringResult",
    "NeighbourVotes",
    "RankedTag",
    "VoteParams",
    "VotedTag",
    "auto_k",
    "block_similarities",
    "count_tag_frequencies",
    "first_voters",
    "fit_clusters",
    "from_bfloat16",
    "nearest_centers",
    "nearest_lists",
    "nearest_voters",
    "neighbour_votes",
    "parse_k",
    "popularity_ranking",
    "prior_shares",
    "rank_cluster_tags",
    "rank_votes",
    "to_bfloat16",
    "top_order",
    "voter_of",
    "voting_evidence",
]
