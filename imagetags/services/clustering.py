"""Building cluster sets from the library, and keeping the active one fresh between rebuilds.

A rebuild reads the vectors of the current extractor in chunks into one contiguous array, clusters
them (``ranking.fit_clusters``), writes a new ClusterSet in status ``building`` chunk by chunk
(readers never look at building sets), and then activates it in one short transaction. A failed
or killed rebuild therefore leaves the previously active set serving.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from django.db import connections, models, router, transaction
from django.db.models import Count, F

from imagetags.conf import imagetags_settings
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    PostTag,
    StockImage,
    TagFrequency,
)
from imagetags.services import ranking, vectors
from imagetags.services.errors import ClusteringError
from imagetags.services.locks import RebuildLease, cleanup_abandoned_sets, rebuild_lock
from imagetags.services.store import read_centers
from imagetags.services.vectors import l2_normalize

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class LibraryVectors:
    image_ids: np.ndarray  # (n,) int64
    post_ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, d) float32, unit rows
    extractor_key: str


def current_extractor_key() -> str:
    from imagetags.services.extractors import get_extractor

    return get_extractor().key


def _ready_images(extractor_key: str):
    return StockImage.objects.filter(
        feature_status=FeatureStatus.READY, extractor_key=extractor_key
    ).order_by("pk")


def read_library_vectors(
    extractor_key: str,
    *,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LibraryVectors:
    """All READY vectors of one extractor, read in chunks into one preallocated array.

    Each chunk of rows is decoded in one NumPy step straight into its slice of the library
    matrix (``vectors.stack(out=...)``), so the library is held once, as float32.
    """
    queryset = _ready_images(extractor_key)
    count, dim = library_shape(extractor_key)
    chunk_size = rows_per_read(dim, chunk_size)
    image_ids = np.empty(count, dtype=np.int64)
    post_ids = np.empty(count, dtype=np.int64)
    matrix = np.empty((count, dim), dtype=np.float32)
    n = 0
    rows = queryset.values_list("pk", "post_id", "vector").iterator(chunk_size=chunk_size)
    for chunk in _batched(rows, chunk_size):
        chunk = chunk[: count - n]  # rows added since count(): leave them to the freshness path
        if not chunk:
            break
        _stack_rows(chunk, dim, extractor_key, out=matrix[n : n + len(chunk)])
        image_ids[n : n + len(chunk)] = [row[0] for row in chunk]
        post_ids[n : n + len(chunk)] = [row[1] for row in chunk]
        n += len(chunk)
        if progress and n < count:
            progress(n)
    if progress:
        progress(n)
    return LibraryVectors(image_ids[:n], post_ids[:n], matrix[:n], extractor_key)


def rows_per_read(dim: int, chunk_size: int | None = None) -> int:
    """Rows per database read: ``CHUNK_SIZE``, fewer for wide vectors, so that one read holds
    at most ~64 MB of float32 (a `flatten` vector is 401 KB: 163 rows, not 5,000)."""
    chunk_size = chunk_size or imagetags_settings.CHUNK_SIZE
    return max(1, min(chunk_size, READ_CHUNK_BYTES // (4 * dim)))


def library_shape(extractor_key: str) -> tuple[int, int]:
    """(number of READY vectors, their dimensions) for one extractor, without reading them all.

    Raises :class:`ClusteringError` with what to do when there are none.
    """
    queryset = _ready_images(extractor_key)
    count = queryset.count()
    first = queryset.values_list("vector", flat=True).first() if count else None
    if first is None:
        raise ClusteringError(_no_vectors_message(extractor_key))
    return count, vectors.stored_dim(first)


def _batched(rows: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stack_rows(rows: Sequence[tuple], dim: int, extractor_key: str, out: np.ndarray) -> None:
    """Decode the vector (last field) of database rows into ``out``; a row of another
    dimension raises :class:`ClusteringError` naming the image."""
    try:
        vectors.stack([row[-1] for row in rows], dim, out=out)
    except ValueError:
        for row in rows:
            found = vectors.stored_dim(row[-1])
            if found != dim:
                raise ClusteringError(
                    f"Image {row[0]} has a {found}-d vector but others have {dim} under the "
                    f"same extractor key {extractor_key!r}; run `manage.py compute_features --all`."
                ) from None
        raise


def _no_vectors_message(extractor_key: str) -> str:
    counts: dict[str, int] = defaultdict(int)
    for row in StockImage.objects.values("feature_status").annotate(n=Count("pk")):
        counts[row["feature_status"]] = row["n"]
    total = sum(counts.values())
    if total == 0:
        return "The library is empty: add images (e.g. `manage.py import_library manifest.jsonl`) first."
    # Stale is derived from the key: ready vectors of another extractor.
    stale = counts[FeatureStatus.READY] - _ready_images(extractor_key).count()
    return (
        f"No feature vectors for the current extractor ({extractor_key}): "
        f"{counts[FeatureStatus.PENDING]} images pending, {stale} stale, "
        f"{counts[FeatureStatus.FAILED]} failed, of {total}. "
        "Run `manage.py compute_features` (or start a `manage.py qcluster` worker) first."
    )


def check_library_extractor(extractor_key: str) -> None:
    """Refuse a rebuild when most ready vectors were made by another extractor.

    Such a rebuild would cluster the few vectors of the configured key and retire a set that
    serves the whole library; usually the setting was changed by mistake, or the recompute has
    not run yet. Nothing is read but counts, and nothing is written.
    """
    by_key = dict(
        StockImage.objects.filter(feature_status=FeatureStatus.READY)
        .values("extractor_key")
        .annotate(n=Count("pk"))
        .values_list("extractor_key", "n")
    )
    total = sum(by_key.values())
    other = total - by_key.get(extractor_key, 0)
    if total == 0 or other * 2 <= total:
        return
    # The most common other key names the extractor the library was built with.
    commonest = max((n, key) for key, n in by_key.items() if key != extractor_key)[1]
    raise ClusteringError(
        f"{other} of {total} ready vectors were made by extractor {commonest}, not the "
        f"configured {extractor_key}: run `manage.py compute_features --stale` first, or set "
        "IMAGETAGS['EXTRACTOR'] back. Nothing was changed."
    )


def _post_tags(counted_sources: Sequence[str]) -> dict[int, list[int]]:
    post_tags: dict[int, list[int]] = defaultdict(list)
    for post_id, tag_id in PostTag.objects.filter(source__in=counted_sources).values_list(
        "post_id", "tag_id"
    ):
        post_tags[post_id].append(tag_id)
    return post_tags


def resolve_k(k: int | str | None, n_vectors: int) -> int:
    k = imagetags_settings.CLUSTERING["K"] if k is None else k
    if k == "auto":
        return ranking.auto_k(n_vectors)
    try:
        value = int(k)
    except (TypeError, ValueError):
        raise ClusteringError(f"K must be a whole number or 'auto', not {k!r}.") from None
    if value < 1:
        raise ClusteringError(f"K must be at least 1, not {value}.")
    return value


def rebuild_clusters(
    *,
    algorithm: str | None = None,
    k: int | str | None = None,
    batch_size: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int | None = None,
    warm_start: bool = False,
    progress: Progress | None = None,
) -> ClusterSet:
    """Cluster the library's current vectors into a new ClusterSet and make it active.

    Raises :class:`ClusteringError` (nothing written, the active set untouched) when there are no
    vectors for the current extractor, when most ready vectors were made by another extractor
    (:func:`check_library_extractor`), fewer vectors than K, or a warm start is impossible.

    One rebuild runs at a time: while another holds the lock (``services.locks``), this raises
    ``locks.RebuildInProgress`` (a ClusteringError) before doing anything. A set left
    ``building`` by a rebuild that was killed is marked failed and its partial rows are deleted.
    """
    # Before the lock, so that a refused rebuild writes nothing at all (not even the lock row).
    check_library_extractor(current_extractor_key())
    with rebuild_lock() as lease:
        abandoned = cleanup_abandoned_sets()
        if abandoned and progress:
            progress(f"Cleaned up half-built cluster set(s) {abandoned} of a rebuild that died.")
        return _rebuild_clusters(
            lease,
            algorithm=algorithm,
            k=k,
            batch_size=batch_size,
            max_iter=max_iter,
            tol=tol,
            seed=seed,
            warm_start=warm_start,
            progress=progress,
        )


def _rebuild_clusters(
    lease: RebuildLease,
    *,
    algorithm: str | None,
    k: int | str | None,
    batch_size: int | None,
    max_iter: int | None,
    tol: float | None,
    seed: int | None,
    warm_start: bool,
    progress: Progress | None,
) -> ClusterSet:
    say = progress or (lambda message: None)
    defaults = imagetags_settings.CLUSTERING
    algorithm = algorithm or defaults["ALGORITHM"]
    if algorithm not in ranking.ALGORITHMS:
        raise ClusteringError(
            f"Unknown algorithm {algorithm!r}: choose {' or '.join(ranking.ALGORITHMS)}."
        )
    batch_size = batch_size or defaults["BATCH_SIZE"]
    max_iter = max_iter or defaults["MAX_ITER"]
    tol = defaults["TOL"] if tol is None else tol
    seed = defaults["SEED"] if seed is None else seed
    started = time.perf_counter()

    extractor_key = current_extractor_key()
    stale = (
        StockImage.objects.filter(feature_status=FeatureStatus.READY)
        .exclude(extractor_key=extractor_key)
        .count()
    )
    if stale:
        say(f"{stale} vectors of another extractor are left out (stale for {extractor_key}).")
    n, dim = library_shape(extractor_key)
    # A library too large for REBUILD_MEMORY_MB is never loaded whole: mini-batch k-means then
    # streams it from the database in chunks (see _fit_streaming).
    streamed = algorithm == "minibatch" and not fits_in_memory(n, dim)
    library = _library_ids(extractor_key, dim) if streamed else read_library_vectors(extractor_key)
    n = len(library.image_ids)

    init_centers = None
    previous = None
    if warm_start:
        previous = ClusterSet.objects.active()
        if previous is None:
            raise ClusteringError(
                "--warm-start needs an active cluster set to start from; run a full rebuild first."
            )
        if previous.extractor_key != extractor_key:
            raise ClusteringError(
                f"The active cluster set was built with {previous.extractor_key}, the current "
                f"extractor is {extractor_key}: vectors cannot be mixed. Run a full rebuild."
            )
        init_centers, _ids, _posts = load_centers(previous)
        warm_k = init_centers.shape[0]
        if k not in (None, "auto") and resolve_k(k, n) != warm_k:
            raise ClusteringError(
                f"--warm-start keeps the active set's K={warm_k}; drop --k or rebuild without "
                "--warm-start to change K."
            )
        k_value = warm_k
    else:
        k_value = resolve_k(k, n)
    if n < k_value:
        raise ClusteringError(
            f"Only {n} images have vectors for {extractor_key}, fewer than K={k_value}. "
            "Lower --k (or use --k auto) or add images."
        )

    cluster_set = ClusterSet.objects.create(
        status=ClusterSetStatus.BUILDING,
        extractor_key=extractor_key,
        algorithm=algorithm,
        k=k_value,
        dim=dim,
        n_images=n,
        warm_started_from=previous,
    )
    lease.attach(cluster_set)
    try:
        say(
            f"Clustering {n} vectors ({dim}-d) into K={k_value} with {algorithm}"
            + (", streamed from the database in chunks." if streamed else ".")
        )
        with rebuild_thread_limit():
            if streamed:
                result, library = _fit_streaming(
                    library,
                    k_value,
                    batch_size=batch_size,
                    max_iter=max_iter,
                    tol=tol,
                    seed=seed,
                    init_centers=init_centers,
                    cluster_set=cluster_set,
                )
            else:
                result = ranking.fit_clusters(
                    library.vectors,
                    k_value,
                    algorithm=algorithm,
                    batch_size=batch_size,
                    max_iter=max_iter,
                    tol=tol,
                    seed=seed,
                    init_centers=init_centers,
                )
        say(f"Converged after {result.iterations} iterations; counting tags once per post.")
        cluster_set.report_progress(0.6, f"Clustered in {result.iterations} iterations.")
        post_counts, frequencies = ranking.count_tag_frequencies(
            result.labels,
            library.post_ids.tolist(),
            _post_tags(imagetags_settings.COUNTED_TAG_SOURCES),
            result.k,
        )
        cluster_set.report_progress(0.7, "Writing clusters, members and tag frequencies.")
        _write_cluster_rows(cluster_set, library, result, post_counts, frequencies)
        cluster_set.progress, cluster_set.progress_message = 1.0, "Done."
        cluster_set.k = result.k
        cluster_set.n_posts = len(set(library.post_ids.tolist()))
        cluster_set.iterations = result.iterations
        cluster_set.inertia = result.inertia
        cluster_set.params = result.params
        cluster_set.duration_seconds = time.perf_counter() - started
        cluster_set.save(
            update_fields=[
                "k",
                "n_posts",
                "iterations",
                "inertia",
                "params",
                "duration_seconds",
                "progress",
                "progress_message",
            ]
        )
        cluster_set.activate()
    except Exception as exc:
        ClusterSet.objects.filter(pk=cluster_set.pk).update(
            status=ClusterSetStatus.FAILED, error=f"{type(exc).__name__}: {exc}"
        )
        logger.exception("Rebuild of cluster set %s failed", cluster_set.pk)
        if isinstance(exc, ValueError):
            raise ClusteringError(str(exc)) from exc
        raise
    _invalidate_centers_cache()
    # Images that got vectors while we were clustering are not members yet.
    late = list(_ready_images(extractor_key).exclude(cluster_memberships__cluster_set=cluster_set))
    if late:
        assign_to_active_set(late)
    return cluster_set


def _write_cluster_rows(
    cluster_set: ClusterSet,
    library: LibraryVectors,
    result: ranking.ClusteringResult,
    post_counts: list[int],
    frequencies: list,
) -> None:
    chunk = imagetags_settings.CHUNK_SIZE
    sizes = np.bincount(result.labels, minlength=result.k)
    clusters = Cluster.objects.bulk_create(
        [
            Cluster(
                cluster_set=cluster_set,
                index=index,
                centroid=vectors.to_bytes(result.centers[index]),
                size=int(sizes[index]),
                post_count=post_counts[index],
            )
            for index in range(result.k)
        ]
    )
    if any(c.pk is None for c in clusters):  # backends without RETURNING
        clusters = list(Cluster.objects.filter(cluster_set=cluster_set).order_by("index"))
    cluster_ids = [c.pk for c in clusters]
    for start in range(0, len(library.image_ids), chunk):
        with transaction.atomic():
            ClusterMembership.objects.bulk_create(
                [
                    ClusterMembership(
                        cluster_set=cluster_set,
                        cluster_id=cluster_ids[int(label)],
                        image_id=int(image_id),
                        similarity=float(sim),
                    )
                    for image_id, label, sim in zip(
                        library.image_ids[start : start + chunk],
                        result.labels[start : start + chunk],
                        result.similarities[start : start + chunk],
                        strict=True,
                    )
                ]
            )
    TagFrequency.objects.bulk_create(
        [
            TagFrequency(cluster_id=cluster_ids[index], tag_id=tag_id, post_count=count)
            for index, counter in enumerate(frequencies)
            for tag_id, count in counter.items()
        ],
        batch_size=chunk,
    )


# --- streaming rebuilds ----------------------------------------------------------------------
#
# A library whose float32 vectors exceed REBUILD_MEMORY_MB (a million 512-d images, or a few
# thousand in `flatten` mode at 401 KB each) is never loaded whole. Mini-batch k-means is fed
# chunks read from the database instead (MiniBatchKMeans.partial_fit): k-means++ on a random
# sample, then epochs over the library in random chunks until the objective stops improving,
# then one pass in primary-key order assigns every image to its nearest centre. Memory is a few
# chunks plus K centres plus four numbers per image, whatever the library size.

# An epoch whose mean cosine to the nearest centre improved by less than this share ends the fit.
# Measured on a synthetic 10,000 × 512-d library (bench/rebuild_worker.py): 0.372, 0.429, 0.435,
# 0.438, 0.439 ... after epochs 1-5; the in-memory fit reaches 0.436. So four epochs, typically.
STREAM_MIN_IMPROVEMENT = 1e-2
STREAM_MAX_EPOCHS = 20
# k-means++ restarts on the sample (the in-memory path's n_init).
STREAM_INIT_RESTARTS = 3
# Wider vectors are seeded in a random projection of this many dimensions (see _seed_centers).
SEED_PROJECTION_DIM = 256
# Most float32 bytes one database read decodes at once (see rows_per_read).
READ_CHUNK_BYTES = 64 * 2**20


def rebuild_thread_limit() -> contextlib.AbstractContextManager:
    """Limit k-means' OpenMP and BLAS threads to ``REBUILD_THREADS`` (``None``: no limit).

    scikit-learn's k-means spins its threads while waiting; on a machine whose cores are busy
    with other work (web, workers, other tenants) two threads ran 6× slower than one here.
    """
    threads = imagetags_settings.REBUILD_THREADS
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads))


def fits_in_memory(n_vectors: int, dim: int) -> bool:
    """Whether a rebuild may hold ``n_vectors`` float32 vectors at once (``REBUILD_MEMORY_MB``)."""
    return n_vectors * dim * 4 <= _memory_budget_bytes()


def _memory_budget_bytes() -> int:
    return int(float(imagetags_settings.REBUILD_MEMORY_MB) * 2**20)


def _library_ids(extractor_key: str, dim: int) -> LibraryVectors:
    """Ids and posts of the READY vectors, without the vectors (``vectors`` is (0, dim))."""
    pairs = np.fromiter(
        (
            value
            for row in _ready_images(extractor_key)
            .values_list("pk", "post_id")
            .iterator(chunk_size=imagetags_settings.CHUNK_SIZE)
            for value in row
        ),
        dtype=np.int64,
    ).reshape(-1, 2)
    return LibraryVectors(
        image_ids=pairs[:, 0].copy(),
        post_ids=pairs[:, 1].copy(),
        vectors=np.empty((0, dim), dtype=np.float32),
        extractor_key=extractor_key,
    )


def read_vectors_by_id(
    extractor_key: str, image_ids: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids found, their (n, dim) vectors) for sorted ``image_ids``, READY under the key.

    One query per :func:`rows_per_read` ids (SQLite limits the parameters of a statement, and
    a read must not hold gigabytes of blobs), each decoded in one step into the result.
    """
    step = rows_per_read(dim)
    found = np.empty(len(image_ids), dtype=np.int64)
    matrix = np.empty((len(image_ids), dim), dtype=np.float32)
    n = 0
    for start in range(0, len(image_ids), step):
        part = [int(pk) for pk in image_ids[start : start + step]]
        rows = list(_ready_images(extractor_key).filter(pk__in=part).values_list("pk", "vector"))
        if rows:
            _stack_rows(rows, dim, extractor_key, out=matrix[n : n + len(rows)])
            found[n : n + len(rows)] = [row[0] for row in rows]
            n += len(rows)
    return found[:n], matrix[:n]


def _fit_streaming(
    library: LibraryVectors,
    k: int,
    *,
    batch_size: int,
    max_iter: int,
    tol: float,
    seed: int,
    init_centers: np.ndarray | None,
    cluster_set: ClusterSet,
) -> tuple[ranking.ClusteringResult, LibraryVectors]:
    """Mini-batch k-means over chunks read from the database; returns the result in the shape
    ``ranking.fit_clusters`` gives (unit centres, every image on its most cosine-similar
    centre, empty clusters dropped) and the library without images that vanished meanwhile."""
    from sklearn.cluster import MiniBatchKMeans

    started = time.perf_counter()
    key = library.extractor_key
    dim = library.vectors.shape[1]
    n = len(library.image_ids)
    budget_rows = max(1, _memory_budget_bytes() // (dim * 4))
    # A chunk is one mini-batch; a quarter of the budget leaves room for the decoding buffers.
    chunk_rows = max(k, min(batch_size, budget_rows // 4))
    rng = np.random.default_rng(seed)

    if init_centers is None:
        # k-means++ on a random sample (as large as half the budget allows, up to
        # MiniBatchKMeans' own init size of 3 mini-batches), best of a few restarts.
        size = min(n, max(3 * k, min(3 * batch_size, budget_rows // 2)))
        _ids, sample = read_vectors_by_id(
            key, np.sort(rng.choice(library.image_ids, size, replace=False)), dim
        )
        if len(sample) < k:
            raise ClusteringError(f"Only {len(sample)} vectors could be read for K={k}.")
        init = _seed_centers(sample, k, seed)
        del sample
    else:
        init = init_centers
    model = MiniBatchKMeans(
        n_clusters=k,
        init=l2_normalize(init),
        n_init=1,
        batch_size=chunk_rows,
        random_state=seed,
        compute_labels=False,
    )
    previous = -np.inf
    epochs = 0
    for epochs in range(1, min(max_iter, STREAM_MAX_EPOCHS) + 1):
        order = rng.permutation(library.image_ids)
        total, seen = 0.0, 0
        for start in range(0, n, chunk_rows):
            _ids, chunk = read_vectors_by_id(key, np.sort(order[start : start + chunk_rows]), dim)
            if len(chunk) == 0 or (not hasattr(model, "cluster_centers_") and len(chunk) < k):
                continue
            if hasattr(model, "cluster_centers_"):  # the objective before this step
                total += float(_mean_best_similarity(chunk, model.cluster_centers_)) * len(chunk)
                seen += len(chunk)
            model.partial_fit(chunk)
            # Spherical k-means: centres back on the unit sphere after every step. Assignment
            # is by cosine (as suggestions are made); plain Euclidean mini-batch steps on unit
            # vectors let a centre shrink toward the origin and swallow every image that has no
            # close centre (measured: mean cosine to the centre 0.23 instead of 0.43).
            centers = model.cluster_centers_
            norms = np.linalg.norm(centers, axis=1, keepdims=True)
            np.divide(centers, norms, out=centers, where=norms > 0)
        mean = total / seen if seen else -np.inf
        cluster_set.report_progress(
            min(0.55, 0.05 + 0.1 * epochs), f"Epoch {epochs}: mean cosine to centre {mean:.4f}."
        )
        if seen and mean - previous < STREAM_MIN_IMPROVEMENT * abs(mean):
            break
        previous = max(previous, mean)

    if not hasattr(model, "cluster_centers_"):
        raise ClusteringError(
            "The library's vectors could not be read while clustering (deleted or recomputed "
            "meanwhile); run `manage.py rebuild_clusters` again."
        )
    centers = l2_normalize(model.cluster_centers_)
    labels = np.full(n, -1, dtype=np.int64)
    sims = np.zeros(n, dtype=np.float32)
    chunk_size = rows_per_read(dim)
    rows = _ready_images(key).values_list("pk", "vector").iterator(chunk_size=chunk_size)
    for chunk in _batched(rows, chunk_size):
        pks = np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk))
        positions = np.searchsorted(library.image_ids, pks).clip(max=n - 1)
        known = library.image_ids[positions] == pks  # rows added since the snapshot are left out
        matrix = np.empty((len(chunk), dim), dtype=np.float32)
        _stack_rows(chunk, dim, key, out=matrix)
        chunk_labels, chunk_sims = ranking.nearest_centers(matrix[known], centers)
        labels[positions[known]] = chunk_labels
        sims[positions[known]] = chunk_sims
    kept = labels >= 0  # images deleted or re-embedded since the snapshot are left out
    if not kept.all():
        library = LibraryVectors(
            library.image_ids[kept], library.post_ids[kept], library.vectors, key
        )
        labels, sims = labels[kept], sims[kept]
    used = np.unique(labels)
    if used.shape[0] < centers.shape[0]:
        remap = np.full(centers.shape[0], -1, dtype=np.int64)
        remap[used] = np.arange(used.shape[0])
        centers, labels = centers[used], remap[labels]
    result = ranking.ClusteringResult(
        centers=np.ascontiguousarray(centers, dtype=np.float32),
        labels=labels,
        similarities=sims,
        # Unit vectors and unit centres: squared distance = 2 - 2 cos.
        inertia=float(np.sum(2.0 - 2.0 * sims.astype(np.float64))),
        iterations=epochs,
        algorithm="minibatch",
        seconds=time.perf_counter() - started,
        params={
            "k_requested": k,
            "batch_size": chunk_rows,
            "max_iter": max_iter,
            "tol": tol,
            "seed": seed,
            "warm_start": init_centers is not None,
            "streamed": True,
            "epochs": epochs,
        },
    )
    return result, library


def _seed_centers(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeds chosen among the sample's rows, best of a few restarts.

    Wide vectors (``flatten``: 100,352-d) are seeded in a random projection to
    :data:`SEED_PROJECTION_DIM` dimensions, which keeps distances within a few per cent
    (Johnson-Lindenstrauss) and costs one pass instead of K: k-means++ on 1,337 flatten vectors
    took 67 s per restart in full dimension, under a second projected. The seeds are the chosen
    rows themselves, in full dimension.
    """
    from sklearn.cluster import kmeans_plusplus

    space = sample
    if sample.shape[1] > 4 * SEED_PROJECTION_DIM:
        space = _random_projection(sample, SEED_PROJECTION_DIM, seed)
    best, chosen = np.inf, None
    for restart in range(STREAM_INIT_RESTARTS):
        centers, indexes = kmeans_plusplus(space, k, random_state=seed + restart)
        inertia = _inertia(space, centers)
        if inertia < best:
            best, chosen = inertia, indexes
    return sample[chosen]


def _random_projection(matrix: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """``matrix`` times a seeded Gaussian (d, dim) matrix / sqrt(dim), built block by block."""
    rng = np.random.default_rng(seed)
    out = np.zeros((matrix.shape[0], dim), dtype=np.float32)
    for start in range(0, matrix.shape[1], 8192):
        block = matrix[:, start : start + 8192]
        out += block @ rng.standard_normal((block.shape[1], dim), dtype=np.float32)
    out /= np.float32(np.sqrt(dim))
    return out


def _inertia(matrix: np.ndarray, centers: np.ndarray) -> float:
    """Sum of squared Euclidean distances to the nearest centre."""
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


# The active set's centres, kept per process: suggestions compare a query with every centre, and
# reading K blobs from the database on each request would dominate its cost.
_centers_lock = threading.Lock()
_centers_cache: dict[int, tuple[np.ndarray, list[int], list[int]]] = {}


def load_centers(cluster_set: ClusterSet) -> tuple[np.ndarray, list[int], list[int]]:
    """(k, d) unit centres of a set, with their Cluster ids and indexes, cached per process."""
    with _centers_lock:
        cached = _centers_cache.get(cluster_set.pk)
    if cached is not None:
        return cached
    value = read_centers(cluster_set)
    with _centers_lock:
        _centers_cache.clear()  # keep one set: sets are replaced, not used side by side
        _centers_cache[cluster_set.pk] = value
    return value


def _invalidate_centers_cache() -> None:
    with _centers_lock:
        _centers_cache.clear()


def assign_to_active_set(images: Iterable[StockImage]) -> int:
    """Put freshly embedded images into the nearest cluster of the active set, at once.

    Each cluster's size grows; a post not yet in a cluster adds one to its post count and one
    post to each of its counted tags (once per post, as in a rebuild, also when several images of
    one post arrive together). Safe to call twice: an image already in the active set is left
    alone. Centres do not move until the next rebuild (the patent's batch update); returns how
    many images were assigned.

    A whole batch is added in one transaction with a fixed number of queries: per image, a
    transaction and its row lock cost more than a MobileNetV2 forward pass (docs/performance.md).
    """
    active = ClusterSet.objects.active()
    if active is None:
        return 0
    candidates = {
        image.pk: image
        for image in images
        if image.feature_status == FeatureStatus.READY
        and image.extractor_key == active.extractor_key
        and image.vector is not None
    }
    if not candidates:
        return 0
    centers, cluster_ids, _indexes = load_centers(active)
    matrix = vectors.stack(
        (image.vector for image in candidates.values()), active.dim, count=len(candidates)
    )
    labels, sims = ranking.nearest_centers(matrix, centers)
    placed = {
        pk: (cluster_ids[int(label)], float(sim))
        for pk, label, sim in zip(candidates, labels, sims, strict=True)
    }
    with transaction.atomic():
        # Lock the clusters, in key order so two workers cannot deadlock, before reading what
        # they hold: two workers adding images of one post must count the post once.
        touched = sorted({cluster_id for cluster_id, _sim in placed.values()})
        list(Cluster.objects.select_for_update().filter(pk__in=touched).order_by("pk").values("pk"))
        already = set(
            ClusterMembership.objects.filter(
                cluster_set=active, image_id__in=list(candidates)
            ).values_list("image_id", flat=True)
        )
        new = [pk for pk in candidates if pk not in already]
        if not new:
            return 0
        post_ids = {candidates[pk].post_id for pk in new}
        seen = set(
            ClusterMembership.objects.filter(
                cluster_id__in=touched, image__post_id__in=post_ids
            ).values_list("cluster_id", "image__post_id")
        )
        ClusterMembership.objects.bulk_create(
            [
                ClusterMembership(
                    cluster_set=active,
                    cluster_id=placed[pk][0],
                    image_id=pk,
                    similarity=placed[pk][1],
                )
                for pk in new
            ]
        )
        sizes: dict[int, int] = defaultdict(int)
        new_posts: dict[int, set[int]] = defaultdict(set)  # cluster -> posts new to it
        for pk in new:
            cluster_id, post_id = placed[pk][0], candidates[pk].post_id
            sizes[cluster_id] += 1
            if (cluster_id, post_id) not in seen:
                new_posts[cluster_id].add(post_id)
        _add_posts_to_clusters(sizes, new_posts)
        ClusterSet.objects.filter(pk=active.pk).update(n_images=F("n_images") + len(new))
    return len(new)


def _add_posts_to_clusters(sizes: dict[int, int], new_posts: dict[int, set[int]]) -> None:
    """Grow clusters by ``sizes`` images and ``new_posts`` posts, and count those posts' tags.

    Increments, not recomputed totals, so a concurrent assignment to other clusters is kept;
    the caller holds the clusters' row locks.
    """
    tags_of: dict[int, set[int]] = defaultdict(set)
    all_posts = set().union(*new_posts.values()) if new_posts else set()
    for post_id, tag_id in PostTag.objects.filter(
        post_id__in=all_posts, source__in=imagetags_settings.COUNTED_TAG_SOURCES
    ).values_list("post_id", "tag_id"):
        tags_of[post_id].add(tag_id)
    increments: dict[tuple[int, int], int] = defaultdict(int)
    for cluster_id, posts in new_posts.items():
        for post_id in posts:
            for tag_id in tags_of[post_id]:
                increments[cluster_id, tag_id] += 1
    _increment(
        Cluster,
        ("size", "post_count"),
        ("pk",),
        [
            (size, len(new_posts.get(cluster_id, ())), cluster_id)
            for cluster_id, size in sizes.items()
        ],
    )
    if not increments:
        return
    existing = set(
        TagFrequency.objects.filter(
            cluster_id__in=list(new_posts), tag_id__in={tag for _c, tag in increments}
        ).values_list("cluster_id", "tag_id")
    )
    _increment(
        TagFrequency,
        ("post_count",),
        ("cluster", "tag"),
        [(count, *pair) for pair, count in increments.items() if pair in existing],
    )
    TagFrequency.objects.bulk_create(
        [
            TagFrequency(cluster_id=cluster_id, tag_id=tag_id, post_count=count)
            for (cluster_id, tag_id), count in increments.items()
            if (cluster_id, tag_id) not in existing
        ]
    )


def _increment(
    model: type[models.Model],
    columns: Sequence[str],
    keys: Sequence[str],
    rows: Sequence[tuple],
) -> None:
    """``UPDATE ... SET column = column + %s ... WHERE key = %s ...`` once per row, as one
    prepared statement run by ``executemany``: a batch touches up to a few hundred
    (cluster, tag) pairs, and an ORM ``update()`` each would cost more than the batch's
    forward pass. ``rows`` hold the increments, then the key values."""
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    meta = model._meta
    quote = connection.ops.quote_name

    def column(name: str) -> str:
        return quote((meta.pk if name == "pk" else meta.get_field(name)).column)

    set_sql = ", ".join(f"{column(name)} = {column(name)} + %s" for name in columns)
    where_sql = " AND ".join(f"{column(name)} = %s" for name in keys)
    sql = f"UPDATE {quote(meta.db_table)} SET {set_sql} WHERE {where_sql}"
    with connection.cursor() as cursor:
        cursor.executemany(sql, [list(row) for row in rows])
