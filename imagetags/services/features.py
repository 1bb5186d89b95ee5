"""Computing and storing the feature vectors of library images.

Every vector is stored with the key of the extractor that made it. Staleness is derived, never
stored: a vector is usable exactly when its row is ``ready`` and its key equals the configured
extractor's (:func:`ready_images`). A key change therefore writes nothing: vectors of the old key
are simply not read (``compute_features --stale`` recomputes them), and switching the setting back
makes every one of them usable again at once. Every reader filters by status *and* key, so
vectors of two extractors are never mixed.

:func:`compute_features` embeds and stores, nothing more: it is the first step of the pipeline
that ``imagetags.tasks.run_feature_pipeline`` chains (embed → assign → auto-tag), which the
django-q2 task (one id) and the ``compute_features`` command (thousands of ids) both run, handing
the later steps in as ``on_ready``. It is idempotent, so a task delivered twice stores one vector,
and it never deletes an image row: a file that cannot be read marks its row ``failed`` with a
reason a person can act on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from django.db import connections, router, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from PIL import Image

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage
from imagetags.models import FeatureStatus, StockImage
from imagetags.services import vectors
from imagetags.services.extractors import FeatureExtractor, get_extractor
from imagetags.services.store import batched, update_rows

logger = logging.getLogger(__name__)

SelectMode = Literal["missing", "stale", "all"]
# Called with the rows of one stored batch that got a vector, and the extractor key, once they
# are committed (the pipeline's next steps: imagetags.tasks.after_vectors_stored).
OnReady = Callable[[list[StockImage], str], None]
SELECT_MODES: tuple[str, ...] = ("missing", "stale", "all")

# Two decoding threads keep the next batch decoding while the model embeds the current one; more
# would only compete with the model's own threads for the same cores.
DECODE_THREADS = 2

# Columns compute_features writes, in one executemany per batch (see _write_rows).
_WRITTEN_FIELDS = [
    "vector",
    "extractor_key",
    "feature_status",
    "feature_error",
    "feature_attempts",
    "features_updated",
]


@dataclass
class FeatureRunSummary:
    """What one :func:`compute_features` run did."""

    extractor_key: str = ""
    ready: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    #: (image id, message) for every image that failed, in the order they were processed.
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def processed(self) -> int:
        """Images the model was asked about (ready + failed); skipped ones are not counted."""
        return self.ready + self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (django-q2 stores task results; commands may print it)."""
        return {
            "extractor_key": self.extractor_key,
            "ready": self.ready,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "errors": [[image_id, message] for image_id, message in self.errors],
        }


# --- selecting -------------------------------------------------------------------------------


def ready_images(extractor_key: str) -> QuerySet[StockImage]:
    """Images whose stored vector was made by ``extractor_key`` and is current."""
    return StockImage.objects.filter(
        feature_status=FeatureStatus.READY, extractor_key=extractor_key
    )


def read_vectors(
    image_ids: Iterable[int], extractor_key: str, dim: int | None = None
) -> tuple[list[int], np.ndarray]:
    """The current vectors of ``image_ids`` for ``extractor_key``: (ids found, (n, dim) matrix).

    Images without a ready vector of that key are left out (the ids say which rows are which),
    so a caller can never get a vector of another extractor by accident.
    """
    rows = list(
        ready_images(extractor_key)
        .filter(pk__in=list(image_ids))
        .order_by("pk")
        .values_list("pk", "vector")
    )
    if not rows:
        return [], np.empty((0, dim or 0), dtype=np.float32)
    if dim is None:
        dim = vectors.from_bytes(rows[0][1]).shape[0]
    matrix = vectors.stack((vector for _pk, vector in rows), dim, count=len(rows))
    return [pk for pk, _vector in rows], matrix


def other_key_images(extractor_key: str) -> QuerySet[StockImage]:
    """Images with a ready vector made by another extractor: stale for ``extractor_key``.

    Derived from the key on every call, never stored, so it is undone by switching back.
    """
    return StockImage.objects.filter(feature_status=FeatureStatus.READY).exclude(
        extractor_key=extractor_key
    )


def waiting_for_vector(extractor_key: str) -> Q:
    """Images still waiting for a usable vector of ``extractor_key``: never computed yet, or
    holding only another extractor's vector."""
    return Q(feature_status=FeatureStatus.PENDING) | (
        Q(feature_status=FeatureStatus.READY) & ~Q(extractor_key=extractor_key)
    )


def select_images(mode: SelectMode, extractor_key: str) -> QuerySet[StockImage]:
    """Images a ``compute_features`` run in ``mode`` should look at.

    - ``missing``: never computed (pending), or failed fewer than ``MAX_FEATURE_ATTEMPTS`` times;
    - ``stale``: ready vectors made by another extractor (:func:`other_key_images`);
    - ``all``: every image (with ``force``, a full recompute).
    """
    images = StockImage.objects.order_by("pk")
    if mode == "missing":
        return images.filter(
            Q(feature_status=FeatureStatus.PENDING)
            | Q(
                feature_status=FeatureStatus.FAILED,
                feature_attempts__lt=imagetags_settings.MAX_FEATURE_ATTEMPTS,
            )
        )
    if mode == "stale":
        return other_key_images(extractor_key).order_by("pk")
    if mode == "all":
        return images
    raise ValueError(f"Unknown mode {mode!r}: choose one of {', '.join(SELECT_MODES)}.")


# --- computing -------------------------------------------------------------------------------


@dataclass
class _Decoded:
    image: Image.Image | None = None
    error: str = ""


@dataclass
class _Batch:
    size: int  # ids asked for, including skipped ones (for progress)
    rows: list[StockImage]  # rows to embed
    decoded: list[Future[_Decoded]]


def _decode(storage: Any, name: str, extractor: FeatureExtractor) -> _Decoded:
    """Open one stored file and shrink it to the model input (runs in a decoding thread).

    Shrinking here, not in the main thread, is what lets decoding overlap inference, and it keeps
    two batches of possibly 40-megapixel images from sitting in memory at once. ``prepare`` of an
    already-sized image is a no-op, so ``embed_batch`` later gives exactly the same vector.
    """
    try:
        with storage.open(name, "rb") as fh:
            rgb = extractor.open_image(fh)
        prepared = extractor.prepare(rgb)
        if isinstance(prepared, np.ndarray) and prepared.dtype == np.uint8 and prepared.ndim == 3:
            rgb = Image.fromarray(prepared, "RGB")
        return _Decoded(image=rgb)
    except InvalidImage as exc:
        return _Decoded(error=str(exc))
    except FileNotFoundError:
        return _Decoded(error=f"The file {name!r} is missing from storage.")
    except Exception as exc:  # any decoder failure fails this image only
        return _Decoded(error=f"The image could not be read: {type(exc).__name__}: {exc}")


def _id_list(images: Iterable[int] | QuerySet[StockImage]) -> list[int]:
    if isinstance(images, QuerySet):
        ids: Iterable[int] = images.order_by("pk").values_list("pk", flat=True)
    else:
        ids = (getattr(item, "pk", item) for item in images)
    return list(dict.fromkeys(int(pk) for pk in ids))  # de-duplicated, order kept


def compute_features(
    image_ids_or_queryset: Iterable[int] | QuerySet[StockImage],
    *,
    extractor: FeatureExtractor | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
    on_ready: OnReady | None = None,
) -> FeatureRunSummary:
    """Embed the given images and store their vectors; returns counts and errors.

    - An image already ready with this extractor's key is skipped unless ``force``.
    - A three-stage pipeline keeps the model busy: two threads decode and resize batch n + 1
      while a model thread embeds batch n and this thread stores batch n - 1 (one
      ``executemany`` per batch, then ``on_ready``). Inside a transaction the model
      runs in this thread instead (see ``overlap`` below). Every database query stays in this
      thread.
    - A file that cannot be opened marks its image ``failed`` with the reason; an exception from
      the model marks the whole batch ``failed``; either way the run goes on, and no row is ever
      deleted. ``feature_attempts`` grows by one for every image that was tried.
    - A row whose file changed while it was being embedded keeps its new state (a new task is
      already queued for it) and is counted as skipped.
    - ``on_ready(rows, key)`` is called after each stored batch with its rows that got a
      vector (committed already), while the model embeds the next batch; without it, nothing
      but the vectors is written (the pipeline in ``imagetags.tasks`` passes the next steps).

    ``progress(n_done)`` is called after each batch with the number of images handled so far
    (skipped ones included). Failing to load the extractor raises before any row is touched.
    """
    started = time.perf_counter()
    extractor = extractor or get_extractor()
    key = extractor.key
    summary = FeatureRunSummary(extractor_key=key)
    ids = _id_list(image_ids_or_queryset)
    batch_size = max(1, int(batch_size or imagetags_settings.BATCH_SIZE))
    done = 0

    storage = StockImage._meta.get_field("image").storage
    loaded = False
    # Inside a caller's transaction (a test, an atomic import) the model runs in this thread:
    # other connections cannot see the transaction's rows, and an extractor may read them.
    overlap = not transaction.get_connection(router.db_for_write(StockImage)).in_atomic_block
    with (
        ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="imagetags-decode") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="imagetags-embed") as model_thread,
    ):

        def start_batch(batch_ids: list[int]) -> _Batch:
            # Database reads stay in this thread: a test's transaction (and SQLite's locking)
            # is per connection, and only the files are read by the pool.
            rows = list(StockImage.objects.filter(pk__in=batch_ids).defer("vector").order_by("pk"))
            summary.skipped += len(batch_ids) - len(rows)  # deleted since they were selected
            todo = [row for row in rows if force or not _is_current(row, key)]
            summary.skipped += len(rows) - len(todo)
            futures = [pool.submit(_decode, storage, row.image.name, extractor) for row in todo]
            return _Batch(size=len(batch_ids), rows=todo, decoded=futures)

        def finish(batch: _Batch, embedding: Future[_Embedded]) -> None:
            nonlocal done
            ready = _process_batch(batch, embedding.result(), key, summary)
            if ready and on_ready is not None:
                on_ready(ready, key)
            done += batch.size
            if progress is not None:
                progress(done)

        # A three-stage pipeline: while the model embeds batch n (in its own thread: TensorFlow
        # and TFLite release the GIL), this thread stores batch n - 1 (database writes, the
        # on_ready's steps) and the decoding threads read batch n + 1's files.
        ahead: _Batch | None = None
        embedding: tuple[_Batch, Future[_Embedded]] | None = None
        for batch_ids in [*batched(ids, batch_size), None]:
            following = start_batch(batch_ids) if batch_ids is not None else None
            if ahead is not None:
                if ahead.rows and not loaded:
                    # Loaded before any row is written: a broken configuration must raise, not
                    # burn the attempts of every image it is asked about.
                    extractor.load()
                    loaded = True
                if overlap:
                    submitted = model_thread.submit(_embed_batch, ahead, extractor)
                else:
                    submitted = Future()
                    submitted.set_result(_embed_batch(ahead, extractor))
                if embedding is not None:
                    finish(*embedding)
                embedding = (ahead, submitted)
            ahead = following
        if embedding is not None:
            finish(*embedding)
    summary.seconds = time.perf_counter() - started
    return summary


def _is_current(row: StockImage, key: str) -> bool:
    return row.feature_status == FeatureStatus.READY and row.extractor_key == key


@dataclass
class _Embedded:
    """What the model thread hands back for one batch: a vector or an error per image."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


def _embed_batch(batch: _Batch, extractor: FeatureExtractor) -> _Embedded:
    """Wait for a batch's decoded images and embed them (runs in the model thread; no database)."""
    result = _Embedded()
    good: list[tuple[StockImage, Image.Image]] = []
    for row, future in zip(batch.rows, batch.decoded, strict=True):
        decoded = future.result()
        if decoded.image is None:
            result.errors[row.pk] = decoded.error
        else:
            good.append((row, decoded.image))
    if not good:
        return result
    try:
        matrix = extractor.embed_batch([image for _row, image in good])
        if matrix.shape != (len(good), extractor.dim):
            raise ValueError(
                f"the extractor returned shape {matrix.shape}, "
                f"expected ({len(good)}, {extractor.dim})"
            )
    except Exception as exc:  # recorded on the rows; the run goes on
        logger.exception("Feature extraction failed for a batch of %d images", len(good))
        for row, _image in good:
            result.errors[row.pk] = f"Feature extraction failed: {type(exc).__name__}: {exc}"
    else:
        result.vectors = {
            row.pk: vector for (row, _image), vector in zip(good, matrix, strict=True)
        }
    return result


def _process_batch(
    batch: _Batch, embedded: _Embedded, key: str, summary: FeatureRunSummary
) -> list[StockImage]:
    """Store one embedded batch, vectors or failures; returns the rows that got a vector.

    Runs in the calling thread, the only one that touches the database. (Fault-injection tests
    wrap this function by name to stop a worker before it writes anything.)
    """
    if not batch.rows:
        return []
    errors = embedded.errors
    now = timezone.now()
    ready: list[StockImage] = []
    with transaction.atomic():
        # Re-read each row under a lock (PostgreSQL; SQLite serialises writers anyway): if its
        # file changed while we were embedding, our vector describes the old file, and if another
        # worker stored a current vector meanwhile, ours would only bump its attempts again.
        current = {
            pk: (sha256, status, extractor_key)
            for pk, sha256, status, extractor_key in StockImage.objects.select_for_update()
            .filter(pk__in=[row.pk for row in batch.rows])
            .values_list("pk", "sha256", "feature_status", "extractor_key")
        }
        to_write: list[StockImage] = []
        for row in batch.rows:
            state = current.get(row.pk)
            if state is None or state[0] != row.sha256:
                summary.skipped += 1  # deleted, or a new file with its own task queued
                continue
            if not _is_current(row, key) and state[1:] == (FeatureStatus.READY, key):
                summary.skipped += 1  # a concurrent run finished it first
                continue
            row.feature_attempts += 1
            if row.pk in embedded.vectors:
                row.vector = vectors.to_bytes(embedded.vectors[row.pk])
                row.extractor_key = key
                row.feature_status = FeatureStatus.READY
                row.feature_error = ""
                row.features_updated = now
                ready.append(row)
                summary.ready += 1
            else:
                # A failed image keeps no vector: whatever was there described a file or an
                # extractor that is no longer current.
                row.vector = None
                row.extractor_key = ""
                row.feature_status = FeatureStatus.FAILED
                row.feature_error = errors[row.pk]
                summary.failed += 1
                summary.errors.append((row.pk, errors[row.pk]))
                logger.warning("Features of StockImage %s failed: %s", row.pk, errors[row.pk])
            to_write.append(row)
        if to_write:
            _write_rows(to_write)
    return ready


def _write_rows(rows: list[StockImage]) -> None:
    """Save the computed columns of ``rows`` in one prepared UPDATE (``store.update_rows``): the
    same effect as ``bulk_update(rows, _WRITTEN_FIELDS)`` (no signals, no ``save()``), at a few
    microseconds per row instead of ~1.5 ms."""
    connection = connections[router.db_for_write(StockImage)]
    meta = StockImage._meta
    fields = [meta.get_field(name) for name in _WRITTEN_FIELDS]
    update_rows(
        StockImage,
        _WRITTEN_FIELDS,
        ("pk",),
        [
            [f.get_db_prep_save(getattr(row, f.attname), connection) for f in fields]
            + [meta.pk.get_db_prep_value(row.pk, connection)]
            for row in rows
        ],
    )
