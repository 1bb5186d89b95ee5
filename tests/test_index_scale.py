"""The serving index at scale (services/index.py): the few queries a warm suggestion makes, the
compact (bfloat16) blocks of large sets, and freshness on both the preloaded and the lazy path."""

from __future__ import annotations

import numpy as np
import pytest

from imagetags.core import kmeans
from imagetags.core import vectors as core_vectors
from imagetags.core.voting import VoteParams
from imagetags.models import ClusterMembership, ClusterSet, Post, StockImage
from imagetags.search.exact import ExactSearch
from imagetags.services import serving
from imagetags.services.assign import assign_to_active_set
from imagetags.services.index import VotingIndex
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.serving import serving_cache
from imagetags.services.suggest import suggest
from imagetags.services.vectors import l2_normalize

from .conftest import unit

# About the exact inverted file itself: every backend is tested in test_search_serving.py.
pytestmark = pytest.mark.usefixtures("exact_search")


def voting_index(cluster_set: ClusterSet) -> VotingIndex:
    return serving_cache().voting_index(cluster_set)


@pytest.fixture(params=["preloaded", "lazy", "lazy-compact"])
def layout(request, monkeypatch):
    """The three ways an index holds its blocks: a small set read whole (float32), a large set
    read per cluster (float32), and a very large one per cluster as bfloat16."""
    if request.param != "preloaded":
        monkeypatch.setattr(VotingIndex, "preload_below_bytes", 0)
    if request.param == "lazy-compact":
        monkeypatch.setattr(ExactSearch, "compact_above_bytes", 0)
    return request.param


def names(result) -> list[str]:
    return [tag.name for tag in result.tags]


# --- bfloat16 blocks, without the database ------------------------------------------------------


def test_bfloat16_keeps_eight_significant_bits():
    values = np.array([1.0, -0.5, 0.1, 3.14159, 1e-20, 0.0], dtype=np.float32)
    back = core_vectors.from_bfloat16(core_vectors.to_bfloat16(values))
    assert back.dtype == np.float32
    assert back[0] == 1.0 and back[1] == -0.5 and back[-1] == 0.0  # exact where representable
    assert np.all(np.abs(back - values) <= np.abs(values) * 2**-8)


def test_compact_blocks_scan_like_float32_beyond_one_widening_step():
    rng = np.random.default_rng(3)
    block = l2_normalize(rng.normal(size=(1000, 512)).astype(np.float32))  # > 256-row steps
    query = block[17]
    compact = core_vectors.to_bfloat16(block)
    sims = core_vectors.block_similarities(compact, query)
    # Exactly the float32 scan of the widened rows, chunking or not ...
    assert np.allclose(sims, core_vectors.from_bfloat16(compact) @ query, atol=1e-6)
    # ... and within bfloat16's rounding of the exact similarities.
    assert np.abs(sims - block @ query).max() < 1e-3
    assert int(np.argmax(sims)) == 17


def test_compact_blocks_find_the_same_neighbours_within_rounding():
    """Synthetic topics: neighbours whose similarities differ by more than the rounding keep
    their order; what may swap are near-ties."""
    rng = np.random.default_rng(5)
    topics = l2_normalize(rng.normal(size=(20, 256)).astype(np.float32))
    labels = rng.integers(0, 20, 4000)
    vectors = l2_normalize(topics[labels] + rng.normal(scale=0.06, size=(4000, 256)))
    centers = topics
    assigned, _sims = kmeans.nearest_centers(vectors, centers)
    exact = ExactSearch(centers, compact=False)
    exact.add(np.arange(4000), vectors, assigned)
    compact = ExactSearch(centers, compact=True)
    compact.add(np.arange(4000), vectors, assigned)
    overlap = []
    for query in l2_normalize(vectors[:50] + rng.normal(scale=0.05, size=(50, 256))):
        ids, sims = exact.search(query[None, :], 20, 3)
        compact_ids, compact_sims = compact.search(query[None, :], 20, 3)
        ids, sims, compact_ids, compact_sims = ids[0], sims[0], compact_ids[0], compact_sims[0]
        overlap.append(len(set(ids.tolist()) & set(compact_ids.tolist())) / 20)
        assert np.abs(np.sort(sims) - np.sort(compact_sims)).max() < 1e-3
    assert np.mean(overlap) >= 0.95


# --- the index on the database --------------------------------------------------------------


def test_a_warm_suggestion_makes_three_queries(soups_and_cakes, django_assert_num_queries):
    query = unit(1, 0.05, seed=8)
    suggest(query)  # loads centres, blocks and priors
    # The active set with its member count (the freshness check: unchanged, nothing to read),
    # which candidates still exist, the voters' tags: nothing else.
    with django_assert_num_queries(3):
        suggest(query)


def test_new_memberships_are_read_only_when_there_are_some(
    soups_and_cakes, add_post, django_assert_num_queries
):
    query = unit(1, 0.02, seed=7)
    suggest(query)
    post = add_post(["food", "soup", "miso"], [1], jitter=0.0)
    assert assign_to_active_set(post.images.all()) == 1
    with django_assert_num_queries(5):  # + the recent keys, then the new members
        assert "miso" in names(suggest(query))
    with django_assert_num_queries(3):
        suggest(query)


def test_a_batch_committed_after_a_later_one_still_votes(soups_and_cakes, add_post, layout):
    """Membership keys are not handed out in commit order on PostgreSQL: a feature batch that
    took its keys first can commit after one that took later keys. Simulated by moving keys."""
    query = unit(1, 0.02, seed=7)
    suggest(query)  # the index is built: its watermark is the newest key
    later = add_post(["food", "soup", "ramen"], [1], jitter=0.0)
    assert assign_to_active_set(later.images.all()) == 1
    moved = ClusterMembership.objects.get(image__post=later)
    high = moved.pk + 100
    ClusterMembership.objects.filter(pk=moved.pk).update(id=high)
    assert "ramen" in names(suggest(query))  # the watermark is now `high`

    earlier = add_post(["food", "soup", "miso"], [1], jitter=0.0)
    assert assign_to_active_set(earlier.images.all()) == 1
    late = ClusterMembership.objects.get(image__post=earlier)
    ClusterMembership.objects.filter(pk=late.pk).update(id=high - 50)  # committed late
    result = suggest(query)
    assert "miso" in names(result)
    assert "ramen" in names(result)
    assert suggest(query).tags == result.tags  # added once, not again at the next refresh


def test_small_sets_are_read_whole_large_ones_per_cluster(add_post, monkeypatch, settings):
    for axis in range(6):
        for _n in range(3):
            add_post([f"topic{axis}", "food"], [axis])
    rebuild_clusters(k=6, algorithm="kmeans")
    imagetags = dict(getattr(settings, "IMAGETAGS", {}) or {})
    settings.IMAGETAGS = {**imagetags, "VOTING": {**imagetags.get("VOTING", {}), "PROBES": 2}}
    assert "topic4" in names(suggest(unit(4, 0.05, seed=1)))
    index = voting_index(ClusterSet.objects.active())
    assert (index.loaded_clusters, index.preload, index.compact) == (6, True, False)

    serving.reset()
    monkeypatch.setattr(VotingIndex, "preload_below_bytes", 0)
    monkeypatch.setattr(ExactSearch, "compact_above_bytes", 0)
    assert "topic4" in names(suggest(unit(4, 0.05, seed=1)))
    index = voting_index(ClusterSet.objects.active())
    assert (index.loaded_clusters, index.preload, index.compact) == (2, False, True)
    assert all(
        index.search.block(c).dtype == core_vectors.BFLOAT16 for c in index.search.loaded_lists
    )


def test_every_layout_suggests_alike(soups_and_cakes, layout):
    expected = {
        0: ["food", "sweet", "cake", "cupcake"],
        1: ["food", "soup", "tomato", "pea"],
    }
    for axis, seed in [(0, 1), (1, 2), (1, 3), (0, 4)]:
        result = suggest(unit(axis, 0.05, seed=seed), limit=4)
        assert set(names(result)) == set(expected[axis]), layout


def test_every_layout_lets_new_members_vote_at_once(soups_and_cakes, add_post, layout):
    query = unit(1, 0.02, seed=7)
    assert "miso" not in names(suggest(query))  # the index is loaded before the post exists
    post = add_post(["food", "soup", "miso"], [1], jitter=0.0)
    assert assign_to_active_set(post.images.all()) == 1
    result = suggest(query)
    assert "miso" in names(result)
    assert next(t for t in result.tags if t.name == "miso").evidence == (
        "on 1 of the 8 most similar posts"
    )


def test_every_layout_stops_deleted_images_voting(soups_and_cakes, layout):
    query = unit(1, 0.05, seed=8)
    assert "pea" in names(suggest(query))
    StockImage.objects.filter(post=Post.objects.get(tags__name="pea")).delete()
    result = suggest(query)
    assert "pea" not in names(result)
    assert result.tags[0].cluster_posts == 6


def test_a_deleted_image_does_not_vote_even_as_the_nearest(soups_and_cakes):
    # The nearest image of all, loaded into the index, then deleted: the next one leads.
    query = unit(1, 0.05, seed=8)
    suggest(query)
    index = voting_index(ClusterSet.objects.active())
    nearest = int(index.neighbours(query, VoteParams()).image_ids[0])
    StockImage.objects.filter(pk=nearest).delete()
    found = index.neighbours(query, VoteParams())
    assert nearest not in found.image_ids.tolist()
    assert len(found.tag_sets) == len(found.post_ids) == found.image_ids.shape[0]


def test_warm_up_loads_the_whole_index_before_the_first_suggestion(
    soups_and_cakes, django_assert_num_queries
):
    from imagetags.services.suggest import warm_up

    warm_up()
    warmed = serving_cache().loaded_index
    assert warmed is not None and warmed.cluster_set_id == soups_and_cakes.pk
    assert warmed.loaded_clusters == 2 and warmed._priors  # every cluster, and the tag shares
    # The first suggestion then costs what later ones do (three queries): no loading ones.
    with django_assert_num_queries(3):
        suggest(unit(0, 0.05, seed=3))


def test_warm_up_without_clusters_only_loads_the_model(db):
    from imagetags.services.suggest import warm_up

    warm_up()
    assert serving_cache().loaded_index is None
