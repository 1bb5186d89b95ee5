"""suggest() on every vector-search backend (``IMAGETAGS["SEARCH"]``): one behavioural suite.

The same tests run with ``exact`` (the reference), ``usearch`` (a file per set in a temporary
directory) and ``pgvector`` (a table in the test database; only when that database is
PostgreSQL with the ``vector`` extension, as in .ci/run's pgvector pass, otherwise skipped with
the reason). They check what a site relies on whichever engine finds the neighbours: the same
suggestions as ``exact``, deleted images never vote, a newly assigned image votes at once, a
rebuild switches indexes while suggestions are served, and a missing or unreadable index is a
clear "unavailable" answer (never a 500) that a rebuild repairs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from imagetags.models import ClusterSet, Post, StockImage
from imagetags.services import engines
from imagetags.services.assign import assign_to_active_set
from imagetags.services.rebuild import ClusteringError, rebuild_clusters
from imagetags.services.serving import serving_cache
from imagetags.services.suggest import SuggestionUnavailable, suggest

from .conftest import unit
from .test_api import url as api_url

BACKENDS = ["exact", "usearch", "pgvector"]


def pgvector_missing() -> str | None:
    if connection.vendor != "postgresql":
        return (
            "needs the test database on PostgreSQL with pgvector "
            "(.ci/run's pgvector pass: IMAGETAGS_TEST_SEARCH=pgvector)"
        )
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        if cursor.fetchone() is None:
            return "this PostgreSQL has no pgvector extension"
        cursor.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return None


@pytest.fixture(params=BACKENDS)
def backend(request, settings, tmp_path, db) -> str:
    alias = request.param
    options: dict = {}
    if alias == "usearch":
        pytest.importorskip(
            "usearch", reason="needs usearch: pip install django-imagetags[usearch]"
        )
        options = {"PATH": str(tmp_path / "search")}
    if alias == "pgvector":
        reason = pgvector_missing()
        if reason:
            pytest.skip(reason)
        options = {"DATABASE": "default"}
    current = dict(getattr(settings, "IMAGETAGS", {}) or {})
    current["SEARCH"] = {"BACKEND": alias, "OPTIONS": options}
    current["VOTING"] = {**current.get("VOTING", {}), "PRIOR_WEIGHT": 0.0}
    settings.IMAGETAGS = current
    return alias


@pytest.fixture
def library(backend, add_post) -> ClusterSet:
    """Three topics (axes 0-2) of 6 posts each, plus their own tags; clustered with K = 3."""
    for axis, topic in enumerate(("cake", "soup", "salad")):
        for n in range(6):
            add_post(["food", topic, f"{topic}{n % 3}"], [axis], jitter=0.08)
    return rebuild_clusters(k=3, algorithm="kmeans")


def names(result) -> list[str]:
    return [tag.name for tag in result.tags]


def exact_results(settings, queries: list[np.ndarray]) -> list[list[str]]:
    current = dict(settings.IMAGETAGS)
    engine = current["SEARCH"]
    settings.IMAGETAGS = {**current, "SEARCH": {"BACKEND": "exact", "OPTIONS": {}}}
    serving_cache().reset()
    try:
        return [names(suggest(query)) for query in queries]
    finally:
        settings.IMAGETAGS = {**current, "SEARCH": engine}
        serving_cache().reset()


def test_suggestions_are_those_of_exact(library, backend, settings):
    queries = [unit(axis, 0.1, seed=seed) for axis in range(3) for seed in range(4)]
    found = [names(suggest(query)) for query in queries]
    assert found == exact_results(settings, queries)
    result = suggest(queries[0])
    assert result.tags[0].evidence.startswith("on ")
    if backend != "exact":
        assert f"found by the {backend} search" in result.notes[0]
        assert serving_cache().loaded_index.loaded_clusters == 0  # nothing read into memory


def test_a_deleted_image_never_votes(library, backend):
    query = unit(2, 0.01, seed=1)
    nearest = suggest(query)
    salad_posts = Post.objects.filter(tags__name="salad")
    assert "salad" in names(nearest)
    StockImage.objects.filter(post__in=salad_posts).delete()
    after = suggest(query)
    assert "salad" not in names(after)
    assert not {"salad0", "salad1", "salad2"} & set(names(after))


def test_an_image_whose_features_went_stale_does_not_vote(library, backend):
    query = unit(2, 0.01, seed=1)
    assert "salad" in names(suggest(query))
    # Its features are being recomputed (a new extractor, a replaced file): not a neighbour.
    StockImage.objects.filter(post__tags__name="salad").update(feature_status="pending")
    assert "salad" not in names(suggest(query))


def test_pgvector_beside_the_images_finds_candidates_and_their_owners_in_one_statement(
    library, backend
):
    if backend != "pgvector":
        pytest.skip("pgvector only: its search joins the images' tables")
    from django.test.utils import CaptureQueriesContext

    suggest(unit(0, 0.05, seed=2))  # opens the index
    index = serving_cache().voting_index(library)
    assert index.joined
    with CaptureQueriesContext(connection) as queries:
        result = suggest(unit(0, 0.05, seed=2))
    assert "cake" in names(result)
    # The search itself goes through the DB-API connection; what Django ran did not look the
    # candidates up again (the tags of the voters' posts it still reads).
    assert not [q["sql"] for q in queries if 'FROM "imagetags_stockimage"' in q["sql"]]


def test_a_newly_assigned_image_votes_at_once(library, backend, add_post):
    query = unit(1, 0.0)
    assert "miso" not in names(suggest(query))  # the index is open before the new post exists
    post = add_post(["food", "soup", "miso"], [1], jitter=0.0)  # exactly on the query
    assert assign_to_active_set(post.images.all()) == 1  # what the feature task does

    result = suggest(query)
    assert "miso" in names(result)
    assert next(t for t in result.tags if t.name == "miso").post_count == 1


def test_a_rebuild_switches_indexes_while_suggestions_are_served(library, backend, add_post):
    query = unit(0, 0.05, seed=3)
    before = suggest(query)
    for n in range(3):
        add_post(["food", "cake", "tart"], [0], jitter=0.02 + n * 0.001)
    rebuilt = rebuild_clusters(k=3, algorithm="kmeans")
    after = suggest(query)  # the same process: the next suggestion uses the new set's index
    assert before.cluster_set == library.pk and after.cluster_set == rebuilt.pk
    assert "tart" in names(after) and "tart" not in names(before)
    if backend == "usearch":
        files = engines.index_files(rebuilt)
        assert len(files) == 1 and not engines.index_files(library)  # the old set's file went


@pytest.mark.parametrize("opened", [False, True], ids=["before-opening", "while-served"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_unreadable_index_is_unavailable_not_a_500(
    library, backend, damage, opened, api
):
    if backend == "exact":
        pytest.skip("exact has no index of its own: it reads the members from the database")
    if backend == "usearch":
        if opened:
            pytest.skip("a mapped file stays readable after it is deleted or replaced")
        (path,) = [f.path for f in engines.index_files(library)]
        if damage == "missing":
            os.unlink(path)
        else:
            Path(path).write_bytes(b"not an index" * 100)
    else:
        if damage == "corrupt":
            pytest.skip("a table cannot be half-written: PostgreSQL commits it whole")
        if opened:
            suggest(unit(0, 0.05))  # the process holds the table's handle when it goes
        engines.pgvector_table(library).drop()

    with pytest.raises(SuggestionUnavailable, match="rebuild_clusters"):
        suggest(unit(0, 0.05))
    response = api.get(api_url("image-suggestions", StockImage.objects.first().pk))
    assert response.status_code == 409
    assert "rebuild_clusters" in response.json()["detail"]

    rebuild_clusters(k=3, algorithm="kmeans")  # the repair the message names
    assert "cake" in names(suggest(unit(0, 0.05)))


def test_usearch_worker_writes_a_newer_file_and_web_processes_reopen_it(
    library, backend, add_post, monkeypatch, django_capture_on_commit_callbacks
):
    if backend != "usearch":
        pytest.skip("usearch only: a file per set, rewritten by the worker")
    monkeypatch.setattr(engines, "RESAVE_AFTER", 2)
    query = unit(1, 0.0)
    suggest(query)  # the process maps the first file
    first = engines.index_files(library)[0]
    post = add_post(["food", "soup", "miso"], [1, 1], jitter=0.0)
    with django_capture_on_commit_callbacks(execute=True):  # the assignment commits
        assign_to_active_set(post.images.all())  # 2 new members: the worker writes a newer file
    (newest,) = engines.index_files(library)
    assert newest.watermark > first.watermark and not first.path.exists()

    result = suggest(query)
    index = serving_cache().loaded_index
    assert index.file == newest and len(index.newer) == 0  # reopened: nothing read from the DB
    assert "miso" in names(result)


def test_a_rebuild_for_an_engine_that_cannot_hold_the_set_fails_clearly_and_keeps_serving(
    backend, add_post, settings, tmp_path
):
    if backend == "exact":
        pytest.skip("exact builds nothing")
    for axis in range(3):
        for _n in range(3):
            add_post(["food", f"topic{axis}"], [axis])
    served = rebuild_clusters(k=3, algorithm="kmeans")
    current = dict(settings.IMAGETAGS)
    if backend == "usearch":
        blocked = tmp_path / "not-a-directory"
        blocked.write_text("a file where the directory should be")
        current["SEARCH"] = {"BACKEND": "usearch", "OPTIONS": {"PATH": str(blocked / "x")}}
        expected = "cannot be written"
    else:
        from django.db import DatabaseError, transaction

        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("DROP EXTENSION vector CASCADE")
        except DatabaseError:
            # .ci/run's role, like a site's, does not own the extension (template1's).
            pytest.skip("the test role may not drop the vector extension (run as its owner)")
        expected = "CREATE EXTENSION vector"
    settings.IMAGETAGS = current
    with pytest.raises(ClusteringError, match=expected):
        rebuild_clusters(k=3, algorithm="kmeans")
    assert ClusterSet.objects.active() == served  # the set being served stays active


def test_pgvector_on_a_database_that_is_not_postgresql_is_a_clear_rebuild_error(
    add_post, settings, db
):
    if connection.vendor == "postgresql":
        pytest.skip("needs a database that is not PostgreSQL (the SQLite run)")
    for axis in range(3):
        add_post(["food", f"topic{axis}"], [axis])
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "SEARCH": {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}},
    }
    with pytest.raises(ClusteringError, match="pgvector needs PostgreSQL"):
        rebuild_clusters(k=3, algorithm="kmeans")
    assert ClusterSet.objects.active() is None


def test_a_rebuild_changes_only_the_images_that_joined_or_left(library, backend, add_post):
    if backend == "exact":
        pytest.skip("exact builds nothing")
    for _n in range(3):
        add_post(["food", "cake"], [0])
    said: list[str] = []
    rebuild_clusters(k=3, algorithm="kmeans", progress=said.append)
    if backend == "usearch":
        assert any("21 vectors" in line and "(3 added, 0 removed)" in line for line in said)
    else:
        assert any("3 vectors added, 0 removed" in line for line in said), said

    StockImage.objects.filter(post__tags__name="salad").delete()  # 6 of 21: over a fifth
    said.clear()
    rebuild_clusters(k=3, algorithm="kmeans", progress=said.append)
    if backend == "usearch":  # tombstones would slow every search: a new graph
        assert any("building the graph anew" in line for line in said), said
        assert any("15 vectors" in line and "(15 added, 0 removed)" in line for line in said)
    else:  # PostgreSQL's index keeps itself tidy (VACUUM)
        assert any("0 vectors added, 6 removed" in line for line in said), said


def test_usearch_a_batch_committed_after_a_later_one_still_votes(library, backend, add_post):
    """PostgreSQL hands out keys before commit: a batch can commit after a later one, with
    lower membership keys than those a process has already read (services/index.py)."""
    if backend != "usearch":
        pytest.skip("usearch only: members newer than the file come from the database")
    from django.db.models import Max

    from imagetags.models import ClusterMembership

    query = unit(1, 0.0)
    early = add_post(["food", "soup", "early"], [1], jitter=0.0)
    late = add_post(["food", "soup", "late"], [1], jitter=0.0)
    suggest(query)  # the process has read the members newer than the file: none
    assign_to_active_set(early.images.all())
    early_key = ClusterMembership.objects.aggregate(Max("pk"))["pk__max"]
    assert "early" in names(suggest(query))  # read: the newest key seen is now early's
    # The late batch commits now, with a key below early's (taken before early committed).
    ClusterMembership.objects.filter(pk=early_key).update(id=early_key + 10)
    assign_to_active_set(late.images.all())
    ClusterMembership.objects.filter(image__post=late).update(id=early_key)
    assert {"early", "late"} <= set(names(suggest(query)))


def test_the_engines_search_effort_comes_from_the_options(library, backend, settings):
    if backend == "exact":
        pytest.skip("exact compares every member it probes")
    name = "EXPANSION_SEARCH" if backend == "usearch" else "EF_SEARCH"
    search = dict(settings.IMAGETAGS["SEARCH"])
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "SEARCH": {**search, "OPTIONS": {**search["OPTIONS"], name: 300}},
    }
    assert "cake" in names(suggest(unit(0, 0.05)))
    engine = serving_cache().loaded_index.engine
    if backend == "usearch":
        assert engine._index.expansion_search == 300
    else:
        assert engine.ef_search == 300

    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "SEARCH": {**search, "OPTIONS": {**search["OPTIONS"], name: "lots"}},
    }
    serving_cache().reset()
    with pytest.raises(ImproperlyConfigured, match=f"{name}'] must be a positive integer"):
        suggest(unit(0, 0.05))


def built_connectivity(backend: str, cluster_set: ClusterSet) -> int | None:
    if backend == "usearch":
        from imagetags.search.usearch import UsearchSearch

        return UsearchSearch.open(engines.newest_index_file(cluster_set).path).connectivity
    return engines.pgvector_table(cluster_set).index_connectivity()


def test_the_graphs_connectivity_follows_the_library_size_or_the_option(
    library, backend, settings, monkeypatch
):
    if backend == "exact":
        pytest.skip("exact builds no graph")
    from imagetags.search import base

    assert built_connectivity(backend, library) == base.CONNECTIVITY  # 18 images: a small graph

    # A library grown past LARGE_GRAPH: the next publish builds a denser graph, said so.
    monkeypatch.setattr(base, "LARGE_GRAPH", 10)
    said: list[str] = []
    grown = rebuild_clusters(k=3, algorithm="kmeans", progress=said.append)
    assert built_connectivity(backend, grown) == base.LARGE_GRAPH_CONNECTIVITY
    assert any(f"→ {base.LARGE_GRAPH_CONNECTIVITY}" in line for line in said), said
    assert "cake" in names(suggest(unit(0, 0.05)))

    # The option overrides the size; a graph denser than asked is kept, not rebuilt.
    search = dict(settings.IMAGETAGS["SEARCH"])
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "SEARCH": {**search, "OPTIONS": {**search["OPTIONS"], "CONNECTIVITY": 20}},
    }
    said.clear()
    kept = rebuild_clusters(k=3, algorithm="kmeans", progress=said.append)
    assert built_connectivity(backend, kept) == base.LARGE_GRAPH_CONNECTIVITY
    assert not any("→" in line for line in said), said
