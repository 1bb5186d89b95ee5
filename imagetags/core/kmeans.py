"""One spherical k-means: unit vectors, unit centres, assignment by cosine similarity.

Suggestions place a new image on the centre it is most *cosine*-similar to, so the clustering
optimises exactly that: every step assigns rows by their largest dot product with the unit
centres and puts each centre back on the unit sphere. Two ways to run it, one estimator:

- ``fit(matrix)``: full-batch (Lloyd) spherical k-means, best of ``n_init`` k-means++ starts
  (the ``"kmeans"`` algorithm).
- ``partial_fit(chunk)``: one mini-batch step (each centre moves to the running mean of the rows
  it was given, weighted by how many it has seen, then back to unit length).
  ``fit_minibatch(n, read)`` runs epochs of such steps over random chunks until the mean cosine
  stops improving (the ``"minibatch"`` algorithm). ``read`` returns the rows at given positions:
  a slice of an array in memory (:func:`fit_clusters`), or a database read when the library does
  not fit in memory (``services.rebuild``) — the same steps either way.

NumPy and scikit-learn (its k-means++ seeding) only: no Django, nothing else from imagetags.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from imagetags.core.vectors import l2_normalize

ALGORITHMS = ("kmeans", "minibatch")

# An epoch whose mean cosine to the nearest centre improved by less than this share ends a
# mini-batch fit. Measured on a synthetic 10,000 × 512-d library (bench/rebuild_worker.py):
# 0.372, 0.429, 0.435, 0.438, 0.439 ... after epochs 1-5; a full-batch fit reaches 0.436.
STREAM_MIN_IMPROVEMENT = 1e-2
STREAM_MAX_EPOCHS = 20
# Restarts of the k-means++ seeding (the best seeds are kept) and of a full-batch fit.
N_INIT = 3
# Wider vectors are seeded in a random projection of this many dimensions (see seed_centers).
SEED_PROJECTION_DIM = 256
# Full-batch k-means++ picks its seeds among at most this many rows (a random sample beyond).
SEED_MAX_ROWS = 30_000
# Lloyd iterations on the seeding sample before mini-batch steps (see SphericalKMeans.seed_from).
SEED_LLOYD_ITERATIONS = 10
# A centre that has seen fewer rows than this share of the busiest centre's is moved onto a
# random row of the current chunk (scikit-learn's MiniBatchKMeans default), so that a centre
# seeded in an empty region does not stay empty.
REASSIGNMENT_RATIO = 0.01
# Rows per block of a matrix product, so that (block, K) similarities stay small.
_BLOCK_ROWS = 8192


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
    inertia: float  # sum of squared distances to the own centre (2 - 2 cos for unit vectors)
    iterations: int  # Lloyd iterations, or mini-batch epochs
    algorithm: str
    seconds: float
    params: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


def nearest_centers(
    vectors: np.ndarray, centers: np.ndarray, chunk: int = _BLOCK_ROWS
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


def drop_empty_clusters(centers: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres that no row is nearest to are removed and the labels renumbered (in order)."""
    used = np.unique(labels)
    if used.shape[0] == centers.shape[0]:
        return centers, labels
    remap = np.full(centers.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    return centers[used], remap[labels]


def seed_centers(sample: np.ndarray, k: int, seed: int, restarts: int = N_INIT) -> np.ndarray:
    """k-means++ seeds chosen among the sample's rows, best of ``restarts`` tries.

    Wide vectors (``flatten``: 100,352-d) are seeded in a random projection to
    :data:`SEED_PROJECTION_DIM` dimensions, which keeps distances within a few per cent
    (Johnson-Lindenstrauss) and costs one pass instead of K: k-means++ on 1,337 flatten vectors
    took 67 s per restart in full dimension, under a second projected. The seeds are the chosen
    rows themselves, in full dimension.
    """
    return sample[_seed_indexes(_seeding_space(sample, seed), k, seed, restarts)]


def _seed_indexes(space: np.ndarray, k: int, seed: int, restarts: int) -> np.ndarray:
    """Rows of ``space`` that k-means++ picks, best (lowest inertia) of ``restarts`` tries."""
    from sklearn.cluster import kmeans_plusplus

    # In float64: scikit-learn computes float32 distances in float64 block by block, and
    # k-means++ with K=150 on 10,000 512-d rows took 19.7 s that way, 0.75 s on a float64 copy.
    space = np.asarray(space, dtype=np.float64)
    best, chosen = np.inf, None
    for restart in range(restarts):
        centers, indexes = kmeans_plusplus(space, k, random_state=seed + restart)
        inertia = _inertia(space, centers)
        if inertia < best:
            best, chosen = inertia, indexes
    return chosen


def _seeding_space(sample: np.ndarray, seed: int) -> np.ndarray:
    if sample.shape[1] > 4 * SEED_PROJECTION_DIM:
        return _random_projection(sample, SEED_PROJECTION_DIM, seed)
    return sample


def _random_projection(matrix: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """``matrix`` times a seeded Gaussian (d, dim) matrix / sqrt(dim), built block by block."""
    rng = np.random.default_rng(seed)
    out = np.zeros((matrix.shape[0], dim), dtype=np.float32)
    for start in range(0, matrix.shape[1], _BLOCK_ROWS):
        block = matrix[:, start : start + _BLOCK_ROWS]
        out += block @ rng.standard_normal((block.shape[1], dim), dtype=np.float32)
    out /= np.float32(np.sqrt(dim))
    return out


def _inertia(matrix: np.ndarray, centers: np.ndarray) -> float:
    """Sum of squared Euclidean distances to the nearest centre (any vectors, not only unit)."""
    center_norms = np.einsum("ij,ij->i", centers, centers)
    total = 0.0
    for start in range(0, len(matrix), 4096):
        block = matrix[start : start + 4096]
        distances = np.einsum("ij,ij->i", block, block)[:, None] - 2 * block @ centers.T
        total += float(np.maximum(distances + center_norms, 0).min(axis=1).sum())
    return total


def _mean_best_similarity(matrix: np.ndarray, centers: np.ndarray) -> float:
    """Mean cosine of unit rows to their most similar unit centre (chunked)."""
    total = 0.0
    for start in range(0, len(matrix), 4096):
        total += float((matrix[start : start + 4096] @ centers.T).max(axis=1).sum())
    return total / max(len(matrix), 1)


def _normalize_rows(centers: np.ndarray) -> None:
    """Centres back on the unit sphere, in place (an all-zero row stays zero)."""
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    np.divide(centers, norms, out=centers, where=norms > 0)


def _as_rows(matrix: np.ndarray, dim: int | None = None) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-d array of row vectors, got shape {matrix.shape}.")
    if dim is not None and matrix.shape[1] != dim:
        raise ValueError(f"Expected {dim}-d rows, got {matrix.shape[1]}-d.")
    return matrix


class SphericalKMeans:
    """k-means on the unit sphere, with scikit-learn's estimator shape.

    ``init``: (K, d) centres to start from (a warm start: no seeding, no restarts). Otherwise
    ``fit`` seeds each of ``n_init`` restarts with k-means++ on the whole matrix, and
    ``fit_minibatch`` / a first ``partial_fit`` seed once, with the best of ``n_init`` k-means++
    tries on a sample refined by Lloyd iterations on it (see :meth:`seed_from`). ``seed`` makes every random choice (seeding, chunk order, reassignments)
    repeatable: the same seed and rows in the same order give the same centres.

    After fitting: ``cluster_centers_`` (K, d) float32 unit rows, ``n_iter_`` (Lloyd iterations
    or mini-batch epochs), ``counts_`` (rows each centre has seen, mini-batch only).
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        init: np.ndarray | None = None,
        n_init: int = N_INIT,
        max_iter: int = 300,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        if n_clusters < 1:
            raise ValueError("K must be at least 1.")
        if init is not None and np.asarray(init).shape[0] != n_clusters:
            raise ValueError(f"Warm start needs {n_clusters} centres, got {len(init)}.")
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.n_iter_ = 0
        self._rng = np.random.default_rng(seed)
        self._since_reassign = 0
        if init is not None:
            self._start(l2_normalize(init))

    # --- state ---------------------------------------------------------------------------

    def _start(self, centers: np.ndarray) -> None:
        self.cluster_centers_ = np.array(centers, dtype=np.float32, order="C", copy=True)
        self.counts_ = np.zeros(self.n_clusters, dtype=np.float64)

    @property
    def fitted(self) -> bool:
        return hasattr(self, "cluster_centers_")

    def seed_from(self, sample: np.ndarray) -> Self:
        """Centres to step from (unless warm-started): k-means++ on ``sample``, then a few
        Lloyd iterations on it.

        k-means++ picks single rows, noisy stand-ins for their clusters; mini-batch steps, whose
        step size shrinks as a centre sees rows, then often leave two centres in one group and
        one centre on two. Refined on the sample first, a mini-batch fit ends within ~0.01 of
        full-batch k-means' mean cosine on planted groups (up to 0.04 below without it), and a
        sample that holds the whole library (up to three batches) makes it full-batch k-means
        followed by a few mini-batch epochs. Wide vectors are refined in the seeding projection
        (see :func:`seed_centers`); the centres are then the means of the full rows.
        """
        if self.fitted:
            return self
        sample = _as_rows(sample)
        k = self.n_clusters
        if sample.shape[0] < k:
            raise ValueError(f"Only {sample.shape[0]} vectors for K={k} clusters.")
        space = _seeding_space(sample, self.seed)
        chosen = _seed_indexes(space, k, self.seed, self.n_init)
        tol = self.tol * _mean_variance(space)
        centers, _objective, _iterations = _lloyd(space, space[chosen], SEED_LLOYD_ITERATIONS, tol)
        labels, _sims = nearest_centers(space, centers)
        sums = _sums_by_label(sample, labels, k)
        empty = np.bincount(labels, minlength=k) == 0
        sums[empty] = sample[chosen[empty]]
        self._start(l2_normalize(sums))
        return self

    # --- mini-batch ----------------------------------------------------------------------

    def partial_fit(self, chunk: np.ndarray) -> Self:
        """One mini-batch step on ``chunk`` (unit rows); seeds from it on the first call."""
        self._step(_as_rows(chunk, self._dim()))
        return self

    def _dim(self) -> int | None:
        return self.cluster_centers_.shape[1] if self.fitted else None

    def _step(self, chunk: np.ndarray) -> float:
        """One mini-batch step; returns the sum of the chunk's cosines to its nearest centre
        *before* the step (the objective, at no extra cost)."""
        if len(chunk) == 0:
            return 0.0
        self.seed_from(chunk)
        centers, counts = self.cluster_centers_, self.counts_
        labels, sims = nearest_centers(chunk, centers)
        sums = _sums_by_label(chunk, labels, self.n_clusters)
        hits = np.bincount(labels, minlength=self.n_clusters).astype(np.float64)
        moved = hits > 0
        # Each centre becomes the mean of every row it has been given so far (a learning rate
        # of 1 / rows seen), then goes back on the unit sphere: Euclidean mini-batch steps on
        # unit vectors let a centre shrink toward the origin and swallow every image that has no
        # close centre (measured: mean cosine to the centre 0.23 instead of 0.43).
        updated = centers[moved] * counts[moved, None] + sums[moved]
        counts += hits
        centers[moved] = updated / counts[moved, None]
        self._reassign_starved(chunk)
        _normalize_rows(centers)
        return float(sims.sum(dtype=np.float64))

    def _reassign_starved(self, chunk: np.ndarray) -> None:
        """Move centres that have seen almost nothing onto random rows of the chunk (as
        scikit-learn's MiniBatchKMeans does, every ~10 K rows or while a centre is unused)."""
        counts = self.counts_
        self._since_reassign += len(chunk)
        if not ((counts == 0).any() or self._since_reassign >= 10 * self.n_clusters):
            return
        self._since_reassign = 0
        starved = counts < REASSIGNMENT_RATIO * counts.max()
        if starved.sum() > 0.5 * len(chunk):  # never more than half the chunk's rows
            starved[np.argsort(counts, kind="stable")[int(0.5 * len(chunk)) :]] = False
        n_starved = int(starved.sum())
        if n_starved:
            rows = self._rng.choice(len(chunk), size=n_starved, replace=False)
            self.cluster_centers_[starved] = chunk[rows]
            counts[starved] = counts[~starved].min()

    def fit_minibatch(
        self,
        n: int,
        read: Callable[[np.ndarray], np.ndarray],
        *,
        batch_size: int,
        sample_size: int | None = None,
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> Self:
        """Mini-batch spherical k-means over ``n`` rows that ``read(positions)`` returns.

        ``read`` gets sorted positions in ``range(n)`` and returns those rows (fewer when some
        vanished, e.g. deleted meanwhile). Seeds: k-means++ on a random sample of
        ``sample_size`` rows (default: three batches, as MiniBatchKMeans' init size). Then epochs
        over the rows in a random order, ``batch_size`` at a time, until an epoch's mean cosine
        to the nearest centre (measured before each step) improves by less than
        :data:`STREAM_MIN_IMPROVEMENT`, or after ``min(max_iter, STREAM_MAX_EPOCHS)`` epochs.
        ``on_epoch(epoch, mean_cosine)`` is called after each.
        """
        if not self.fitted:
            size = 3 * batch_size if sample_size is None else sample_size
            size = min(n, max(3 * self.n_clusters, size))
            self.seed_from(read(np.sort(self._rng.choice(n, size, replace=False))))
        batch_size = max(1, batch_size)
        previous = -np.inf
        epochs = 0
        for epochs in range(1, min(self.max_iter, STREAM_MAX_EPOCHS) + 1):
            order = self._rng.permutation(n)
            total, seen = 0.0, 0
            for start in range(0, n, batch_size):
                chunk = _as_rows(read(np.sort(order[start : start + batch_size])), self._dim())
                total += self._step(chunk)
                seen += len(chunk)
            mean = total / seen if seen else -np.inf
            if on_epoch:
                on_epoch(epochs, mean)
            if not seen or mean - previous < STREAM_MIN_IMPROVEMENT * abs(mean):
                break
            previous = mean
        self.n_iter_ = epochs
        return self

    # --- full batch ----------------------------------------------------------------------

    def fit(self, matrix: np.ndarray) -> Self:
        """Full-batch spherical k-means (Lloyd): assign by cosine, centre = normalised sum,
        until no row changes centre or the centres move less than ``tol`` (relative to the
        data's variance, as scikit-learn's KMeans). Best of ``n_init`` k-means++ starts unless
        warm-started."""
        matrix = _as_rows(matrix, self._dim())
        if matrix.shape[0] < self.n_clusters:
            raise ValueError(f"Only {matrix.shape[0]} vectors for K={self.n_clusters} clusters.")
        tol = self.tol * _mean_variance(matrix)
        if self.fitted:
            starts = [self.cluster_centers_]
        else:
            from sklearn.cluster import kmeans_plusplus

            # k-means++ candidates come from at most SEED_MAX_ROWS rows (all of them, for most
            # libraries), so that its float64 copy (see _seed_indexes) stays small.
            rows = np.arange(len(matrix))
            if len(rows) > SEED_MAX_ROWS:
                pick = np.random.default_rng(self.seed).choice(len(rows), SEED_MAX_ROWS, False)
                rows = np.sort(pick)
            space = _seeding_space(matrix[rows], self.seed).astype(np.float64)
            starts = [
                matrix[rows[kmeans_plusplus(space, self.n_clusters, random_state=self.seed + r)[1]]]
                for r in range(self.n_init)
            ]
        best = None
        for start in starts:
            centers, objective, iterations = _lloyd(matrix, start, self.max_iter, tol)
            if best is None or objective > best[1]:
                best = (centers, objective, iterations)
        self._start(best[0])
        self.n_iter_ = best[2]
        return self

    # --- use -----------------------------------------------------------------------------

    def predict(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the most cosine-similar centre, that similarity) for each unit row."""
        return nearest_centers(_as_rows(matrix, self._dim()), self.cluster_centers_)

    def score(self, matrix: np.ndarray) -> float:
        """Mean cosine of the unit rows to their most similar centre (higher is better)."""
        return _mean_best_similarity(_as_rows(matrix, self._dim()), self.cluster_centers_)


def _lloyd(
    matrix: np.ndarray, centers: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float, int]:
    """Spherical Lloyd iterations from ``centers``: (centres, sum of cosines, iterations)."""
    k = centers.shape[0]
    centers = l2_normalize(centers)
    labels = None
    objective = -np.inf
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        new_labels, sims = nearest_centers(matrix, centers)
        objective = float(sims.sum(dtype=np.float64))
        if labels is not None and np.array_equal(labels, new_labels):
            break
        labels = new_labels
        sums = _sums_by_label(matrix, labels, k)
        empty = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
        if empty.size:
            # An empty centre moves onto the rows farthest from their own centre (as
            # scikit-learn's KMeans relocates empty clusters), so K is kept.
            far = np.argsort(sims, kind="stable")[: empty.size]
            sums[empty] = matrix[far]
        new_centers = l2_normalize(sums)
        shift = float(np.sum((new_centers - centers) ** 2))
        centers = new_centers
        if shift <= tol:
            _labels, sims = nearest_centers(matrix, centers)
            objective = float(sims.sum(dtype=np.float64))
            break
    return centers, objective, iterations


def _sums_by_label(matrix: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64 sums of the rows of each label: one pass over the rows, a label's rows
    gathered at a time (a one-hot matrix product would cost K times more on wide vectors)."""
    sums = np.zeros((k, matrix.shape[1]), dtype=np.float64)
    order = np.argsort(labels, kind="stable")
    present, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    for label, start, size in zip(present, starts, sizes, strict=True):
        sums[label] = matrix[order[start : start + size]].sum(axis=0, dtype=np.float64)
    return sums


def _mean_variance(matrix: np.ndarray) -> float:
    """Mean over dimensions of the rows' variance (scikit-learn's scale for ``tol``), by blocks."""
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    squares = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, len(matrix), _BLOCK_ROWS):
        block = matrix[start : start + _BLOCK_ROWS].astype(np.float64)
        total += block.sum(axis=0)
        squares += np.einsum("ij,ij->j", block, block)
    n = max(len(matrix), 1)
    return float(np.mean(squares / n - (total / n) ** 2))


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
    """Cluster unit vectors with spherical k-means (``"kmeans"``: full batch; ``"minibatch"``:
    random mini-batches of ``batch_size``, the steps a streamed rebuild takes).

    ``init_centers`` warm-starts from existing centres (the patent's incremental update): one
    initialisation, no k-means++ restarts. Centres are returned L2-normalised, and every vector
    is (re)assigned to its most cosine-similar centre, the same rule ``suggest`` uses for a new
    image, so members and queries are placed consistently. Clusters left empty by that rule are
    dropped, so ``result.k`` can be below ``k``.
    """
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
    started = time.perf_counter()
    model = SphericalKMeans(k, init=init_centers, max_iter=max_iter, tol=tol, seed=seed)
    if algorithm == "kmeans":
        model.fit(vectors)
    else:
        model.fit_minibatch(n, vectors.__getitem__, batch_size=max(1, min(batch_size, n)))
    labels, sims = model.predict(vectors)
    centers, labels = drop_empty_clusters(model.cluster_centers_, labels)
    return ClusteringResult(
        centers=np.ascontiguousarray(centers, dtype=np.float32),
        labels=labels,
        similarities=sims,
        # Unit vectors and unit centres: squared distance = 2 - 2 cos.
        inertia=float(np.sum(2.0 - 2.0 * sims.astype(np.float64))),
        iterations=model.n_iter_,
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
