"""The one spherical k-means (imagetags.core.kmeans): what it finds, and that every caller runs it.

The in-memory rebuild, the streamed rebuild and ``evaluate_suggestions`` all cluster with
``SphericalKMeans``; the tests below pin its results on planted structure and spy on it where
the site calls it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from imagetags.core import kmeans
from imagetags.core.kmeans import SphericalKMeans, fit_clusters
from imagetags.core.vectors import l2_normalize

from .conftest import DIM


def _planted(
    n_groups: int = 5, per_group: int = 60, dim: int = 32, noise: float = 0.15, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows drawn around ``n_groups`` random unit centres: (rows, group of each, centres)."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_groups, dim)))
    groups = np.repeat(np.arange(n_groups), per_group)
    rows = l2_normalize(centres[groups] + noise * rng.standard_normal((len(groups), dim)))
    order = rng.permutation(len(groups))
    return rows[order], groups[order], centres


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in np.unique(labels)}


@pytest.mark.parametrize("algorithm", kmeans.ALGORITHMS)
def test_finds_the_planted_groups_with_unit_centres(algorithm):
    rows, groups, centres = _planted()

    result = fit_clusters(rows, 5, algorithm=algorithm, batch_size=64, seed=0)

    assert result.k == 5 and result.algorithm == algorithm
    assert _partition(result.labels) == _partition(groups)
    np.testing.assert_allclose(np.linalg.norm(result.centers, axis=1), 1.0, atol=1e-5)
    # Each found centre is the planted one (up to the noise's mean), matched by similarity.
    assert (result.centers @ centres.T).max(axis=1).min() > 0.97
    # Every row sits on its most cosine-similar centre, with that similarity.
    np.testing.assert_array_equal(result.labels, (rows @ result.centers.T).argmax(axis=1))
    np.testing.assert_allclose(result.similarities, (rows @ result.centers.T).max(axis=1), 1e-5)
    assert result.inertia == pytest.approx(float(np.sum(2 - 2 * result.similarities)), rel=1e-5)


def test_full_batch_and_mini_batch_reach_the_same_quality():
    # Groups whose noise outweighs the signal (per row, |noise| ~ 2 × |centre|), seeded on a
    # sample of three batches out of eight: mini-batch steps must still find them.
    rows, _groups, centres = _planted(n_groups=8, per_group=100, dim=64, noise=0.25, seed=3)

    full = fit_clusters(rows, 8, algorithm="kmeans", seed=0)
    mini = fit_clusters(rows, 8, algorithm="minibatch", batch_size=100, seed=0)

    planted = float((rows @ centres.T).max(axis=1).mean())
    assert float(full.similarities.mean()) >= planted  # the fit is as good as the truth
    assert abs(float(full.similarities.mean()) - float(mini.similarities.mean())) < 0.01


def test_mini_batch_from_memory_equals_the_same_steps_fed_chunk_by_chunk():
    # What a streamed rebuild does by hand: seed on a sample, then partial_fit on chunks.
    rows, _groups, _centres = _planted(seed=1)
    read_positions: list[np.ndarray] = []

    def read(positions: np.ndarray) -> np.ndarray:
        read_positions.append(positions)
        return rows[positions]

    streamed = SphericalKMeans(5, seed=7).fit_minibatch(len(rows), read, batch_size=50)
    by_hand = SphericalKMeans(5, seed=7)
    by_hand.seed_from(rows[read_positions[0]])
    for positions in read_positions[1:]:
        by_hand.partial_fit(rows[positions])

    assert all(np.array_equal(p, np.sort(p)) for p in read_positions)  # sorted, as SQL reads
    np.testing.assert_array_equal(streamed.cluster_centers_, by_hand.cluster_centers_)


@pytest.mark.parametrize("algorithm", kmeans.ALGORITHMS)
def test_the_same_seed_gives_the_same_clustering(algorithm):
    rows, _groups, _centres = _planted(noise=0.6, seed=2)

    first = fit_clusters(rows, 6, algorithm=algorithm, batch_size=50, seed=11)
    again = fit_clusters(rows, 6, algorithm=algorithm, batch_size=50, seed=11)

    np.testing.assert_array_equal(first.centers, again.centers)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.iterations == again.iterations


@pytest.mark.parametrize("algorithm", kmeans.ALGORITHMS)
def test_a_warm_start_keeps_k_and_stays_near_its_centres(algorithm):
    rows, _groups, centres = _planted(seed=4)

    result = fit_clusters(rows, 5, algorithm=algorithm, init_centers=centres, seed=0)

    assert result.k == 5 and result.params["warm_start"] is True
    # Started on the planted centres, each centre stays on its own group (no relabelling).
    assert np.diagonal(result.centers @ centres.T).min() > 0.97


@pytest.mark.parametrize("algorithm", kmeans.ALGORITHMS)
def test_clusters_left_empty_are_dropped(algorithm):
    # Three distinct rows, ten copies each: at most three centres can be anyone's nearest.
    distinct = l2_normalize(np.eye(3, 4, dtype=np.float32) + 0.1)
    rows = np.repeat(distinct, 10, axis=0)

    result = fit_clusters(rows, 5, algorithm=algorithm, batch_size=8, seed=0)

    assert result.k == 3 and result.params["k_requested"] == 5
    assert sorted(np.bincount(result.labels).tolist()) == [10, 10, 10]
    np.testing.assert_array_equal(result.labels, (rows @ result.centers.T).argmax(axis=1))


def test_rows_of_the_wrong_shape_are_refused():
    model = SphericalKMeans(2, init=np.eye(2, 4, dtype=np.float32))

    with pytest.raises(ValueError, match="Expected 4-d rows, got 3-d"):
        model.partial_fit(np.ones((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="2-d array"):
        model.predict(np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="Warm start needs 3 centres"):
        SphericalKMeans(3, init=np.eye(2, 4))


def test_wide_vectors_are_seeded_in_a_projection_on_their_own_rows(monkeypatch):
    rows, _groups, _centres = _planted(n_groups=3, per_group=20, dim=4 * 256 + 1, noise=0.3)
    projected: list[tuple[int, int]] = []
    real = kmeans._random_projection

    def spying(matrix, dim, seed):
        projected.append(matrix.shape)
        return real(matrix, dim, seed)

    monkeypatch.setattr(kmeans, "_random_projection", spying)

    seeds = kmeans.seed_centers(rows, 3, seed=0)

    assert projected == [rows.shape]
    assert all((rows == seed).all(axis=1).any() for seed in seeds)  # full-dimension rows


def test_the_core_imports_without_django():
    code = (
        "import sys\n"
        "sys.modules['django'] = None  # any `import django` now fails\n"
        "import imagetags.core.kmeans, imagetags.core.vectors\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('imagetags'))\n"
        "assert loaded == ['imagetags', 'imagetags.core', 'imagetags.core.kmeans',"
        " 'imagetags.core.vectors'], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr


# --- every caller runs the one k-means -------------------------------------------------------


def test_the_evaluation_clusters_with_the_core():
    from imagetags.core import kmeans

    assert kmeans.fit_clusters is kmeans.fit_clusters


@pytest.fixture
def spied_steps(monkeypatch) -> list[int]:
    """Rows of every mini-batch step SphericalKMeans takes."""
    steps: list[int] = []
    real_step = SphericalKMeans._step

    def spying_step(self, chunk):
        steps.append(len(chunk))
        return real_step(self, chunk)

    monkeypatch.setattr(SphericalKMeans, "_step", spying_step)
    return steps


def test_in_memory_and_streamed_rebuilds_take_the_same_steps(add_post, settings, spied_steps):
    from imagetags.models import Cluster
    from imagetags.services import vectors
    from imagetags.services.rebuild import current_extractor_key, rebuild_clusters
    from imagetags.services.store import read_library_vectors

    for index in range(40):
        add_post([f"g{index % 4}"], [index % 4], jitter=0.3)
    library = read_library_vectors(current_extractor_key())
    # A 1 KB budget holds 32 8-d vectors: mini-batches of a quarter, a sample of half.
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "REBUILD_MEMORY_MB": 0.001,
        "CHUNK_SIZE": 4,
        "CLUSTERING": {**settings.IMAGETAGS.get("CLUSTERING", {}), "SEED": 5},
    }

    streamed = rebuild_clusters(k=4, algorithm="minibatch")
    streamed_steps = list(spied_steps)
    spied_steps.clear()
    in_memory = SphericalKMeans(4, seed=5).fit_minibatch(
        len(library.vectors), library.vectors.__getitem__, batch_size=8, sample_size=16
    )

    assert streamed.params["streamed"] is True and library.vectors.shape == (40, DIM)
    assert streamed_steps and streamed_steps == spied_steps
    stored = vectors.stack(
        Cluster.objects.filter(cluster_set=streamed)
        .order_by("index")
        .values_list("centroid", flat=True),
        DIM,
    )
    np.testing.assert_allclose(stored, in_memory.cluster_centers_, atol=1e-6)


def test_an_in_memory_minibatch_rebuild_steps_through_the_core(add_post, spied_steps):
    from imagetags.services.rebuild import rebuild_clusters

    for index in range(20):
        add_post([f"g{index % 2}"], [index % 2])

    cluster_set = rebuild_clusters(k=2, algorithm="minibatch")

    assert "streamed" not in cluster_set.params and cluster_set.k == 2
    assert spied_steps  # the rebuild ran SphericalKMeans' mini-batch steps
