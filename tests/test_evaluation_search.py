"""evaluate_suggestions --search: vector-search backends measured against exact k-NN.

The measurement itself is checked both ways: exact against itself agrees on every query, and an
engine that misses neighbours (half the library, or a crippled HNSW graph) scores less. usearch
runs on the evaluation's real pipeline data (tests/test_evaluation.py's library, embedded by the
real extractor); pgvector on the embedded PostgreSQL 18 + pgvector of the ``pgvector_url``
fixture, through the service function and through a Django database alias."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from imagetags.core.voting import VoteParams
from imagetags.search import ExactSearch, UsearchSearch, VectorSearch
from imagetags.services.evaluation import (
    RECALL_DEPTH,
    EvaluationError,
    ImageSet,
    LibraryModel,
    check_pgvector,
    evaluate_backends,
    exact_search,
    fit_cluster_model,
    pgvector_builder,
    usearch_builder,
)
from imagetags.services.evaluation.backends import TABLE_PREFIX
from imagetags.services.library import ManifestEntry
from tests.conftest import PROJECT_ROOT
from tests.test_evaluation import small_library  # noqa: F401 (a fixture)
from tests.vector_data import structured_vectors

VOTING = VoteParams()  # the VOTING setting's defaults: 20 neighbours, T=0.05, prior 0.1
# The variables that make tests/settings.py choose PostgreSQL, or name another database file.
# The site the subprocess is: SQLite, the default search (.ci/run's pgvector pass sets both).
SQLITE_UNLESS = ("IMAGETAGS_TEST_DATABASE_URL", "IMAGETAGS_TEST_DB", "IMAGETAGS_TEST_SEARCH")
AGREEMENT = {f"recall_at_{RECALL_DEPTH}", "same_top_k_set", "same_top_k_order", "build_seconds"}


def evaluate(*args: str) -> dict:
    out = StringIO()
    call_command("evaluate_suggestions", *args, "--json", stdout=out)
    return json.loads(out.getvalue())


# --- an engine that misses neighbours on purpose ----------------------------------------------


class HalfLibrarySearch(ExactSearch):
    """Exact search over the even-numbered library images only: half of every true
    neighbourhood is missing."""

    @classmethod
    def building(cls, vectors: np.ndarray) -> contextlib.AbstractContextManager[VectorSearch]:
        even = np.arange(0, vectors.shape[0], 2)
        search = cls.from_labels(
            vectors[even], np.zeros(even.shape[0], np.int64), vectors[:1], ids=even
        )
        return contextlib.nullcontext(search)


def structured_library(n: int, *, seed: int, prefix: str) -> ImageSet:
    """``n`` images, one post each, with vectors that have neighbours (tests/vector_data.py) and
    tags that follow them: the three strongest coordinates of each vector, and two of a small
    vocabulary at random (so that different neighbours vote for different tags)."""
    vectors = structured_vectors(n, 32, topics=30, cosine=0.6, seed=seed)
    rng = np.random.default_rng(seed)
    vocabulary = [f"w{i}" for i in range(20)]
    posts = [f"{prefix}{i}" for i in range(n)]
    tags = {
        post: frozenset(
            [f"d{d}" for d in np.argsort(-vectors[i])[:3]]
            + list(rng.choice(vocabulary, 2, replace=False))
        )
        for i, post in enumerate(posts)
    }
    return ImageSet(
        entries=[ManifestEntry(line=i + 1, path=f"{i}.jpg") for i in range(n)],
        sha256=[f"{prefix}{i}" for i in range(n)],
        posts=posts,
        post_tags=tags,
        vectors=vectors,
    )


@pytest.fixture(scope="module")
def structured() -> tuple[LibraryModel, ImageSet]:
    library = structured_library(1_500, seed=3, prefix="library")
    clusters = fit_cluster_model(
        library, 20, algorithm="kmeans", seed=0, batch_size=1024, max_iter=50, tol=1e-4
    )
    # Other vectors around the same topics (another n draws other noise), tagged alike.
    queries = structured_library(120, seed=3, prefix="query")
    return LibraryModel.build(library, clusters), queries


def test_exact_agrees_with_itself_and_engines_that_miss_neighbours_score_less(structured) -> None:
    model, queries = structured
    crippled = usearch_builder(exact_up_to=0, connectivity=2, expansion_add=2, expansion_search=1)

    results = evaluate_backends(
        model,
        queries,
        k=5,
        voting=VOTING,
        builders={"exact": exact_search, "half": HalfLibrarySearch.building, "bad": crippled},
    )

    exact, half, bad = results["exact"], results["half"], results["bad"]
    assert exact.recall.shape == (120,)
    assert exact.recall.min() == 1.0 and exact.same_set.all() and exact.same_order.all()
    # Half of each true 50 is held by the half-library engine: about half is found.
    assert 0.3 < half.recall.mean() < 0.7
    assert half.same_set.mean() < 0.9 and half.same_order.mean() <= half.same_set.mean()
    assert bad.recall.mean() < 0.95
    assert bad.same_set.mean() < 1.0


def test_usearch_in_memory_matches_exact_on_structured_vectors(structured) -> None:
    model, queries = structured

    results = evaluate_backends(
        model, queries, k=5, voting=VOTING, builders={"usearch": usearch_builder(exact_up_to=0)}
    )

    usearch = results["usearch"]
    assert usearch.recall.mean() >= 0.95  # the HNSW graph itself, not usearch's brute force
    assert usearch.same_set.mean() >= 0.9


# --- the command, on the evaluation's real pipeline data ---------------------------------------


@pytest.mark.slow
@pytest.mark.django_db
def test_search_reports_each_backend_like_a_method(small_library: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ("--library", str(small_library), "--clusters", "2", "--k", "3")
    args += ("--cache", str(tmp_path / "cache"))

    report = evaluate(*args, "--folds", "3", "--search", "exact,usearch", "--search", "exact")

    search = report["search"]
    assert search["reference"] == "exact" and search["recall_depth"] == RECALL_DEPTH
    assert search["target_agreement"] == "same_top_k_set"
    assert list(search["backends"]) == ["exact", "usearch"]  # in the order asked, once each
    for scores in search["backends"].values():
        assert set(scores) >= set(report["methods"]["vote"]) | AGREEMENT
    exact, usearch = search["backends"]["exact"], search["backends"]["usearch"]
    assert exact[f"recall_at_{RECALL_DEPTH}"] == 1.0 and exact["same_top_k_set"] == 1.0
    assert exact["same_top_k_order"] == 1.0
    # A library smaller than 50: every vector is among the 50 nearest, usearch returns them all.
    assert usearch[f"recall_at_{RECALL_DEPTH}"] == 1.0
    # exact is ivf's voting over the whole library: the vote method.
    assert exact["p_at_k"] == pytest.approx(report["methods"]["vote"]["p_at_k"])
    assert all(set(fold["search"]) == {"exact", "usearch"} for fold in report["per_fold"])

    out = StringIO()
    call_command(
        "evaluate_suggestions", *args, "--holdout", "0.3", "--search", "usearch", stdout=out
    )
    text = out.getvalue()
    assert f"recall@{RECALL_DEPTH}" in text and "same top-3 set" in text
    assert "\nusearch " in text


@pytest.mark.django_db
def test_pgvector_on_sqlite_is_refused(small_library: Path) -> None:  # noqa: F811
    from django.db import connection

    if connection.vendor != "sqlite":  # .ci/run's second run: the suite on PostgreSQL
        pytest.skip(f"the default database is {connection.vendor}, not SQLite")
    with pytest.raises(CommandError, match="needs a PostgreSQL database with the pgvector"):
        call_command(
            "evaluate_suggestions",
            *("--library", str(small_library), "--holdout", "0.3", "--search", "pgvector"),
        )


@pytest.mark.django_db
def test_an_unknown_backend_is_refused(small_library: Path) -> None:  # noqa: F811
    with pytest.raises(CommandError, match="Unknown vector search 'faiss'; choose one of exact"):
        call_command(
            "evaluate_suggestions",
            *("--library", str(small_library), "--holdout", "0.3", "--search", "exact,faiss"),
        )


@pytest.mark.django_db
def test_search_without_the_backends_package_names_the_install(
    small_library: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on a machine without usearch installed (UsearchSearch.missing_requirement's answer).
    hint = "The 'usearch' vector search needs the usearch package: pip install django-imagetags[usearch]"
    monkeypatch.setattr(UsearchSearch, "missing_requirement", classmethod(lambda cls: hint))
    with pytest.raises(CommandError, match=r"pip install django-imagetags\[usearch\]"):
        call_command(
            "evaluate_suggestions",
            *("--library", str(small_library), "--holdout", "0.3", "--search", "usearch"),
        )


@pytest.mark.slow
def test_pgvector_on_sqlite_exits_non_zero_without_a_traceback(small_library: Path) -> None:  # noqa: F811
    finished = subprocess.run(
        [sys.executable, "manage.py", "evaluate_suggestions", "--library", str(small_library)]
        + ["--holdout", "0.3", "--search", "exact,pgvector"],
        cwd=PROJECT_ROOT,
        env={
            # On SQLite even where the suite runs on PostgreSQL (.ci/run's second run).
            **{k: v for k, v in os.environ.items() if k not in SQLITE_UNLESS},
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(PROJECT_ROOT),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 1
    assert "needs a PostgreSQL database with the pgvector extension" in finished.stderr
    assert "--search-database" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert finished.stdout == ""


# --- pgvector on a real PostgreSQL -------------------------------------------------------------


@pytest.fixture
def connect(pgvector_url: str) -> Iterator[Callable]:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(pgvector_url, autocommit=True) as conn:
        yield lambda: conn


def evaluation_tables(connect: Callable) -> list[str]:
    with connect().cursor() as cursor:
        cursor.execute(
            "SELECT tablename FROM pg_tables WHERE starts_with(tablename, %s)", (TABLE_PREFIX,)
        )
        return [row[0] for row in cursor.fetchall()]


def test_pgvector_matches_exact_and_leaves_no_table(structured, connect: Callable) -> None:
    model, queries = structured
    seen: list[list[str]] = []

    @contextlib.contextmanager
    def watched(vectors: np.ndarray) -> Iterator[VectorSearch]:
        with pgvector_builder(connect)(vectors) as search:
            seen.append(evaluation_tables(connect))
            yield search

    results = evaluate_backends(model, queries, k=5, voting=VOTING, builders={"pgvector": watched})

    pgvector = results["pgvector"]
    assert len(seen[0]) == 1  # its own table while it runs...
    assert evaluation_tables(connect) == []  # ...dropped afterwards
    assert pgvector.recall.mean() >= 0.95
    assert pgvector.same_set.mean() >= 0.9
    assert pgvector.scores.p_at_k > 0


def test_pgvector_table_is_dropped_when_the_evaluation_fails(connect: Callable) -> None:
    vectors = structured_vectors(50, 16, seed=4)
    with pytest.raises(RuntimeError, match="stopped"), pgvector_builder(connect)(vectors) as search:
        assert len(search) == 50
        raise RuntimeError("stopped")
    assert evaluation_tables(connect) == []


def test_a_database_without_the_extension_is_refused(pgvector_url: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    # template0 has no extension (the server creates "vector" in template1 and postgres only).
    with psycopg.connect(pgvector_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS no_vector")
        admin.execute("CREATE DATABASE no_vector TEMPLATE template0")
    try:
        with (
            psycopg.connect(pgvector_url.rsplit("/", 1)[0] + "/no_vector") as conn,
            pytest.raises(EvaluationError, match=r"CREATE EXTENSION vector;"),
        ):
            check_pgvector(lambda: conn, "no_vector")
    finally:
        with psycopg.connect(pgvector_url, autocommit=True) as admin:
            admin.execute("DROP DATABASE no_vector")


@pytest.fixture
def pgvector_alias(pgvector_url: str, settings) -> Iterator[str]:
    """A Django database alias, ``evaluation_pgvector``, on the embedded server (added to the
    connection handler only: the suite's test databases stay as they are)."""
    from django.db import connections

    url = urlsplit(pgvector_url)
    alias = "evaluation_pgvector"
    config = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.strip("/"),
        "USER": unquote(url.username or ""),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "",
        "PORT": str(url.port or ""),
    }
    default = dict(settings.DATABASES["default"])
    connections.settings[alias] = connections.configure_settings(
        {"default": default, alias: config}
    )[alias]
    yield alias
    connections[alias].close()
    del connections[alias]
    del connections.settings[alias]


@pytest.mark.slow
@pytest.mark.django_db
def test_pgvector_through_a_django_database_alias(
    small_library: Path,  # noqa: F811
    pgvector_alias: str,
    connect: Callable,
    django_db_blocker,
    tmp_path: Path,
) -> None:
    with django_db_blocker.unblock():
        report = evaluate(
            *("--library", str(small_library), "--holdout", "0.3", "--clusters", "2"),
            *("--search", "pgvector", "--search-database", pgvector_alias),
        )

    pgvector = report["search"]["backends"]["pgvector"]
    assert pgvector[f"recall_at_{RECALL_DEPTH}"] == 1.0  # 50 asked of a smaller library: all
    assert report["search"]["backends"].keys() == {"pgvector"}
    assert evaluation_tables(connect) == []


def test_the_search_database_defaults_to_the_one_the_site_serves_from(settings):
    from imagetags.management.commands.evaluate_suggestions import search_database

    assert search_database(None) == "default"
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "SEARCH": {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "vectors"}},
    }
    assert search_database(None) == "vectors"
    assert search_database("other") == "other"
