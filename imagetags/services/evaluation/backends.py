"""The vector-search backends ``evaluate_suggestions --search`` measures against ``exact``.

Each backend is given as a *builder*: a context manager that loads one library's vectors (ids:
library row numbers) into a fresh engine, yields it, and removes whatever it made on the way out,
on error too. ``exact`` holds the whole library in one list of :class:`ExactSearch`: exact k-NN,
the reference; ``usearch`` builds its HNSW graph in memory (no file); ``pgvector`` loads the
vectors into a table of its own (a unique name, dropped afterwards) in a PostgreSQL database
that has the ``vector`` extension, reached through one of the site's Django connections.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from imagetags.search import ExactSearch, PgvectorSearch, UsearchSearch, VectorSearch
from imagetags.search.base import get_search_class
from imagetags.search.pgvector import Connect
from imagetags.services import engines
from imagetags.services.evaluation.data import EvaluationError

#: The backend every other one is measured against.
REFERENCE = "exact"
#: The depth at which the neighbours of a backend are compared with exact k-NN's (recall@50).
RECALL_DEPTH = 50
#: The evaluation's tables: ``imagetags_eval_`` and 16 random hex digits, never a served table.
TABLE_PREFIX = "imagetags_eval_"

#: Loads a library's (n, d) unit vectors under ids 0..n-1 into an engine, for one ``with`` block.
SearchBuilder = Callable[[np.ndarray], contextlib.AbstractContextManager[VectorSearch]]

PGVECTOR_INSTALL = (
    "install pgvector on the server (the PGDG or distribution package postgresql-<version>-pgvector, "
    "or the pgvector/pgvector container image), then run `CREATE EXTENSION vector;` in that "
    "database as a superuser"
)


@contextlib.contextmanager
def exact_search(vectors: np.ndarray) -> Iterator[ExactSearch]:
    """The whole library in one list: every query compares itself with every vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    yield ExactSearch.from_labels(
        vectors, np.zeros(vectors.shape[0], dtype=np.int64), centers=vectors[:1]
    )


def usearch_builder(*, exact_up_to: int | None = None, **options: Any) -> SearchBuilder:
    """An in-memory :class:`UsearchSearch` per library; ``options`` go to its constructor
    (``connectivity``, ``expansion_search``, ...). ``exact_up_to`` overrides the size up to which
    usearch compares a query with every vector instead of walking the graph (5,000 by default:
    below it the figures measure the f16 storage, not the graph)."""

    @contextlib.contextmanager
    def build(vectors: np.ndarray) -> Iterator[UsearchSearch]:
        search = UsearchSearch(int(np.shape(vectors)[1]), **options)
        if exact_up_to is not None:
            search.exact_up_to = exact_up_to
        search.add(np.arange(np.shape(vectors)[0]), vectors)
        yield search

    return build


def pgvector_builder(connect: Connect) -> SearchBuilder:
    """A :class:`PgvectorSearch` per library in a new table (binary COPY, then the HNSW index),
    dropped when the ``with`` block ends, whether it ends well or not."""

    @contextlib.contextmanager
    def build(vectors: np.ndarray) -> Iterator[PgvectorSearch]:
        vectors = np.asarray(vectors, dtype=np.float32)
        n = vectors.shape[0]
        table = f"{TABLE_PREFIX}{secrets.token_hex(8)}"
        search = PgvectorSearch.create(connect, table, vectors.shape[1])
        try:
            search.add(np.arange(n), vectors, np.zeros(n, dtype=np.int64))
            search.build_index()
            yield search
        except BaseException:
            # The error that stopped the evaluation is the one to see; a failed drop (the
            # server gone) must not replace it.
            with contextlib.suppress(Exception):
                search.drop()
            raise
        search.drop()

    return build


def check_pgvector(connect: Connect, where: str) -> None:
    """:class:`EvaluationError` unless the database ``connect`` reaches has the ``vector``
    extension (``where`` names the database in the message)."""
    try:
        conn = connect()
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = cursor.fetchone()
    except Exception as error:  # Django's and psycopg's errors share no base class
        raise EvaluationError(f"--search pgvector cannot reach {where}: {error}") from error
    if row is None:
        raise EvaluationError(
            f"--search pgvector needs the pgvector extension, and {where} does not have it: "
            f"{PGVECTOR_INSTALL}."
        )


def django_connect(alias: str) -> Connect:
    """The DB-API connection of Django's database ``alias`` for :class:`PgvectorSearch`, after
    checking that it is PostgreSQL, through psycopg 3, with the ``vector`` extension."""
    from django.db import connections

    if alias not in connections:
        raise EvaluationError(
            f"--search-database {alias!r} is not in DATABASES; name one of "
            f"{', '.join(connections)}."
        )
    connection = connections[alias]
    where = f"DATABASES[{alias!r}]"
    if connection.vendor != "postgresql":
        raise EvaluationError(
            f"--search pgvector needs a PostgreSQL database with the pgvector extension, and "
            f"{where} is {connection.vendor}. Give --search-database the alias of one in "
            f"DATABASES, or leave pgvector out of --search. To get one: {PGVECTOR_INSTALL}."
        )
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        raise EvaluationError(
            f"--search pgvector needs psycopg 3, and {where} runs on psycopg2: "
            "pip install 'django-imagetags[pgvector]'."
        )

    connect = engines.django_connect(alias)
    check_pgvector(connect, where)
    return connect


def search_builders(
    aliases: Sequence[str], *, database: str = "default"
) -> dict[str, SearchBuilder]:
    """A builder per alias (``imagetags.search.search_aliases()``), in the order given;
    :class:`EvaluationError` naming the fix for an unknown alias, a missing package, or (for
    ``pgvector``) a ``database`` alias that is not PostgreSQL with the extension."""
    builders: dict[str, SearchBuilder] = {}
    for alias in dict.fromkeys(aliases):
        try:
            get_search_class(alias)
        except (ValueError, ImportError) as error:
            raise EvaluationError(f"--search {alias}: {error}") from None
        if alias == "exact":
            builders[alias] = exact_search
        elif alias == "usearch":
            builders[alias] = usearch_builder()
        elif alias == "pgvector":
            builders[alias] = pgvector_builder(django_connect(database))
        else:
            raise EvaluationError(
                f"--search {alias}: evaluate_suggestions does not know how to build a "
                "throwaway index of this backend."
            )
    return builders
