"""Rebuilds, once-per-post counting, warm start, refusals and freshness, on hand-built vectors.

The vectors are written straight into StockImage rows under the current extractor's key, so
these tests pin the clustering and counting logic without running a model.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import override_settings

from imagetags.core import counting, kmeans, voting
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    PostTag,
    RebuildLock,
    StockImage,
    Tag,
    TagFrequency,
)
from imagetags.services.assign import assign_to_active_set
from imagetags.services.errors import ClusteringError
from imagetags.services.features import ready_images
from imagetags.services.rebuild import current_extractor_key, rebuild_clusters


def frequencies(cluster: Cluster) -> dict[str, int]:
    return dict(cluster.tag_frequencies.values_list("tag__name", "post_count"))


def test_once_per_post_counting_changes_the_ranking():
    # One 9-image post tagged "burger" and three 1-image posts tagged "pizza" in one cluster:
    # per image, burger would win 9 to 3; per post, pizza wins 3 to 1.
    labels = [0] * 12
    post_ids = ["big"] * 9 + ["a", "b", "c"]
    post_tags = {"big": ["burger"], "a": ["pizza"], "b": ["pizza"], "c": ["pizza"]}
    post_counts, counters = counting.count_tag_frequencies(labels, post_ids, post_tags, k=1)
    assert post_counts == [4]
    assert counters[0] == {"pizza": 3, "burger": 1}
    ranked = voting.rank_cluster_tags(counters[0], post_counts[0])
    assert [r.tag for r in ranked] == ["pizza", "burger"]
    assert ranked[0].evidence == "in 3 of 4 similar posts"


def test_a_post_split_across_clusters_votes_in_each():
    post_counts, counters = counting.count_tag_frequencies(
        [0, 1, 1], ["p", "p", "q"], {"p": ["x"], "q": ["x", "y"]}, k=2
    )
    assert post_counts == [1, 2]
    assert counters[0] == {"x": 1}
    assert counters[1] == {"x": 2, "y": 1}


def test_rank_threshold_limit_exclude_and_stable_ties():
    counts = {"b": 2, "a": 2, "c": 1, "d": 4}
    assert [r.tag for r in voting.rank_cluster_tags(counts, 4)] == ["d", "a", "b", "c"]
    assert [r.tag for r in voting.rank_cluster_tags(counts, 4, limit=2)] == ["d", "a"]
    assert [r.tag for r in voting.rank_cluster_tags(counts, 4, threshold=0.5)] == ["d", "a", "b"]
    assert [r.tag for r in voting.rank_cluster_tags(counts, 4, exclude={"d"})] == ["a", "b", "c"]
    assert voting.rank_cluster_tags(counts, 0) == []


def test_rebuild_counts_each_tag_once_per_post(add_post):
    add_post(["burger", "food"], [0] * 9)
    for _ in range(3):
        add_post(["pizza", "food"], [0])
    for _ in range(4):
        add_post(["sea", "food"], [1])

    cluster_set = rebuild_clusters(k=2, algorithm="kmeans")

    assert cluster_set.status == ClusterSetStatus.ACTIVE
    assert (cluster_set.k, cluster_set.n_images, cluster_set.n_posts) == (2, 16, 8)
    cluster_set.refresh_from_db()
    assert (cluster_set.progress, cluster_set.progress_message) == (1.0, "Done.")
    assert cluster_set.heartbeat is not None
    by_size = {c.size: c for c in cluster_set.clusters.all()}
    red, sea = by_size[12], by_size[4]
    assert (red.post_count, sea.post_count) == (4, 4)
    assert frequencies(red) == {"food": 4, "pizza": 3, "burger": 1}
    assert frequencies(sea) == {"food": 4, "sea": 4}
    assert ClusterMembership.objects.filter(cluster_set=cluster_set).count() == 16


def test_rebuild_leaves_out_auto_tags_and_other_extractors(add_post):
    add_post(["kept"], [0, 0])
    add_post(["kept"], [0])
    auto_post = add_post([], [0])
    PostTag.objects.create(post=auto_post, tag=Tag.objects.create(name="guess"), source="auto")
    add_post(["elsewhere"], [1], key="some/other/extractor")

    cluster_set = rebuild_clusters(k=1)

    assert cluster_set.n_images == 4  # the vector of the other extractor is not mixed in
    cluster = cluster_set.clusters.get()
    assert frequencies(cluster) == {"kept": 2}
    assert cluster.post_count == 3
    # Nothing is written to the other extractor's image: it is stale only for this key, and
    # usable again as it is if that extractor is configured once more.
    other = StockImage.objects.get(extractor_key="some/other/extractor")
    assert other.feature_status == FeatureStatus.READY
    assert other.vector is not None


def test_new_set_retires_the_old_one_and_only_one_is_active(add_post):
    for axis in (0, 0, 1, 1):
        add_post(["t"], [axis])
    first = rebuild_clusters(k=2)
    second = rebuild_clusters(k=2, seed=1)
    first.refresh_from_db()
    assert first.status == ClusterSetStatus.RETIRED
    assert second.status == ClusterSetStatus.ACTIVE
    assert ClusterSet.objects.active() == second
    assert ClusterSet.objects.filter(status=ClusterSetStatus.ACTIVE).count() == 1
    # The retired set keeps its clusters and counts for rollback.
    assert (
        first.clusters.count() == 2
        and TagFrequency.objects.filter(cluster__cluster_set=first).exists()
    )


def test_failed_rebuild_keeps_the_active_set(add_post, monkeypatch):
    for axis in (0, 0, 1, 1):
        add_post(["t"], [axis])
    good = rebuild_clusters(k=2)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(counting, "count_tag_frequencies", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        rebuild_clusters(k=2)

    assert ClusterSet.objects.active() == good
    failed = ClusterSet.objects.get(status=ClusterSetStatus.FAILED)
    assert "disk full" in failed.error


def test_refuses_without_vectors(db, make_post):
    with pytest.raises(ClusteringError, match="library is empty"):
        rebuild_clusters(k=2)
    make_post(tags=["x"], images=2)  # saved, but no task ran: features pending
    with pytest.raises(ClusteringError, match=r"No feature vectors .* 2 images pending"):
        rebuild_clusters(k=2)
    assert not ClusterSet.objects.exists()


def test_refuses_fewer_vectors_than_k(add_post):
    add_post(["x"], [0, 1, 2])
    with pytest.raises(ClusteringError, match=r"Only 3 images have vectors .* fewer than K=5"):
        rebuild_clusters(k=5)
    assert not ClusterSet.objects.exists()


def test_auto_k_follows_library_size():
    assert kmeans.auto_k(10) == 2
    assert kmeans.auto_k(480) == 30
    assert kmeans.auto_k(10**6) == 150


def test_warm_start_begins_from_the_active_centres(add_post):
    for axis in (0, 0, 0, 1, 1, 1, 2, 2, 2):
        add_post(["t"], [axis])
    first = rebuild_clusters(k=3, algorithm="kmeans")
    add_post(["late"], [2, 2])

    warm = rebuild_clusters(warm_start=True, algorithm="kmeans")

    assert warm.warm_started_from == first
    assert warm.k == 3 and warm.params["warm_start"] is True
    assert warm.n_images == 11
    # Started from converged centres, k-means needs next to no iterations.
    assert warm.iterations <= 2
    with pytest.raises(ClusteringError, match="keeps the active set's K=3"):
        rebuild_clusters(warm_start=True, k=5)


def test_warm_start_needs_an_active_set(add_post):
    add_post(["t"], [0, 1])
    with pytest.raises(ClusteringError, match="needs an active cluster set"):
        rebuild_clusters(warm_start=True)


def test_new_images_join_the_active_set_once_per_post(add_post):
    for axis in (0, 0, 1, 1):
        add_post(["base"], [axis])
    rebuild_clusters(k=2, algorithm="kmeans")

    post = add_post(["base", "fresh"], [1, 1])
    images = list(post.images.all())

    assert assign_to_active_set(images[:1]) == 1
    cluster = ClusterMembership.objects.get(image=images[0]).cluster
    assert (cluster.size, cluster.post_count) == (3, 3)
    assert frequencies(cluster) == {"base": 3, "fresh": 1}

    # The post's second image lands in the same cluster: one more image, not one more post.
    assert assign_to_active_set(images) == 1  # the first one is already a member
    cluster.refresh_from_db()
    assert (cluster.size, cluster.post_count) == (4, 3)
    assert frequencies(cluster) == {"base": 3, "fresh": 1}
    assert assign_to_active_set(images) == 0  # a task delivered twice changes nothing


def _cluster_state() -> dict[int, tuple[int, int, dict[str, int]]]:
    return {
        c.index: (c.size, c.post_count, frequencies(c))
        for c in Cluster.objects.filter(cluster_set=ClusterSet.objects.active())
    }


def test_a_batch_joins_the_active_set_like_images_one_by_one(add_post):
    """One call for a whole batch (what the feature task does) must count exactly what one
    call per image counts: a post once per cluster, however its images arrive."""
    for axis in (0, 0, 1, 1, 2):
        add_post(["base", f"axis{axis}"], [axis])
    rebuild_clusters(k=3, algorithm="kmeans", seed=0)
    before = _cluster_state()
    posts = [
        add_post(["base", "twins"], [1, 1]),  # two images, one cluster: one more post
        add_post(["split", "axis0"], [0, 2]),  # two images, two clusters: a post in each
        add_post(["fresh"], [2]),
        add_post([], [0]),
    ]
    images = [image for post in posts for image in post.images.order_by("pk")]

    with transaction.atomic():
        one_by_one = sum(assign_to_active_set([image]) for image in images)
        expected = _cluster_state()
        transaction.set_rollback(True)
    assert _cluster_state() == before  # rolled back: the batch starts from the same state

    assert assign_to_active_set(images) == one_by_one == 6
    assert _cluster_state() == expected
    assert ClusterSet.objects.active().n_images == 11
    assert assign_to_active_set(images) == 0


def test_rebuild_clusters_command_prints_a_summary(add_post, capsys):
    for axis in (0, 0, 1, 1):
        add_post(["cake"] if axis == 0 else ["soup"], [axis])
    call_command("rebuild_clusters", "--k", "2", "--algorithm", "kmeans", "--seed", "3")
    out = capsys.readouterr().out
    assert "is active: K=2, 4 images in 4 posts, kmeans" in out
    assert "cake (2)" in out and "soup (2)" in out
    assert ClusterSet.objects.active().params["seed"] == 3


def test_rebuild_clusters_command_refuses_clearly(db):
    with pytest.raises(CommandError, match="library is empty"):
        call_command("rebuild_clusters", "--k", "2")
    with pytest.raises(CommandError):
        call_command("rebuild_clusters", "--k", "many")


# --- another extractor configured: staleness derived from the key ------------------------------


@pytest.fixture
def another_extractor(settings) -> dict:
    """IMAGETAGS naming an extractor with another key (computing a key loads no model)."""
    other = {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "max", "input_size": 32}}
    if settings.IMAGETAGS["EXTRACTOR"] == other:
        other = {**other, "OPTIONS": {**other["OPTIONS"], "pooling": "avg"}}
    return {**settings.IMAGETAGS, "EXTRACTOR": other}


def _library_state() -> dict:
    """Everything a rebuild could write, to compare before and after."""
    return {
        "images": sorted(
            StockImage.objects.values_list(
                "pk", "feature_status", "extractor_key", "vector", "feature_attempts"
            )
        ),
        "sets": sorted(ClusterSet.objects.values_list("pk", "status", "activated")),
        "clusters": Cluster.objects.count(),
        "members": ClusterMembership.objects.count(),
        "frequencies": TagFrequency.objects.count(),
        "locks": RebuildLock.objects.count(),
    }


def test_rebuild_with_another_extractor_configured_refuses_and_changes_nothing(
    add_post, another_extractor
):
    for axis in (0, 0, 1, 1):
        add_post(["t"], [axis])
    active = rebuild_clusters(k=2)
    old_key = current_extractor_key()
    before = _library_state()

    with override_settings(IMAGETAGS=another_extractor):
        new_key = current_extractor_key()
        assert new_key != old_key
        expected = (
            f"4 of 4 ready vectors were made by extractor {old_key}, not the configured "
            f"{new_key}: run `manage.py compute_features --stale` first, or set "
            "IMAGETAGS['EXTRACTOR'] back."
        )
        with pytest.raises(ClusteringError) as info:
            rebuild_clusters(k=2)
        assert expected in str(info.value)
        with pytest.raises(CommandError) as info:
            call_command("rebuild_clusters", "--k", "2")
        assert expected in str(info.value)
        assert _library_state() == before
        assert ClusterSet.objects.active() == active
        assert not ready_images(new_key).exists()  # nothing is usable under the new key ...

    # ... and switching back makes every vector usable at once, with no recompute.
    assert ready_images(old_key).count() == 4
    assert _library_state() == before
    assert rebuild_clusters(k=2).n_images == 4


def test_a_minority_of_other_key_vectors_is_left_out_a_majority_refused(add_post):
    add_post(["kept"], [0, 0, 1])
    add_post(["elsewhere"], [1, 1], key="some/other/extractor")

    assert rebuild_clusters(k=1).n_images == 3  # 2 of 5 have another key: left out
    add_post(["elsewhere"], [1, 1], key="some/other/extractor")
    with pytest.raises(
        ClusteringError, match="^4 of 7 ready vectors were made by extractor some/other/extractor"
    ):
        rebuild_clusters(k=1)
