"""Building cluster sets from the library, and keeping the active one fresh between rebuilds.

A rebuild reads the vectors of the current extractor in chunks into one contiguous array, clusters
them (``ranking.fit_clusters``), writes a new ClusterSet in status ``building`` chunk by chunk
(readers never look at building sets), and then activates it in one short transaction. A failed
or killed rebuild therefore leaves the previously active set serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from django.db import transaction
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

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class ClusteringError(Exception):
    """A rebuild cannot go ahead. The message tells the person what to do."""


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
    """All READY vectors of one extractor, read in chunks into one preallocated array."""
    chunk_size = chunk_size or imagetags_settings.CHUNK_SIZE
    queryset = _ready_images(extractor_key)
    count = queryset.count()
    if count == 0:
        raise ClusteringError(_no_vectors_message(extractor_key))
    first = queryset.values_list("vector", flat=True).first()
    dim = vectors.from_bytes(first).shape[0]
    image_ids = np.empty(count, dtype=np.int64)
    post_ids = np.empty(count, dtype=np.int64)
    matrix = np.empty((count, dim), dtype=np.float32)
    n = 0
    rows = queryset.values_list("pk", "post_id", "vector").iterator(chunk_size=chunk_size)
    for pk, post_id, data in rows:
        if n >= count:  # rows added since count(): leave them to the freshness path
            break
        vec = vectors.from_bytes(data)
        if vec.shape[0] != dim:
            raise ClusteringError(
                f"Image {pk} has a {vec.shape[0]}-d vector but others have {dim} under the same "
                f"extractor key {extractor_key!r}; run `manage.py compute_features --all`."
            )
        image_ids[n], post_ids[n], matrix[n] = pk, post_id, vec
        n += 1
        if progress and n % chunk_size == 0:
            progress(n)
    if progress:
        progress(n)
    return LibraryVectors(image_ids[:n], post_ids[:n], matrix[:n], extractor_key)


def _no_vectors_message(extractor_key: str) -> str:
    counts: dict[str, int] = defaultdict(int)
    for row in StockImage.objects.values("feature_status").annotate(n=Count("pk")):
        counts[row["feature_status"]] = row["n"]
    total = sum(counts.values())
    if total == 0:
        return "The library is empty: add images (e.g. `manage.py import_library manifest.jsonl`) first."
    return (
        f"No feature vectors for the current extractor ({extractor_key}): "
        f"{counts[FeatureStatus.PENDING]} images pending, {counts[FeatureStatus.STALE]} stale, "
        f"{counts[FeatureStatus.FAILED]} failed, of {total}. "
        "Run `manage.py compute_features` (or start a `manage.py qcluster` worker) first."
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
    vectors for the current extractor, fewer vectors than K, or a warm start is impossible.
    """
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
    from imagetags.services.features import mark_stale

    stale = mark_stale(extractor_key)
    if stale:
        say(f"{stale} vectors of an older extractor marked stale (they are left out).")
    library = read_library_vectors(extractor_key)
    n = library.vectors.shape[0]

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
        dim=library.vectors.shape[1],
        n_images=n,
        warm_started_from=previous,
    )
    try:
        say(
            f"Clustering {n} vectors ({library.vectors.shape[1]}-d) into K={k_value} with {algorithm}."
        )
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
    rows = list(
        Cluster.objects.filter(cluster_set=cluster_set)
        .order_by("index")
        .values_list("pk", "index", "centroid")
    )
    centers = vectors.stack((row[2] for row in rows), cluster_set.dim, count=len(rows))
    value = (centers, [row[0] for row in rows], [row[1] for row in rows])
    with _centers_lock:
        _centers_cache.clear()  # keep one set: sets are replaced, not used side by side
        _centers_cache[cluster_set.pk] = value
    return value


def _invalidate_centers_cache() -> None:
    with _centers_lock:
        _centers_cache.clear()


def assign_to_active_set(images: Iterable[StockImage]) -> int:
    """Put freshly embedded images into the nearest cluster of the active set, at once.

    The cluster's size grows; if the image's post was not in that cluster yet, its post count
    grows and each of the post's counted tags gains one post (once per post, as in a rebuild).
    Safe to call twice: an image already in the active set is left alone. Centres do not move
    until the next rebuild (the patent's batch update); returns how many images were assigned.
    """
    active = ClusterSet.objects.active()
    if active is None:
        return 0
    candidates = [
        image
        for image in images
        if image.feature_status == FeatureStatus.READY
        and image.extractor_key == active.extractor_key
        and image.vector is not None
    ]
    if not candidates:
        return 0
    centers, cluster_ids, _indexes = load_centers(active)
    matrix = vectors.stack(
        (image.vector for image in candidates), active.dim, count=len(candidates)
    )
    labels, sims = ranking.nearest_centers(matrix, centers)
    counted = imagetags_settings.COUNTED_TAG_SOURCES
    assigned = 0
    for image, label, sim in zip(candidates, labels, sims, strict=True):
        cluster_id = cluster_ids[int(label)]
        with transaction.atomic():
            # Lock the cluster row so two workers adding images of one post count it once.
            Cluster.objects.select_for_update().filter(pk=cluster_id).first()
            if ClusterMembership.objects.filter(cluster_set=active, image=image).exists():
                continue
            post_seen = ClusterMembership.objects.filter(
                cluster_id=cluster_id, image__post_id=image.post_id
            ).exists()
            ClusterMembership.objects.create(
                cluster_set=active, cluster_id=cluster_id, image=image, similarity=float(sim)
            )
            if post_seen:
                Cluster.objects.filter(pk=cluster_id).update(size=F("size") + 1)
            else:
                Cluster.objects.filter(pk=cluster_id).update(
                    size=F("size") + 1, post_count=F("post_count") + 1
                )
                tag_ids = set(
                    PostTag.objects.filter(post_id=image.post_id, source__in=counted).values_list(
                        "tag_id", flat=True
                    )
                )
                existing = set(
                    TagFrequency.objects.filter(
                        cluster_id=cluster_id, tag_id__in=tag_ids
                    ).values_list("tag_id", flat=True)
                )
                TagFrequency.objects.filter(cluster_id=cluster_id, tag_id__in=existing).update(
                    post_count=F("post_count") + 1
                )
                TagFrequency.objects.bulk_create(
                    [
                        TagFrequency(cluster_id=cluster_id, tag_id=tag_id, post_count=1)
                        for tag_id in tag_ids - existing
                    ]
                )
            ClusterSet.objects.filter(pk=active.pk).update(n_images=F("n_images") + 1)
            assigned += 1
    return assigned
