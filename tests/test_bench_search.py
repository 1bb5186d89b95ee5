"""``bench/search.py`` (``bench/run --only search``) imports and its rows are well formed.

Nothing is timed here: the row functions get small hand-built measurements, and one slow test
runs the whole benchmark on a 1,000-image library in worker processes, as ``bench/run`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import search
from bench.common import Row, format_table
from bench.rebuild_worker import topic_weights
from tests.conftest import PROJECT_ROOT


def _result(neighbours: list[list[int]], tags: list[list[str]]) -> dict:
    memory = dict.fromkeys(
        ("rss_mb", "pss_mb", "private_mb", "shared_mb", "anonymous_mb", "file_mb"), 12.0
    )
    return {
        "build": {"seconds": 1.5},
        "serve": {
            "queries": len(tags),
            "first_ms": 30.0,
            "cold_p50_ms": 4.0,
            "cold_p90_ms": 6.0,
            "warm_p50_ms": 2.0,
            "warm_p90_ms": 3.0,
            "memory": {**memory, "before_rss_mb": 60.0},
            "tags": tags,
            "neighbours": neighbours,
        },
        "first_ms": [40.0, 20.0, 30.0],
    }


def test_rows_of_a_measured_backend_compare_it_with_the_reference():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    reference = _result(truth.tolist(), [["a", "b", "c", "d", "e"], ["f", "g", "h", "i", "j"]])
    # Query 1 finds 3 of 4 true neighbours, query 2 all; its top 5 differs in order only.
    measured = _result(
        [[1, 2, 3, 9], [8, 7, 6, 5]], [["a", "b", "c", "d", "e"], ["g", "f", "h", "i", "j"]]
    )
    rows = search.rows_for(
        1000, search.backend("usearch"), measured, reference, truth, rebuild_seconds=50.0
    )
    by_name = {row.name.split(",")[0]: row for row in rows}
    assert len(rows) == 6 and all(isinstance(row, Row) and row.target == "12" for row in rows)
    assert by_name["suggest(vector) p50"].value == 2.0
    assert by_name["suggest(vector) p50"].ok is True  # <= 5 ms
    assert by_name["first suggest(vector) of a fresh process"].value == 30.0  # median of 3
    assert by_name["recall@50 of the neighbours vs exact k-NN"].value == pytest.approx(0.875)
    assert by_name["recall@50 of the neighbours vs exact k-NN"].ok is False  # < 0.95
    # Compared as sets (the target's wording); the note gives the share in the same order.
    top5 = by_name["top-5 tags identical (as a set) to exact-knn"]
    assert top5.value == 1.0 and "in the same order too 0.500" in top5.note
    assert by_name["rebuild_clusters end to end"].value == 51.5
    assert by_name["memory a web process adds for search (private)"].ok is True
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 12 | suggest(vector) p50" in table
    assert json.dumps([row.as_dict() for row in rows])  # the --json file takes them


def test_reference_rows_are_information_and_missing_backends_are_missed():
    truth = np.array([[1, 2]])
    reference = _result(truth.tolist(), [["a", "b", "c", "d", "e"]])
    rows = search.rows_for(
        1000, search.backend(search.REFERENCE), reference, reference, truth, 10.0
    )
    assert [row.ok for row in rows] == [None] * 6
    assert {row.value for row in rows if "recall" in row.name or "top-5" in row.name} == {1.0}
    missing = search.rows_for(
        1000, search.backend("pgvector"), None, None, None, None, "not installed"
    )
    assert len(missing) == 6
    assert all(row.value is None and row.ok is False for row in missing)
    assert "counts as missed" in missing[0].note


def test_an_engine_rebuild_row_is_read_on_the_rebuild_with_its_index_in_place():
    reference = _result([[1, 2, 3, 4]], [["a", "b", "c", "d", "e"]])
    measured = _result([[1, 2, 3, 4]], [["a", "b", "c", "d", "e"]])
    stages = ("read", "fit", "count", "write", "engine", "after")
    first = {"seconds": 70.0, **{f"{s}_seconds": 1.0 for s in stages}, "engine_seconds": 50.0}
    second = {**first, "seconds": 21.0, "engine_seconds": 0.5}
    measured["build"] = {"seconds": 70.0, "runs": [first, second], "index_mb": 112.0}
    rows = search.rows_for(
        1000, search.backend("usearch"), measured, reference, np.array([[1, 2, 3, 4]]), 9.0
    )
    rebuild = next(row for row in rows if row.name.startswith("rebuild_clusters"))
    # The engine's recurring rebuild (its index syncs the images that joined or left), not
    # the first build from no index (once per site: in the note), nor the library's exact one.
    assert rebuild.value == 21.0 and rebuild.ok is True  # <= 60 s
    assert "engine 0.5" in rebuild.note and "112 MB" in rebuild.note
    assert "built the index from nothing (once per site), 70.0 s" in rebuild.note
    assert "engine 50.0" in rebuild.note


def test_engines_run_through_the_search_setting():
    # usearch on the SQLite library with an index directory beside it; pgvector on a copy of
    # the library in the run's PostgreSQL. Both through IMAGETAGS["SEARCH"], as a site sets it.
    usearch = search.backend("usearch")
    assert usearch.missing() is None
    settings = usearch.settings_for(search.DEFAULT_WORKDIR, "lib")
    assert settings["SEARCH"]["BACKEND"] == "usearch"
    assert settings["SEARCH"]["OPTIONS"]["PATH"].endswith("lib-usearch")
    pgvector = search.backend("pgvector")
    assert pgvector.settings["SEARCH"] == {
        "BACKEND": "pgvector",
        "OPTIONS": {"DATABASE": "default"},
    }
    os.environ[search.PG_URL_ENV] = "postgresql://postgres:pw@127.0.0.1:5999/postgres"
    try:
        database = pgvector.database_for("search-10x512")
    finally:
        del os.environ[search.PG_URL_ENV]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["NAME"], database["PORT"], database["PASSWORD"]) == (
        "search_10x512",
        5999,
        "pw",
    )
    assert search.backend("exact").missing() is None


def test_topic_sizes_follow_zipf_and_default_to_equal():
    assert topic_weights(300, 0.0) is None
    weights = topic_weights(1000, 1.0)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] / weights[9] == pytest.approx(10.0)


def test_memory_is_read_from_smaps_rollup():
    memory = search.memory_mb()
    assert memory["rss_mb"] > 0
    assert memory["anonymous_mb"] + memory["file_mb"] == pytest.approx(memory["rss_mb"])


@pytest.mark.slow
def test_the_search_benchmark_runs_end_to_end_on_a_small_library(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "search", "--quick", "--sizes", "1000"]
        + ["--search-backends", "exact", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    names = [row["name"] for row in rows]
    assert len(rows) == 12  # six rows for exact, six for the reference
    reference = [row for row in rows if "exact-knn at 1,000" in row["name"]]
    assert [row["value"] for row in reference if "recall" in row["name"]] == [1.0]
    exact = [row for row in rows if row["name"].endswith(" exact at 1,000")]
    assert len(exact) == 6 and all(row["value"] is not None for row in exact)
    assert 0 < next(r["value"] for r in exact if "recall" in r["name"]) <= 1.0
    assert any("p50, warm" in name for name in names)


def test_a_backend_needing_a_setting_the_app_lacks_is_refused_not_measured_as_exact(tmp_path):
    # setup_django drops unknown IMAGETAGS keys; without the check, "usearch" rows would time
    # today's exact path under another name.
    unknown = dataclasses.replace(search.backend("usearch"), settings={"NO_SUCH_KEY": 1})
    with pytest.raises(RuntimeError, match="IMAGETAGS has no NO_SUCH_KEY setting"):
        search._setup(tmp_path, "library", unknown)


def test_the_cnn_structure_has_near_neighbours_inside_a_topic_and_the_isotropic_one_not():
    """bench/structure.py's figures, on a small sample: the calibrated library's neighbourhoods
    span about as many dimensions as feedme-dev's MobileNetV2 features (~32, docs/performance.md
    §6); the isotropic library's about 85, every image nearly as far as the 50th."""
    from bench import structure

    cnn = structure.neighbourhood(structure.synthetic("cnn", topics=4))
    isotropic = structure.neighbourhood(structure.synthetic("isotropic", topics=4))
    assert 24 < cnn["intrinsic_dimension"] < 42
    assert isotropic["intrinsic_dimension"] > 70
    assert cnn["gap_1st_50th"] > 2 * isotropic["gap_1st_50th"]


def test_a_topic_model_draws_unit_vectors_at_the_cosine_asked_whatever_its_rank():
    from bench.rebuild_worker import TopicModel

    rng = np.random.default_rng(3)
    for rank in (0, 40):
        model = TopicModel.make(5, 512, seed=1, cosine=(0.6, 0.6), rank=rank, isotropic=0.3)
        topics = rng.integers(0, 5, 400)
        drawn = model.draw(topics, rng)
        assert drawn.dtype == np.float32 and drawn.shape == (400, 512)
        assert np.allclose(np.linalg.norm(drawn, axis=1), 1, atol=1e-5)
        to_centre = np.einsum("ij,ij->i", drawn, model.centres[topics])
        assert abs(float(np.median(to_centre)) - 0.6) < 0.03, rank
    # The same seed gives the same topics: queries can be new images of a library's topics.
    again = TopicModel.make(5, 512, seed=1, cosine=(0.6, 0.6), rank=40)
    assert np.array_equal(again.centres, model.centres) and np.array_equal(again.bases, model.bases)


def test_a_library_keeps_its_name_by_structure():
    assert search.library_name(1000, "isotropic") == "search-1000x512"
    assert search.library_name(1000) == "search-1000x512-cnn"
    assert set(search.STRUCTURES) == {"cnn", "isotropic"}


def test_the_effort_step_measures_recall_and_time_of_a_usearch_file(tmp_path):
    usearch = pytest.importorskip("usearch.index")
    rng = np.random.default_rng(0)
    library = rng.standard_normal((500, 16)).astype(np.float32)
    library /= np.linalg.norm(library, axis=1, keepdims=True)
    (tmp_path / "lib-usearch").mkdir()
    index = usearch.Index(ndim=16, metric="cos", dtype="f32")
    index.add(np.arange(500), library)
    index.save(str(tmp_path / "lib-usearch" / "set-1.usearch"))
    queries = library[:20] + 0.01 * rng.standard_normal((20, 16)).astype(np.float32)
    truth = np.argsort(-(queries @ library.T), axis=1)[:, : search.NEIGHBOURS]
    np.savez(tmp_path / "lib-queries.npz", queries=queries, truth=truth)

    found = search.effort(tmp_path, "lib", [16, 128])

    assert set(found) == {"16", "128"}
    assert found["128"]["recall"] > 0.95 and found["128"]["p50_ms"] > 0
    assert found["16"]["recall"] <= found["128"]["recall"] + 1e-9


def test_hnsw_degree_measures_a_graph_against_brute_force():
    pytest.importorskip("usearch")
    from bench import hnsw_degree

    matrix, queries = hnsw_degree.library(3_000, seed=0)
    assert matrix.shape == (3_000, search.DIM) and queries.shape == (
        hnsw_degree.QUERIES,
        search.DIM,
    )
    truth = hnsw_degree.nearest(matrix, queries)
    assert search.recall_at(truth.tolist(), truth) == 1.0
    assert search.recall_at((truth[:, ::-1] + 1).tolist(), truth) < 1.0  # off by one id: a miss
    result = hnsw_degree.graph(matrix, queries, truth, 8)
    assert result["connectivity"] == 8 and result["file_mb"] >= 1
    recalls = [result[f"ef{effort}"]["recall"] for effort in hnsw_degree.EFFORTS]
    assert all(0.9 <= value <= 1.0 for value in recalls), recalls
