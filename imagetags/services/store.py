"""The bottom of the services: reading what the database holds, in the shapes the core needs.

Nothing here caches and nothing here imports another service except ``errors`` and ``vectors``;
every service above reads the library through these functions, so "which images are usable" and
"which tags count" are decided once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from django.db import connections, models, router, transaction
from django.db.models import Count, QuerySet

from imagetags.conf import imagetags_settings
from imagetags.models import Cluster, ClusterSet, FeatureStatus, StockImage
from imagetags.services import vectors
from imagetags.services.errors import ClusteringError

# Most float32 bytes one database read decodes at once (see rows_per_read).
READ_CHUNK_BYTES = 64 * 2**20


def read_centers(cluster_set: ClusterSet) -> tuple[np.ndarray, list[int], list[int]]:
    """(k, d) unit centres of a set, with their Cluster ids and indexes, read now (uncached:
    serving keeps its own copy, see ``services.serving``)."""
    rows = list(
        Cluster.objects.filter(cluster_set=cluster_set)
        .order_by("index")
        .values_list("pk", "index", "centroid")
    )
    centers = vectors.stack((row[2] for row in rows), cluster_set.dim, count=len(rows))
    return centers, [row[0] for row in rows], [row[1] for row in rows]


@dataclass
class LibraryVectors:
    image_ids: np.ndarray  # (n,) int64, ascending
    post_ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, d) float32, unit rows
    extractor_key: str


def ready_images(extractor_key: str) -> QuerySet[StockImage]:
    """The usable library of one extractor: READY vectors made with that key, by primary key."""
    return StockImage.objects.filter(
        feature_status=FeatureStatus.READY, extractor_key=extractor_key
    ).order_by("pk")


#: Ids per ``IN (...)`` list: under SQLite's historical limit of 999 parameters per statement,
#: far below every other backend's.
IDS_PER_QUERY = 500


def batched(items: Iterable, size: int = IDS_PER_QUERY) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
    queryset = ready_images(extractor_key)
    count, dim = library_shape(extractor_key)
    chunk_size = rows_per_read(dim, chunk_size)
    image_ids = np.empty(count, dtype=np.int64)
    post_ids = np.empty(count, dtype=np.int64)
    matrix = np.empty((count, dim), dtype=np.float32)
    n = 0
    rows = queryset.values_list("pk", "post_id", "vector").iterator(chunk_size=chunk_size)
    for chunk in batched(rows, chunk_size):
        chunk = chunk[: count - n]  # rows added since count(): leave them to the freshness path
        if not chunk:
            break
        stack_rows(chunk, dim, extractor_key, out=matrix[n : n + len(chunk)])
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
    queryset = ready_images(extractor_key)
    count = queryset.count()
    first = queryset.values_list("vector", flat=True).first() if count else None
    if first is None:
        raise ClusteringError(no_vectors_message(extractor_key))
    return count, vectors.stored_dim(first)


def library_ids(extractor_key: str, dim: int) -> LibraryVectors:
    """Ids and posts of the READY vectors, without the vectors (``vectors`` is (0, dim))."""
    pairs = np.fromiter(
        (
            value
            for row in ready_images(extractor_key)
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
    found = np.empty(len(image_ids), dtype=np.int64)
    matrix = np.empty((len(image_ids), dim), dtype=np.float32)
    n = 0
    for part in batched((int(pk) for pk in image_ids), rows_per_read(dim)):
        rows = list(ready_images(extractor_key).filter(pk__in=part).values_list("pk", "vector"))
        if rows:
            stack_rows(rows, dim, extractor_key, out=matrix[n : n + len(rows)])
            found[n : n + len(rows)] = [row[0] for row in rows]
            n += len(rows)
    return found[:n], matrix[:n]


def stack_rows(rows: Sequence[tuple], dim: int, extractor_key: str, out: np.ndarray) -> None:
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


def no_vectors_message(extractor_key: str) -> str:
    """Why there are no vectors to cluster, and what to run."""
    counts: dict[str, int] = defaultdict(int)
    for row in StockImage.objects.values("feature_status").annotate(n=Count("pk")):
        counts[row["feature_status"]] = row["n"]
    total = sum(counts.values())
    if total == 0:
        return "The library is empty: add images (e.g. `manage.py import_library manifest.jsonl`) first."
    # Stale is derived from the key: ready vectors of another extractor.
    stale = counts[FeatureStatus.READY] - ready_images(extractor_key).count()
    return (
        f"No feature vectors for the current extractor ({extractor_key}): "
        f"{counts[FeatureStatus.PENDING]} images pending, {stale} stale, "
        f"{counts[FeatureStatus.FAILED]} failed, of {total}. "
        "Run `manage.py compute_features` (or start a `manage.py qcluster` worker) first."
    )


def insert_rows(
    model: type[models.Model], columns: Sequence[str], rows: Iterable[Sequence]
) -> None:
    """Insert plain rows: ``COPY ... FROM STDIN`` on PostgreSQL (psycopg 3), elsewhere
    ``INSERT INTO ... (columns) VALUES (%s, ...)`` once per row, as one prepared statement run
    by ``executemany``. ``rows`` hold database-ready values (a foreign key as its id); no
    signals, no keys returned, as ``bulk_create`` on most backends.

    ``bulk_create`` builds a model instance per row and the SQL of each field of each row: a
    rebuild's memberships cost ~0.3 ms a row that way (most of its writing stage, two minutes
    at 1,000,000 images), a few microseconds this way (bench/search.py, docs/performance.md).
    """
    connection = connections[router.db_for_write(model)]
    meta = model._meta
    quote = connection.ops.quote_name
    names = ", ".join(quote(meta.get_field(name).column) for name in columns)
    table = quote(meta.db_table)
    batch = [list(row) for row in rows]
    if not batch:
        return
    # One transaction, as bulk_create's: in autocommit each row would commit on its own.
    with (
        transaction.atomic(using=connection.alias, savepoint=False),
        connection.cursor() as cursor,
    ):
        if connection.vendor == "postgresql" and hasattr(cursor.cursor, "copy"):
            # COPY: rows streamed in one statement, no per-row parse, bind and index round
            # trip of an INSERT (psycopg 3 adapts each value as it would a parameter).
            # Past Django's cursor wrapper: its error translation (IntegrityError, ...) kept.
            with (
                connection.wrap_database_errors,
                cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy,
            ):
                for row in batch:
                    copy.write_row(row)
        else:
            values = ", ".join(["%s"] * len(columns))
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({values})", batch)


def update_rows(
    model: type[models.Model],
    columns: Sequence[str],
    keys: Sequence[str],
    rows: Sequence[Sequence],
    *,
    add: bool = False,
) -> None:
    """``UPDATE ... SET column = %s ... WHERE key = %s ...`` once per row (``add``: ``column =
    column + %s``), as one prepared statement run by ``executemany``. ``rows`` hold the values
    (database-ready), then the key values.

    The ORM's ``bulk_update`` builds ``CASE WHEN pk = ... THEN ...`` expressions for every field
    and row (~1.5 ms per image in the feature pipeline's profile, as much as a MobileNet forward
    pass), and an ``update()`` per (cluster, tag) pair of an assignment would cost more than the
    batch's forward pass; one prepared statement costs a few microseconds per row. Increments
    (``add``) keep a concurrent assignment to the same rows.
    """
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    meta = model._meta
    quote = connection.ops.quote_name

    def column(name: str) -> str:
        return quote((meta.pk if name == "pk" else meta.get_field(name)).column)

    set_sql = ", ".join(
        f"{column(name)} = {column(name)} + %s" if add else f"{column(name)} = %s"
        for name in columns
    )
    where_sql = " AND ".join(f"{column(name)} = %s" for name in keys)
    sql = f"UPDATE {quote(meta.db_table)} SET {set_sql} WHERE {where_sql}"
    with connection.cursor() as cursor:
        cursor.executemany(sql, [list(row) for row in rows])
