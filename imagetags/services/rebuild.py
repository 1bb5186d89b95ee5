"""Building cluster sets from the library.

A rebuild reads the vectors of the current extractor in chunks into one contiguous array, clusters
them with the core's spherical k-means (``core.kmeans``), writes a new ClusterSet in status
``building`` chunk by chunk (readers never look at building sets), and then activates it in one
short transaction. A failed or killed rebuild therefore leaves the previously active set serving.
Images embedded while it ran are then placed by ``services.assign``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable

import numpy as np
from django.db import transaction
from django.db.models import Count

from imagetags.conf import imagetags_settings
from imagetags.core import counting, kmeans
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    StockImage,
    TagFrequency,
)
from imagetags.services import engines, priors, vectors
from imagetags.services.assign import assign_to_active_set
from imagetags.services.errors import ClusteringError
from imagetags.services.extractors import get_extractor
from imagetags.services.frequencies import counted_tags_by_post, recount_changed_since
from imagetags.services.locks import RebuildLease, cleanup_abandoned_sets, rebuild_lock
from imagetags.services.store import (
    LibraryVectors,
    batched,
    insert_rows,
    library_ids,
    library_shape,
    read_centers,
    read_library_vectors,
    read_vectors_by_id,
    ready_images,
    rows_per_read,
    stack_rows,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def current_extractor_key() -> str:
    return get_extractor().key


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


def resolve_k(k: int | str | None, n_vectors: int) -> int:
    k = imagetags_settings.CLUSTERING["K"] if k is None else k
    if k == "auto":
        return kmeans.auto_k(n_vectors)
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
    if algorithm not in kmeans.ALGORITHMS:
        raise ClusteringError(
            f"Unknown algorithm {algorithm!r}: choose {' or '.join(kmeans.ALGORITHMS)}."
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
    library = library_ids(extractor_key, dim) if streamed else read_library_vectors(extractor_key)
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
        init_centers, _ids, _indexes = read_centers(previous)
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
                result = kmeans.fit_clusters(
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
        # The counted tags as read now; what changes before the set is active is recounted
        # in it right after activation (recount_changed_since).
        tags_read = counted_tags_by_post()
        post_counts, frequencies = counting.count_tag_frequencies(
            result.labels, library.post_ids.tolist(), tags_read, result.k
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
        # The engine and the tag shares are ready before any process can serve the set.
        engines.publish(cluster_set, ClusterSet.objects.active(), say)
        priors.store(cluster_set)
        cluster_set.activate()
    except Exception as exc:
        ClusterSet.objects.filter(pk=cluster_set.pk).update(
            status=ClusterSetStatus.FAILED, error=f"{type(exc).__name__}: {exc}"
        )
        logger.exception("Rebuild of cluster set %s failed", cluster_set.pk)
        if isinstance(exc, ValueError):
            raise ClusteringError(str(exc)) from exc
        raise
    engines.after_activation(cluster_set)
    # Tags changed while we were clustering were recounted in the set active then, not here.
    recount_changed_since(tags_read)
    # Images that got vectors while we were clustering are not members yet.
    late = list(ready_images(extractor_key).exclude(cluster_memberships__cluster_set=cluster_set))
    if late:
        assign_to_active_set(late)
    return cluster_set


def _write_cluster_rows(
    cluster_set: ClusterSet,
    library: LibraryVectors,
    result: kmeans.ClusteringResult,
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
    by_label = np.asarray(cluster_ids, dtype=np.int64)
    for start in range(0, len(library.image_ids), chunk):
        stop = start + chunk
        with transaction.atomic():
            # Plain rows, not a model instance each (store.insert_rows): a million of them.
            insert_rows(
                ClusterMembership,
                ("cluster_set", "cluster", "image", "similarity"),
                zip(
                    itertools.repeat(cluster_set.pk),
                    by_label[result.labels[start:stop]].tolist(),
                    library.image_ids[start:stop].tolist(),
                    result.similarities[start:stop].astype(np.float64).tolist(),
                ),
            )
    # A (cluster, tag) pair per row: ~1,000 per cluster in a large library, plain rows too.
    pairs = [
        (cluster_ids[index], tag_id, count)
        for index, counter in enumerate(frequencies)
        for tag_id, count in counter.items()
    ]
    for start in range(0, len(pairs), chunk):
        insert_rows(TagFrequency, ("cluster", "tag", "post_count"), pairs[start : start + chunk])


# --- streaming rebuilds ----------------------------------------------------------------------
#
# A library whose float32 vectors exceed REBUILD_MEMORY_MB (a million 512-d images, or a few
# thousand in `flatten` mode at 401 KB each) is never loaded whole. The core's mini-batch
# spherical k-means (``SphericalKMeans.fit_minibatch``, the same steps an in-memory "minibatch"
# fit takes) is fed chunks read from the database instead: k-means++ on a random sample, then
# epochs over the library in random chunks until the objective stops improving, then one pass in
# primary-key order assigns every image to its nearest centre. Memory is a few chunks plus K
# centres plus four numbers per image, whatever the library size.


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
) -> tuple[kmeans.ClusteringResult, LibraryVectors]:
    """Mini-batch spherical k-means over chunks read from the database; returns the result in
    the shape ``kmeans.fit_clusters`` gives (unit centres, every image on its most
    cosine-similar centre, empty clusters dropped) and the library without images that vanished
    meanwhile."""
    started = time.perf_counter()
    key = library.extractor_key
    dim = library.vectors.shape[1]
    n = len(library.image_ids)
    budget_rows = max(1, _memory_budget_bytes() // (dim * 4))
    # A chunk is one mini-batch; a quarter of the budget leaves room for the decoding buffers.
    chunk_rows = max(k, min(batch_size, budget_rows // 4))

    def read(positions: np.ndarray) -> np.ndarray:
        # Positions are sorted and image_ids ascending: the ids come sorted, as the read needs.
        return read_vectors_by_id(key, library.image_ids[positions], dim)[1]

    def report(epoch: int, mean: float) -> None:
        cluster_set.report_progress(
            min(0.55, 0.05 + 0.1 * epoch), f"Epoch {epoch}: mean cosine to centre {mean:.4f}."
        )

    model = kmeans.SphericalKMeans(k, init=init_centers, max_iter=max_iter, tol=tol, seed=seed)
    # The seeding sample is as large as half the budget allows, up to three mini-batches.
    model.fit_minibatch(
        n,
        read,
        batch_size=chunk_rows,
        sample_size=min(3 * batch_size, budget_rows // 2),
        on_epoch=report,
    )

    centers = model.cluster_centers_
    labels = np.full(n, -1, dtype=np.int64)
    sims = np.zeros(n, dtype=np.float32)
    chunk_size = rows_per_read(dim)
    rows = ready_images(key).values_list("pk", "vector").iterator(chunk_size=chunk_size)
    for chunk in batched(rows, chunk_size):
        pks = np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk))
        positions = np.searchsorted(library.image_ids, pks).clip(max=n - 1)
        known = library.image_ids[positions] == pks  # rows added since the snapshot are left out
        matrix = np.empty((len(chunk), dim), dtype=np.float32)
        stack_rows(chunk, dim, key, out=matrix)
        chunk_labels, chunk_sims = model.predict(matrix[known])
        labels[positions[known]] = chunk_labels
        sims[positions[known]] = chunk_sims
    kept = labels >= 0  # images deleted or re-embedded since the snapshot are left out
    if not kept.all():
        library = LibraryVectors(
            library.image_ids[kept], library.post_ids[kept], library.vectors, key
        )
        labels, sims = labels[kept], sims[kept]
    centers, labels = kmeans.drop_empty_clusters(centers, labels)
    result = kmeans.ClusteringResult(
        centers=np.ascontiguousarray(centers, dtype=np.float32),
        labels=labels,
        similarities=sims,
        # Unit vectors and unit centres: squared distance = 2 - 2 cos.
        inertia=float(np.sum(2.0 - 2.0 * sims.astype(np.float64))),
        iterations=model.n_iter_,
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
            "epochs": model.n_iter_,
        },
    )
    return result, library
