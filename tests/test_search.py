"""The vector-search seam (imagetags/search): the registry, and ExactSearch's contract — batches,
probes, ties, the float32/bfloat16 rule, lazy lists, removal and files — without the database."""

from __future__ import annotations

import numpy as np
import pytest

from imagetags.core.vectors import BFLOAT16, l2_normalize
from imagetags.search import ExactSearch, VectorSearch, get_search_class, register


def clustered(n: int = 300, dim: int = 16, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(k, dim)).astype(np.float32))
    labels = rng.integers(0, k, n)
    vectors = l2_normalize(centers[labels] + rng.normal(scale=0.4, size=(n, dim)).astype("f4"))
    assigned = (vectors @ centers.T).argmax(axis=1)
    return vectors, centers, assigned


def test_backends_are_found_by_alias():
    assert get_search_class("exact") is ExactSearch
    assert issubclass(ExactSearch, VectorSearch)
    with pytest.raises(ValueError, match="exact"):
        get_search_class("faiss-someday")


def test_an_alias_cannot_be_taken_twice():
    class Other(ExactSearch):
        alias = "exact"

    with pytest.raises(ValueError, match="already registered"):
        register(Other)


def test_a_batch_answers_row_by_row_and_pads_short_rows():
    vectors, centers, labels = clustered()
    search = ExactSearch.from_labels(vectors, labels, centers, ids=np.arange(len(vectors)) + 1000)
    queries = vectors[:4]
    ids, sims = search.search(queries, 10, probes=None)
    assert ids.shape == sims.shape == (4, 10)
    for row, query in enumerate(queries):
        one_ids, one_sims = search.search(query[None, :], 10)
        assert ids[row].tolist() == one_ids[0].tolist()
        assert ids[row, 0] == 1000 + row  # its own vector first
        assert np.all(np.diff(sims[row]) <= 0)
    # One probed list holds fewer than 10**4 members: the row is as long as the most found.
    ids, sims = search.search(queries[:1], 10**4, probes=1)
    found = search.list_size(int(search.probe(queries[0], 1)[0]))
    assert ids.shape == (1, found) and not np.any(ids < 0)
    ids, sims = search.search(queries[:2], 10**4, probes=1)
    short = int(np.argmin((ids >= 0).sum(axis=1)))
    if (ids[short] < 0).any():  # the two queries' lists differ in size: padded with -1 / -inf
        assert np.all(sims[short][ids[short] < 0] == -np.inf)


def test_ties_are_broken_by_id():
    centers = np.eye(4, dtype=np.float32)
    search = ExactSearch(centers)
    same = np.tile(centers[0], (5, 1))
    search.add(np.array([9, 3, 7, 1, 5]), same, np.zeros(5, dtype=np.int64))
    ids, _sims = search.search(centers[:1], 3)
    assert ids[0].tolist() == [1, 3, 5]


def test_the_compact_rule_is_the_size_of_the_set(monkeypatch):
    assert not ExactSearch.compact_for(131_000, 512)
    assert ExactSearch.compact_for(132_000, 512)
    vectors, centers, labels = clustered()
    assert not ExactSearch.from_labels(vectors, labels, centers).compact
    monkeypatch.setattr(ExactSearch, "compact_above_bytes", 0)
    compact = ExactSearch.from_labels(vectors, labels, centers)
    assert compact.compact
    assert all(compact.block(p).dtype == BFLOAT16 for p in compact.loaded_lists)
    exact = ExactSearch(centers, compact=False)
    exact.add(np.arange(len(vectors)), vectors, labels)
    ids, sims = compact.search(vectors[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    # bfloat16 keeps 8 significant bits: a similarity moves by less than 2**-8.
    assert np.abs(sims - exact.search(vectors[:5], 1)[1]).max() < 2**-8


def test_lists_are_loaded_once_on_first_use():
    vectors, centers, labels = clustered()
    asked: list[list[int]] = []

    def loader(lists):
        asked.append(list(lists))
        for position in lists:
            rows = np.flatnonzero(labels == position)
            yield position, rows, vectors[rows]

    search = ExactSearch(centers, size=len(vectors), loader=loader)
    assert search.loaded_lists == [] and len(search) == 0
    probed = search.probe(vectors[0], 2).tolist()
    ids, _sims = search.search(vectors[:1], 5, probes=2)
    assert asked == [probed] and ids[0, 0] == 0
    search.search(vectors[:1], 5, probes=2)
    assert asked == [probed]  # not again
    with pytest.raises(ValueError, match="not loaded"):
        missing = next(p for p in range(len(centers)) if p not in probed)
        search.add(np.array([10_000]), vectors[:1], np.array([missing]))
    search.add(np.array([10_000]), vectors[:1], np.array([probed[0]]))
    assert search.search(vectors[:1], 2, probes=2)[0][0].tolist() == [0, 10_000]


def test_removed_ids_are_not_found():
    vectors, centers, labels = clustered()
    search = ExactSearch.from_labels(vectors, labels, centers)
    search.remove(np.array([0, 1]))
    assert len(search) == len(vectors) - 2
    ids, _sims = search.search(vectors[:2], 3)
    assert not {0, 1} & set(ids.ravel().tolist())


@pytest.mark.parametrize("compact", [False, True])
def test_a_saved_search_opens_as_it_was(tmp_path, compact):
    vectors, centers, labels = clustered()
    search = ExactSearch(centers, compact=compact)
    search.add(np.arange(len(vectors)), vectors, labels)
    path = tmp_path / "search.npz"
    search.save(path)
    opened = ExactSearch.open(path)
    assert opened.compact is compact and len(opened) == len(search)
    for probes in (1, None):
        for mine, theirs in zip(
            search.search(vectors[:8], 7, probes),
            opened.search(vectors[:8], 7, probes),
            strict=True,
        ):
            assert np.array_equal(mine, theirs)
