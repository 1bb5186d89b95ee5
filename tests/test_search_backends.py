"""Every vector-search backend against one contract: the same tests, parametrised by alias.

Vectors have neighbour structure like CNN features (unit vectors around a few hundred topics at
cosine ~0.6): uniform noise has no near neighbours and would test nothing an ANN engine does.
A backend joins the suite with one line in ``BACKENDS``; ``ExactSearch`` (``probes=None``: exact
k-NN) is the reference the approximate ones are measured against. Backend-specific behaviour
(a usearch file opened as a read-only view) follows the shared suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from imagetags.core.vectors import l2_normalize
from imagetags.search import (
    ExactSearch,
    ReadOnlySearchError,
    SearchIndexError,
    UsearchSearch,
    VectorSearch,
    get_search_class,
    search_aliases,
)

DIM = 32
TOPICS = 300


@dataclass(frozen=True)
class Backend:
    """How the suite makes an empty search of a backend, and reopens a saved one to change it."""

    make: Callable[[np.ndarray], VectorSearch]  # from the (K, d) centres of the lists
    reopen: Callable[[Path], VectorSearch]


BACKENDS: dict[str, Backend] = {
    "exact": Backend(lambda centers: ExactSearch(centers), ExactSearch.open),
    "usearch": Backend(
        lambda centers: UsearchSearch(centers.shape[1]),
        lambda path: UsearchSearch.open(path, view=False),
    ),
}


# Registered backends not in the shared suite yet, and why (each is still tested on its own).
NOT_YET_IN_SUITE = {
    "pgvector": "its save/open publish and attach database tables, not files, and it needs a "
    "server: tests/test_pgvector_search.py covers it until this suite takes a connection "
    "(issue 12, next stage)",
}


@cache
def library(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, centres, lists): ``n`` unit vectors around ``TOPICS`` topics at cosine ~0.6
    to their topic (like bench/rebuild_worker.py), grouped into 40 lists by nearest centre."""
    rng = np.random.default_rng(seed)
    topics = l2_normalize(rng.normal(size=(TOPICS, DIM)).astype(np.float32))
    sigma = np.sqrt((1 / 0.6**2 - 1) / DIM)
    vectors = topics[rng.integers(0, TOPICS, n)] + rng.normal(scale=sigma, size=(n, DIM))
    vectors = l2_normalize(vectors.astype(np.float32))
    centers = topics[:40]
    lists = (vectors @ centers.T).argmax(axis=1)
    vectors.setflags(write=False)
    return vectors, centers, lists


def queries(count: int = 200, seed: int = 1) -> np.ndarray:
    """New vectors from the library's topics (not library members)."""
    vectors, _centers, _lists = library()
    rng = np.random.default_rng(seed)
    near = vectors[rng.integers(0, len(vectors), count)]
    return l2_normalize(near + rng.normal(scale=0.05, size=near.shape).astype(np.float32))


@pytest.fixture(params=search_aliases())
def backend(request) -> Backend:
    if request.param in NOT_YET_IN_SUITE:
        pytest.skip(f"{request.param}: {NOT_YET_IN_SUITE[request.param]}")
    try:
        get_search_class(request.param)
    except ImportError as missing:  # an optional package not installed here: said, not hidden
        pytest.skip(f"{request.param}: {missing}")
    return BACKENDS[request.param]


def filled(backend: Backend, n: int | None = None) -> tuple[VectorSearch, np.ndarray]:
    vectors, centers, lists = library()
    n = len(vectors) if n is None else n
    search = backend.make(centers)
    search.add(np.arange(n) + 1, vectors[:n], lists[:n])  # ids from 1: 0 is no one's
    return search, vectors[:n]


def exact_neighbours(vectors: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """Ids (row + 1) of the true ``k`` nearest, for comparison as sets."""
    sims = query_rows @ vectors.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k] + 1


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_every_registered_backend_is_in_the_suite():
    assert set(search_aliases()) == set(BACKENDS) | set(NOT_YET_IN_SUITE)
    assert not set(BACKENDS) & set(NOT_YET_IN_SUITE)


def test_recall_at_50_against_exact_is_at_least_095(backend):
    search, vectors = filled(backend)
    asked = queries()
    ids, sims = search.search(asked, 50, probes=None)
    assert ids.shape == sims.shape == (len(asked), 50)
    assert recall(ids, exact_neighbours(vectors, asked, 50)) >= 0.95


def test_results_are_cosines_most_similar_first(backend):
    search, vectors = filled(backend, 2000)
    ids, sims = search.search(vectors[:20], 30, probes=None)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    assert ids[:, 0].tolist() == list(range(1, 21))  # each vector finds itself first
    assert np.all(np.diff(sims, axis=1) <= 0)
    true = np.einsum("qd,qkd->qk", vectors[:20], vectors[ids - 1])
    assert np.abs(sims - true).max() < 2e-3  # float16 storage moves a cosine by ~1e-3
    one_ids, _one_sims = search.search(vectors[3], 30)  # one query: the same row
    assert one_ids.shape == (1, 30) and one_ids[0].tolist() == ids[3].tolist()


def test_ties_are_ordered_by_id(backend):
    vectors, centers, lists = library()
    search = backend.make(centers)
    search.add(np.array([9, 3, 7, 1, 5]), np.tile(vectors[0], (5, 1)), np.repeat(lists[0], 5))
    ids, sims = search.search(vectors[0], 5)
    assert ids[0].tolist() == [1, 3, 5, 7, 9] and len(set(sims[0].tolist())) == 1


def test_removed_ids_are_never_returned(backend):
    search, vectors = filled(backend, 2000)
    # The nearest neighbours of the queries themselves go, so the graph must route around them.
    asked = vectors[:50]
    gone = np.unique(exact_neighbours(vectors, asked, 10).ravel())
    search.remove(gone)
    search.remove(np.array([10**9]))  # not held: ignored
    assert len(search) == 2000 - len(gone)
    ids, _sims = search.search(asked, 2000, probes=None)
    found = ids[ids >= 0]
    assert not set(found.tolist()) & set(gone.tolist())
    assert found.shape[0] > 0.9 * len(asked) * len(search)  # the rest is still found


def test_a_saved_search_opens_with_the_same_results(backend, tmp_path):
    search, vectors = filled(backend, 2000)
    search.remove(np.arange(1, 101))
    path = tmp_path / "library.index"
    search.save(path)
    assert sorted(os.listdir(tmp_path)) == ["library.index"]  # no temporary file left behind
    opened = type(search).open(path)
    assert len(opened) == len(search) == 1900
    for mine, theirs in zip(
        search.search(vectors[:40], 25), opened.search(vectors[:40], 25), strict=True
    ):
        assert np.array_equal(mine, theirs)


def test_adding_after_a_save_and_reopen_finds_the_new_vectors(backend, tmp_path):
    vectors, centers, lists = library()
    first, second = 3000, 4000
    search = backend.make(centers)
    search.add(np.arange(first) + 1, vectors[:first], lists[:first])
    search.save(tmp_path / "library.index")
    reopened = backend.reopen(tmp_path / "library.index")
    reopened.add(np.arange(first, second) + 1, vectors[first:second], lists[first:second])
    assert len(reopened) == second
    asked = vectors[first : first + 100]  # new vectors: each finds itself
    ids, _sims = reopened.search(asked, 20, probes=None)
    assert ids[:, 0].tolist() == list(range(first + 1, first + 101))
    # As good as a search built in one go: recall against exact over all vectors.
    assert recall(ids, exact_neighbours(vectors[:second], asked, 20)) >= 0.95


def test_a_missing_file_is_a_search_index_error_naming_it(backend, tmp_path):
    cls = type(backend.make(library()[1]))
    path = tmp_path / "nowhere.index"
    with pytest.raises(SearchIndexError, match="rebuild_clusters") as caught:
        cls.open(path)
    assert str(path) in str(caught.value) and caught.value.path == str(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_file_is_a_search_index_error_naming_it(backend, tmp_path, damage):
    search, _vectors = filled(backend, 300)
    path = tmp_path / "library.index"
    search.save(path)
    data = path.read_bytes()
    path.write_bytes(
        {
            "garbage": np.random.default_rng(0).bytes(len(data)),
            "truncated": data[: len(data) // 2],
            "empty": b"",
        }[damage]
    )
    with pytest.raises(SearchIndexError, match="rebuild_clusters") as caught:
        type(search).open(path)
    assert str(path) in str(caught.value)


def test_an_empty_search_answers_empty_padded_rows(backend, tmp_path):
    _vectors, centers, _lists = library()
    search = backend.make(centers)
    for found in (search.search(queries(3), 10), search.search(queries(1), 10)):
        assert [a.shape for a in found] == [(len(found[0]), 0)] * 2
    search.save(tmp_path / "empty.index")
    opened = type(search).open(tmp_path / "empty.index")
    assert len(opened) == 0 and opened.search(queries(2), 5)[0].shape == (2, 0)


def test_k_larger_than_the_search_returns_everything_once(backend):
    search, vectors = filled(backend, 60)
    ids, sims = search.search(vectors[:3], 1000, probes=None)
    assert ids.shape == sims.shape == (3, 60)
    for row in ids:
        assert sorted(row.tolist()) == list(range(1, 61))
    assert np.all(np.isfinite(sims))
    assert search.search(vectors[:2], 0)[0].shape == (2, 0)


# --- usearch only: a file mapped read-only, swapped atomically -----------------------------------

usearch_installed = pytest.mark.skipif(
    UsearchSearch.missing_requirement() is not None, reason="usearch is not installed"
)


@usearch_installed
def test_a_viewed_usearch_file_is_read_only(tmp_path):
    search, vectors = filled(BACKENDS["usearch"], 200)
    search.save(tmp_path / "library.usearch")
    view = UsearchSearch.open(tmp_path / "library.usearch")
    assert view.read_only and not search.read_only
    # usearch itself crashes the process (SIGSEGV) on a write to a view: refused before it.
    with pytest.raises(ReadOnlySearchError, match="worker rebuilds and saves"):
        view.add(np.array([10_000]), vectors[:1])
    with pytest.raises(ReadOnlySearchError, match="worker rebuilds and saves"):
        view.remove(np.array([1]))
    assert len(view) == 200 and view.dtype == "f16"


@usearch_installed
def test_a_small_usearch_index_finds_the_exact_neighbours():
    """Up to ``exact_up_to`` vectors the graph is not walked: an HNSW graph of a few hundred
    nodes built by parallel adds can leave a node unreachable, and a library that small must
    not lose a neighbour to it."""
    search, vectors = filled(BACKENDS["usearch"], 3_000)
    assert len(search) <= UsearchSearch.exact_up_to
    # Every member asked for its one nearest finds itself: a node the walk misses would not.
    found, _sims = search.search(vectors, 1)
    assert found[:, 0].tolist() == list(range(1, len(vectors) + 1))


@usearch_installed
def test_adding_an_id_again_replaces_its_vector():
    # usearch refuses a key twice; an image re-embedded is one id with a new vector.
    search, vectors = filled(BACKENDS["usearch"], 500)
    search.add(np.array([7]), vectors[400:401])
    assert len(search) == 500
    ids, _sims = search.search(vectors[400], 2)
    assert set(ids[0].tolist()) == {7, 401}
    with pytest.raises(ValueError, match="twice"):
        search.add(np.array([8, 8]), vectors[:2])
    with pytest.raises(ValueError, match="non-negative"):
        search.add(np.array([-1]), vectors[:1])


@usearch_installed
def test_a_view_keeps_its_file_while_a_new_one_replaces_it(tmp_path):
    path = tmp_path / "library.usearch"
    old, vectors = filled(BACKENDS["usearch"], 300)
    old.save(path)
    view = UsearchSearch.open(path)
    before = view.search(vectors[:5], 5)
    new, _ = filled(BACKENDS["usearch"], 1000)
    new.save(path)  # the worker's next save, while the web process still maps the old file
    assert [
        np.array_equal(a, b) for a, b in zip(before, view.search(vectors[:5], 5), strict=True)
    ] == [True, True]
    assert len(view) == 300 and len(UsearchSearch.open(path)) == 1000


@usearch_installed
def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "library.usearch"
    search, vectors = filled(BACKENDS["usearch"], 300)
    search.save(path)
    saved = path.read_bytes()
    search.add(np.array([5000]), vectors[:1])

    def crash(temporary: str) -> None:
        Path(temporary).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(search._index, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        search.save(path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["library.usearch"]


def test_the_usearch_package_is_optional():
    """``import imagetags.search`` neither needs nor imports usearch; choosing it without the
    package says what to install."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    without = (
        "import sys; sys.modules['usearch'] = None\n"  # as if not installed
        "import imagetags.search as search\n"
        "try:\n"
        "    search.get_search_class('usearch')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", without], capture_output=True, text=True, env=env, check=True
    )
    assert "pip install django-imagetags[usearch]" in run.stdout
    lazy = "import sys, imagetags.search; print('usearch' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-c", lazy], capture_output=True, text=True, env=env, check=True
    )
    assert run.stdout.strip() == "False"
