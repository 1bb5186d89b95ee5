"""``PgvectorSearch``: the vectors in a PostgreSQL table, searched by pgvector's HNSW index.

One side table per extractor key and dimension (:func:`table_name`)::

    imagetags_vectors_<hash>(id bigint PRIMARY KEY, list integer, embedding halfvec(dim))

``halfvec`` stores float16, half the bytes of ``vector``; cosine similarities move by ~1e-3.
Bulk loads go through binary COPY (:meth:`PgvectorSearch.add` builds the COPY stream with NumPy,
no Python per row), and the HNSW index (``halfvec_cosine_ops``) is built once after the load
(:meth:`PgvectorSearch.build_index`): building it on a filled table is several times faster than
updating it row by row. Rows added once it exists are indexed by PostgreSQL as they arrive.

A query sets ``hnsw.ef_search`` for its own statement: pgvector's default (40) is also the most
rows an HNSW scan returns, so ``k`` = 80 would silently get 40. Above pgvector's ceiling (1000)
the scan goes on iteratively (``hnsw.iterative_scan``) so that ``k`` rows still come back.

No Django here (the ``search-pure`` contract): the search works on a ``connect`` callable that
returns an open psycopg 3 connection. The search never closes it; whoever made it owns it (the
services layer passes the thread's Django connection, a script its own). Each call that
changes the table runs in one transaction (``connection.transaction()``: a savepoint when the
caller's transaction is open); a search is one statement (:meth:`PgvectorSearch.nearest_sql`).

Files: the table *is* the store, so :meth:`~PgvectorSearch.save` and
:meth:`~PgvectorSearch.open` take a table name, not a file path. ``save(name)`` publishes the
table under ``name``, atomically replacing a table already there (a rebuild loads a fresh table,
indexes it, then saves it over the served one); ``open(name, connect=...)`` attaches to it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from imagetags.search.base import VectorSearch, padded, register

if TYPE_CHECKING:
    import os

    import psycopg

Connect = Callable[[], "psycopg.Connection"]

TABLE_PREFIX = "imagetags_vectors_"
# pgvector's limits: hnsw.ef_search is at most 1000; an HNSW index holds at most 4000 halfvec dims.
MAX_EF_SEARCH = 1000
MAX_INDEXED_DIM = 4000
# Rows per COPY chunk: ~5 MB of 512-d float16 rows, whatever the library size.
_COPY_ROWS = 5000
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def table_name(key: str, dim: int) -> str:
    """The side table of an extractor ``key`` at ``dim`` dimensions (a hash: keys may hold any
    character, identifiers may not)."""
    digest = hashlib.sha256(f"{key}\x00{dim}".encode()).hexdigest()[:16]
    return f"{TABLE_PREFIX}{digest}"


def _checked(name: str) -> str:
    """``name`` if it is a plain lower-case identifier (it is put in SQL as it is)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"Not a table name pgvector search can use: {name!r}.")
    return name


def _copy_rows(ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The rows of a binary COPY (id bigint, list integer, embedding halfvec) as one
    structured array: PostgreSQL's tuple format, big-endian, a length before each field."""
    n, dim = vectors.shape
    row = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"),
            ("id", ">i8"),
            ("list_len", ">i4"),
            ("list", ">i4"),
            ("vec_len", ">i4"),
            ("dim", ">u2"),
            ("unused", ">u2"),  # halfvec's binary form: dim, a zero, then the float16 values
            ("embedding", ">f2", (dim,)),
        ]
    )
    out = np.empty(n, dtype=row)
    out["fields"] = 3
    out["id_len"] = 8
    out["id"] = ids
    out["list_len"] = 4
    out["list"] = lists
    out["vec_len"] = 4 + 2 * dim
    out["dim"] = dim
    out["unused"] = 0
    out["embedding"] = vectors
    return out


@functools.lru_cache(maxsize=8)
def _literal_format(dim: int) -> str:
    # %.9g: every float32 exactly (so PostgreSQL rounds to float16 as NumPy would), in one
    # C-level formatting call: 0.16 ms for 512 values, a third of repr-and-join.
    return "[" + ",".join(["%.9g"] * dim) + "]"


def _literal(vector: np.ndarray) -> str:
    """pgvector's text form of a float32 vector (``[0.1,0.2,...]``). Text, not a binary
    parameter: Django's psycopg cursors bind parameters client-side, which has no binary form."""
    return _literal_format(vector.shape[0]) % tuple(vector.tolist())


@register
class PgvectorSearch(VectorSearch):
    """Cosine k-NN over a PostgreSQL table with pgvector's HNSW index."""

    alias = "pgvector"

    def __init__(
        self, connect: Connect, table: str, dim: int, *, ef_search: int | None = None
    ) -> None:
        """A search over the existing ``table`` (see :meth:`create` and :meth:`open`).
        ``ef_search``: the HNSW candidate list of a query (at least its ``k``; None: 40,
        pgvector's default): more finds more of the true neighbours, at more cost."""
        self.connect = connect
        self.table = _checked(table)
        self.dim = int(dim)
        self.ef_search = ef_search

    # --- tables -----------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor]:
        conn = self.connect()
        with conn.transaction(), conn.cursor() as cursor:
            yield cursor

    @classmethod
    def create(
        cls, connect: Connect, table: str, dim: int, *, replace: bool = False
    ) -> PgvectorSearch:
        """Create an empty ``table`` for ``dim``-d vectors (``replace``: drop one already
        there; otherwise an existing table is an error). Needs the ``vector`` extension."""
        if not 0 < dim <= MAX_INDEXED_DIM:
            raise ValueError(
                f"pgvector indexes 1 to {MAX_INDEXED_DIM} halfvec dimensions, not {dim}."
            )
        search = cls(connect, table, dim)
        with search._cursor() as cursor:
            if replace:
                cursor.execute(f"DROP TABLE IF EXISTS {search.table}")
            cursor.execute(
                f"CREATE TABLE {search.table} "
                f"(id bigint PRIMARY KEY, list integer NOT NULL, embedding halfvec({dim}) NOT NULL)"
            )
        return search

    @classmethod
    def from_arrays(
        cls,
        connect: Connect,
        table: str,
        vectors: np.ndarray,
        lists: np.ndarray,
        ids: np.ndarray,
        *,
        replace: bool = False,
    ) -> PgvectorSearch:
        """A filled, indexed table: create, load by COPY, then build the index."""
        search = cls.create(connect, table, int(np.shape(vectors)[1]), replace=replace)
        search.add(ids, vectors, lists)
        search.build_index()
        return search

    def build_index(self, m: int = 16, ef_construction: int = 128) -> None:
        """Build the HNSW index: ``m`` links per node (pgvector's default 16; the engines pass
        ``hnsw_connectivity`` of the library's size), and ``ef_construction`` 128 (its default
        is 64), as usearch's graph is built. At 100,000 library vectors of CNN-like structure,
        recall@50 at ef_search 80 went from 0.930 to 0.958 for a build 1.8× as long
        (docs/performance.md §6). Call it after the bulk load; a no-op when the index exists."""
        with self._cursor() as cursor:
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS {self.table}_hnsw ON {self.table} "
                f"USING hnsw (embedding halfvec_cosine_ops) "
                f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
            )

    def index_connectivity(self) -> int | None:
        """The ``m`` the table's HNSW index was built with (None: no index yet)."""
        with self._cursor() as cursor:
            cursor.execute(
                "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relname = %s AND n.nspname = current_schema()",
                (f"{self.table}_hnsw",),
            )
            row = cursor.fetchone()
        if row is None:
            return None
        options = dict(option.split("=", 1) for option in row[0] or [])
        return int(options.get("m", 16))  # an index built with no options has pgvector's 16

    def rebuild_index(self, m: int, ef_construction: int = 128) -> None:
        """Build the HNSW index again with ``m`` (for a graph too sparse for the library it has
        grown into), beside the old one, which serves every search until the new one replaces
        it. On a connection outside a transaction (the worker's) the build is ``CONCURRENTLY``,
        so new members can be inserted meanwhile (at 1,000,000 vectors the m 16 build took 16
        minutes here);
        inside one (a test's) it is a plain build, which holds off writes until it commits."""
        from psycopg.pq import TransactionStatus

        conn = self.connect()
        concurrently = conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE
        with conn.cursor() as cursor:
            cursor.execute(f"DROP INDEX IF EXISTS {self.table}_hnsw_next")  # a build cut short
            cursor.execute(
                f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}{self.table}_hnsw_next "
                f"ON {self.table} USING hnsw (embedding halfvec_cosine_ops) "
                f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
            )
        with self._cursor() as cursor:  # the swap: one short transaction
            cursor.execute(f"DROP INDEX IF EXISTS {self.table}_hnsw")
            cursor.execute(f"ALTER INDEX {self.table}_hnsw_next RENAME TO {self.table}_hnsw")

    def drop(self) -> None:
        """Delete the table (and its index)."""
        with self._cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {self.table}")

    # --- contents ---------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
        """Insert rows by binary COPY (an id already held is an error: the primary key)."""
        ids = np.asarray(ids, dtype=np.int64)
        lists = np.asarray(lists, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        with (
            self._cursor() as cursor,
            cursor.copy(
                f"COPY {self.table} (id, list, embedding) FROM STDIN WITH (FORMAT binary)"
            ) as copy,
        ):
            copy.write(_COPY_HEADER)
            for start in range(0, ids.shape[0], _COPY_ROWS):
                stop = start + _COPY_ROWS
                chunk = _copy_rows(ids[start:stop], vectors[start:stop], lists[start:stop])
                copy.write(chunk.tobytes())
            copy.write(_COPY_TRAILER)

    def remove(self, ids: np.ndarray) -> None:
        with self._cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {self.table} WHERE id = ANY(%s)",
                (np.asarray(ids, dtype=np.int64).tolist(),),
            )

    def __len__(self) -> int:
        with self._cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {self.table}")
            (count,) = cursor.fetchone()
        return int(count)

    # --- queries ----------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, k: int, probes: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``probes`` is ignored: the HNSW graph spans every list (lists are an inverted-file
        notion; the ``list`` column is kept for filters and for rebuilding an ExactSearch)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        found: list[tuple[np.ndarray, np.ndarray]] = []
        with self._statement() as cursor:
            for query in queries:
                if k <= 0:
                    found.append((np.empty(0, np.int64), np.empty(0, np.float32)))
                    continue
                cursor.execute(*self.nearest_sql(query, k))
                rows = cursor.fetchall()
                ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                distances = np.fromiter((row[1] for row in rows), dtype=np.float64, count=len(rows))
                found.append((ids, (1.0 - distances).astype(np.float32)))
        return padded(found)

    def search_joined(
        self, query: np.ndarray, k: int, *, columns: str, joins: str, params: Sequence[object]
    ) -> list[tuple]:
        """The ``k`` nearest rows to one ``query``, joined to the caller's tables in the same
        statement: ``(id, similarity, *columns)``, most similar first. ``columns`` and
        ``joins`` are SQL of the caller's own making (never user input) that refer to the
        found rows as ``nearest.id``; ``params`` fill the ``%s`` in ``joins``. One round trip
        where a search and a lookup of what the ids stand for would take two."""
        if k <= 0:
            return []
        sql, nearest_params = self.nearest_sql(np.asarray(query, dtype=np.float32), k)
        with self._statement() as cursor:
            # MATERIALIZED: the HNSW scan with its LIMIT runs as planned alone, whatever the
            # joins (the planner could otherwise push them into it and lose the index order).
            cursor.execute(
                f"WITH nearest AS MATERIALIZED ({sql}) "
                f"SELECT nearest.id, 1 - nearest.distance, {columns} FROM nearest {joins} "
                f"ORDER BY nearest.distance, nearest.id",
                (*nearest_params, *params),
            )
            return cursor.fetchall()

    def nearest_sql(self, query: np.ndarray, k: int) -> tuple[str, tuple[object, ...]]:
        """One statement for the ``k`` nearest rows ``(id, distance)`` to ``query``, with its
        search effort. ``hnsw.ef_search`` is set by ``set_config(..., is_local)`` in an
        uncorrelated sub-select, which PostgreSQL runs as a one-time filter before the index
        scan starts: the scan reads the value, and it lasts to the end of the transaction (this
        statement's own in autocommit). That is one round trip, where ``SET LOCAL`` needs a
        transaction block: BEGIN, SET, SELECT, COMMIT. pgvector's default ef_search (40) is also
        the most rows a scan returns, so it is at least ``k``; above pgvector's ceiling (1000)
        the scan goes on iteratively so that ``k`` rows still come back."""
        ef_search = min(MAX_EF_SEARCH, max(self.ef_search or 40, k))
        settings = f"set_config('hnsw.ef_search', '{ef_search}', true)"  # an int made here
        if k > ef_search:
            settings += " || set_config('hnsw.iterative_scan', 'strict_order', true)"
        return (
            f"SELECT id, embedding <=> %s::halfvec AS distance FROM {self.table} "
            f"WHERE (SELECT {settings}) IS NOT NULL ORDER BY distance LIMIT %s",
            (_literal(query), int(k)),
        )

    @contextmanager
    def _statement(self) -> Iterator[psycopg.Cursor]:
        """A cursor for searches: on an autocommit connection outside a transaction (Django's,
        outside ``atomic``) no transaction block, as each statement is one; otherwise a
        transaction of its own, a savepoint inside the caller's, so that a failed search (a
        table dropped meanwhile) does not abort the caller's work."""
        from psycopg.pq import TransactionStatus

        conn = self.connect()
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            with conn.cursor() as cursor:
                yield cursor
        else:
            with conn.transaction(), conn.cursor() as cursor:
                yield cursor

    # --- "files": table names ---------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Publish this table under the name ``path``, atomically replacing a table of that
        name (one transaction: a concurrent query sees the old table or the new one)."""
        target = _checked(str(path))
        if target == self.table:
            return
        with self._cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {target}")
            cursor.execute(f"ALTER TABLE {self.table} RENAME TO {target}")
            cursor.execute(f"ALTER INDEX IF EXISTS {self.table}_hnsw RENAME TO {target}_hnsw")
        self.table = target

    @classmethod
    def open(cls, path: str | os.PathLike, *, connect: Connect | None = None) -> PgvectorSearch:
        """The search over the existing table named ``path`` (its dimension read from the
        column type); a missing table is a ``LookupError`` that names it."""
        if connect is None:
            raise TypeError(
                "PgvectorSearch.open needs connect=: a callable returning a connection."
            )
        table = _checked(str(path))
        conn = connect()
        with conn.transaction(), conn.cursor() as cursor:
            # atttypmod of a halfvec(dim) column is its dim.
            cursor.execute(
                "SELECT a.atttypmod FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding' "
                "AND NOT a.attisdropped",
                (table,),
            )
            row = cursor.fetchone()
        if row is None:
            raise LookupError(
                f"No pgvector search table {table!r} in this database: build it "
                "(PgvectorSearch.create / from_arrays, or a rebuild) before opening it."
            )
        return cls(connect, table, int(row[0]))
