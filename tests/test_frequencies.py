"""TagFrequency stays what a recount of the members says, whichever path changes a post's tags.

The library is hand-built (conftest.soups_and_cakes: cake posts on axis 0, soup posts on axis 1,
K = 2), so the clusters are known; every test compares the stored counts with
:func:`recounted`, which counts from ClusterMembership and ``PostTag.objects.counted()`` alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    Post,
    PostTag,
    StockImage,
    Tag,
    TagFrequency,
    TagSource,
)
from imagetags.services import frequencies
from imagetags.services.assign import assign_to_active_set
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.suggest import suggest
from imagetags.services.tagging import add_tags, remove_auto_tags
from imagetags.services.vocabulary import merge_tags
from tests.conftest import post_admin_form_data, unit

SOUP_AXIS, CAKE_AXIS = 1, 0


def recounted(cluster_set: ClusterSet) -> dict[tuple[int, str], int]:
    """(cluster id, tag name) -> posts of the cluster carrying the counted tag, each post once."""
    tags_of: dict[int, set[str]] = defaultdict(set)
    for post_id, name in PostTag.objects.counted().values_list("post_id", "tag__name"):
        tags_of[post_id].add(name)
    posts_of: dict[int, set[int]] = defaultdict(set)
    for cluster_id, post_id in ClusterMembership.objects.filter(
        cluster_set=cluster_set
    ).values_list("cluster_id", "image__post_id"):
        posts_of[cluster_id].add(post_id)
    return {
        (cluster_id, name): count
        for cluster_id, posts in posts_of.items()
        for name, count in Counter(name for post in posts for name in tags_of[post]).items()
    }


def stored(cluster_set: ClusterSet) -> dict[tuple[int, str], int]:
    return {
        (cluster_id, name): count
        for cluster_id, name, count in TagFrequency.objects.filter(
            cluster__cluster_set=cluster_set
        ).values_list("cluster_id", "tag__name", "post_count")
    }


def assert_counts_true(cluster_set: ClusterSet) -> None:
    assert stored(cluster_set) == recounted(cluster_set)
    members: dict[int, list[int]] = defaultdict(list)
    for cluster_id, post_id in ClusterMembership.objects.filter(
        cluster_set=cluster_set
    ).values_list("cluster_id", "image__post_id"):
        members[cluster_id].append(post_id)
    for cluster in Cluster.objects.filter(cluster_set=cluster_set):
        posts = members[cluster.pk]
        assert (cluster.size, cluster.post_count) == (len(posts), len(set(posts))), cluster


def cluster_tags(axis: int) -> list[str]:
    """The patent's method: the tags of the nearest cluster, by TagFrequency."""
    return [tag.name for tag in suggest(unit(axis), method="cluster", limit=20).tags]


def soup_posts() -> list[Post]:
    return list(Post.objects.filter(post_tags__tag__name="soup").order_by("pk"))


def test_add_tags_counts_the_new_tag_in_the_active_set(soups_and_cakes):
    assert "hearty" not in cluster_tags(SOUP_AXIS)
    for post in soup_posts():
        add_tags(post, ["hearty", "soup"])  # "soup" is on the posts already: counted once
    assert_counts_true(soups_and_cakes)
    assert set(cluster_tags(SOUP_AXIS)[:3]) == {"food", "hearty", "soup"}  # on all 4 posts


def test_removed_tags_stop_counting(soups_and_cakes, settings):
    tomato = PostTag.objects.filter(tag__name="tomato").order_by("pk")
    tomato.first().delete()  # one row, through Model.delete()
    assert_counts_true(soups_and_cakes)
    PostTag.objects.filter(tag__name="tomato").delete()  # the rest, through a queryset
    assert_counts_true(soups_and_cakes)
    assert "tomato" not in cluster_tags(SOUP_AXIS)

    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "COUNTED_TAG_SOURCES": ["typed", "suggested", "imported", "auto"],
    }
    post = soup_posts()[0]
    add_tags(post, ["steaming"], source=TagSource.AUTO)
    assert "steaming" in cluster_tags(SOUP_AXIS)
    assert remove_auto_tags(post) == 1
    assert_counts_true(soups_and_cakes)
    assert "steaming" not in cluster_tags(SOUP_AXIS)


def test_a_tag_that_starts_or_stops_counting_is_recounted(soups_and_cakes):
    post = soup_posts()[0]
    row = PostTag.objects.create(
        post=post, tag=Tag.objects.create(name="broth"), source=TagSource.AUTO
    )
    assert "broth" not in cluster_tags(SOUP_AXIS)  # auto tags do not count
    row.source = TagSource.TYPED  # a person confirmed it
    row.save()
    assert_counts_true(soups_and_cakes)
    assert "broth" in cluster_tags(SOUP_AXIS)
    PostTag.objects.filter(pk=row.pk).get().save()  # an unchanged re-save changes nothing
    assert_counts_true(soups_and_cakes)
    row.source = TagSource.AUTO
    row.save(update_fields=["source"])
    assert_counts_true(soups_and_cakes)
    assert "broth" not in cluster_tags(SOUP_AXIS)


def test_the_admin_inline_keeps_counts_true(admin_client, soups_and_cakes):
    post = Post.objects.filter(post_tags__tag__name="tomato").order_by("pk").first()
    rows = {row.tag.name: row for row in post.post_tags.select_related("tag")}
    pea, chowder = Tag.objects.get(name="pea"), Tag.objects.create(name="chowder")
    data = post_admin_form_data(
        post,
        [
            (rows["food"], rows["food"].tag, False),  # unchanged
            (rows["soup"], rows["soup"].tag, True),  # deleted
            (rows["tomato"], pea, False),  # given another tag
            (None, chowder, False),  # added
        ],
    )
    response = admin_client.post(reverse("admin:imagetags_post_change", args=[post.pk]), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert set(post.tags.values_list("name", flat=True)) == {"food", "pea", "chowder"}
    assert_counts_true(soups_and_cakes)
    assert "chowder" in cluster_tags(SOUP_AXIS)


def test_merge_recounts_the_active_and_the_retired_set(soups_and_cakes):
    retired = soups_and_cakes
    active = rebuild_clusters(k=2, algorithm="kmeans")
    retired.refresh_from_db()
    assert retired.status == ClusterSetStatus.RETIRED
    result = merge_tags([Tag.objects.get(name="cupcake")], Tag.objects.get(name="cake"))
    assert result.clusters_recounted == 2  # the cake cluster of each set
    assert_counts_true(active)
    assert_counts_true(retired)


def test_deleting_a_tag_a_post_or_an_image_keeps_counts_true(soups_and_cakes, add_post):
    Tag.objects.get(name="pea").delete()
    assert_counts_true(soups_and_cakes)
    soup_posts()[0].delete()  # its images, memberships and tags go with it
    assert_counts_true(soups_and_cakes)
    assert "tomato" in cluster_tags(SOUP_AXIS)
    # An image of a post that stays: the post leaves the cluster it was alone in.
    two = add_post(["food", "tart"], [CAKE_AXIS, SOUP_AXIS])
    assign_to_active_set(StockImage.objects.filter(post=two))
    assert "tart" in cluster_tags(SOUP_AXIS)
    soup_image = ClusterMembership.objects.get(
        cluster_set=soups_and_cakes, image__post=two, cluster__tag_frequencies__tag__name="soup"
    ).image
    soup_image.delete()
    assert_counts_true(soups_and_cakes)
    soups_and_cakes.refresh_from_db()
    assert (
        soups_and_cakes.n_images
        == ClusterMembership.objects.filter(cluster_set=soups_and_cakes).count()
    )
    assert "tart" not in cluster_tags(SOUP_AXIS)
    assert "tart" in cluster_tags(CAKE_AXIS)


def test_a_rolled_back_change_leaves_the_counts_as_they_were(soups_and_cakes):
    before = stored(soups_and_cakes)
    with pytest.raises(RuntimeError), transaction.atomic():
        add_tags(soup_posts()[0], ["hearty"])
        raise RuntimeError
    assert stored(soups_and_cakes) == before


def test_assignment_and_recount_of_one_cluster_keep_exact_counts(
    soups_and_cakes, add_post, make_upload
):
    # Both lock the cluster rows in key order before reading (select_for_update on
    # PostgreSQL; SQLite runs one writer at a time), so run one after the other they must add
    # up exactly: here in both orders, a new image of a post the cluster already counts and a
    # new post, around a tag change of a counted post.
    first = soup_posts()[0]
    newcomer = add_post(["food", "soup", "lentil"], [SOUP_AXIS])
    assign_to_active_set(StockImage.objects.filter(post=newcomer))
    add_tags(first, ["lentil"])
    assert_counts_true(soups_and_cakes)
    later = StockImage.objects.create(post=first, image=make_upload("later.jpg"))
    StockImage.objects.filter(pk=later.pk).update(
        vector=StockImage.objects.filter(post=first).first().vector,
        feature_status="ready",
        extractor_key=soups_and_cakes.extractor_key,
    )
    add_tags(first, ["barley"])
    assign_to_active_set([StockImage.objects.get(pk=later.pk)])
    assert_counts_true(soups_and_cakes)
    lentil = TagFrequency.objects.get(cluster__cluster_set=soups_and_cakes, tag__name="lentil")
    assert lentil.post_count == 2  # two posts, one of them with two images there


def test_recount_queries_do_not_grow_with_the_number_of_tags(soups_and_cakes):
    one, many = soup_posts()[:2]
    PostTag.objects.create(post=one, tag=Tag.objects.create(name="t-one"))
    for i in range(20):
        PostTag.objects.create(post=many, tag=Tag.objects.create(name=f"t-{i}"))
    TagFrequency.objects.filter(tag__name__startswith="t-").delete()  # so both must create rows
    with CaptureQueriesContext(connection) as few:
        frequencies.recount_posts([one.pk])
    with CaptureQueriesContext(connection) as lots:
        frequencies.recount_posts([many.pk])
    assert len(lots.captured_queries) == len(few.captured_queries) <= 8
    assert_counts_true(soups_and_cakes)


def test_add_tags_recounts_once(soups_and_cakes, monkeypatch):
    calls = []
    real = frequencies.recount_posts
    monkeypatch.setattr(
        frequencies, "recount_posts", lambda *args: calls.append(args) or real(*args)
    )
    add_tags(soup_posts()[0], [f"new-{i}" for i in range(5)])
    assert len(calls) == 1


def test_a_building_set_is_left_to_its_rebuild(soups_and_cakes):
    building = ClusterSet.objects.create(
        status=ClusterSetStatus.BUILDING, extractor_key="x", algorithm="kmeans", k=1, dim=8
    )
    cluster = Cluster.objects.create(cluster_set=building, index=0, centroid=b"")
    post = soup_posts()[0]
    ClusterMembership.objects.create(
        cluster_set=building, cluster=cluster, image=post.images.get(), similarity=1.0
    )
    snapshot = frequencies.counted_tags_by_post()
    add_tags(post, ["hearty"])
    assert not TagFrequency.objects.filter(cluster=cluster).exists()
    assert_counts_true(soups_and_cakes)
    # Once active, the rebuild recounts what changed since its snapshot.
    building.activate()
    assert frequencies.recount_changed_since(snapshot) == 1
    assert stored(building) == recounted(building)
    assert (cluster.pk, "hearty") in stored(building)


def test_the_many_to_many_managers_keep_counts_true(soups_and_cakes):
    post = soup_posts()[0]
    hearty = Tag.objects.create(name="hearty")
    post.tags.add(hearty)  # bulk_create: no post_save, but m2m_changed
    assert_counts_true(soups_and_cakes)
    hearty.posts.add(*soup_posts()[1:])  # from the other side
    assert_counts_true(soups_and_cakes)
    assert "hearty" in cluster_tags(SOUP_AXIS)
    post.tags.remove(hearty)
    assert_counts_true(soups_and_cakes)
    hearty.posts.clear()
    assert_counts_true(soups_and_cakes)
    assert "hearty" not in cluster_tags(SOUP_AXIS)


def test_add_posts_to_clusters_counts_each_new_post_once(soups_and_cakes, add_post):
    # What assignment does between rebuilds: memberships first, then the increments, with the
    # cluster rows locked (here: one transaction, as assign_to_active_set runs it).
    post = add_post(["food", "soup", "lentil"], [SOUP_AXIS, SOUP_AXIS])
    PostTag.objects.create(post=post, tag=Tag.objects.create(name="machine"), source="auto")
    soup = Cluster.objects.get(cluster_set=soups_and_cakes, tag_frequencies__tag__name="soup")
    with transaction.atomic():
        list(Cluster.objects.select_for_update().filter(pk=soup.pk).values("pk"))
        for image in post.images.all():
            ClusterMembership.objects.create(
                cluster_set=soups_and_cakes, cluster=soup, image=image, similarity=1.0
            )
        frequencies.add_posts_to_clusters({soup.pk: 2}, {soup.pk: {post.pk}})
    assert_counts_true(soups_and_cakes)
    assert "lentil" in cluster_tags(SOUP_AXIS) and "machine" not in cluster_tags(SOUP_AXIS)
