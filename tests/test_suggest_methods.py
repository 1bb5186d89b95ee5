"""suggest() serving the default method (``ivf``: neighbour voting over the nearest clusters) with
evidence, the patent's ``cluster`` on request, and the freshness path: images assigned between
rebuilds vote at once, deleted ones stop voting, tags are read fresh."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured

from imagetags.core import counting, kmeans
from imagetags.core import voting as core_voting
from imagetags.models import ClusterSet, Post, PostTag, StockImage, Tag
from imagetags.services import vectors as vec
from imagetags.services.assign import assign_to_active_set
from imagetags.services.evaluation import ClusterModel, ImageSet, LibraryModel
from imagetags.services.index import VotingIndex
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.serving import serving_cache
from imagetags.services.suggest import suggest, suggest_many, suggest_method

from .conftest import unit

# About the exact inverted file itself: every backend is tested in test_search_serving.py.
pytestmark = pytest.mark.usefixtures("exact_search")


def voting(settings, **values):
    """IMAGETAGS with VOTING values changed (the test settings' other keys kept)."""
    current = dict(getattr(settings, "IMAGETAGS", {}) or {})
    current["VOTING"] = {**current.get("VOTING", {}), **values}
    settings.IMAGETAGS = current


def method(settings, name: str) -> None:
    settings.IMAGETAGS = {**(getattr(settings, "IMAGETAGS", {}) or {}), "SUGGEST_METHOD": name}


def active_set() -> ClusterSet:
    return ClusterSet.objects.active()


def names(result) -> list[str]:
    return [tag.name for tag in result.tags]


def test_default_method_is_neighbour_voting_with_evidence(soups_and_cakes, settings):
    voting(settings, PRIOR_WEIGHT=0.0)
    assert suggest_method() == "ivf"

    result = suggest(unit(1, 0.05, seed=99))

    assert result.method == "ivf"
    # The 4 soup posts carry nearly all the weight; the cake posts are ~1 away in cosine and
    # weigh e^-20 at T = 0.05, below the floor, so cake tags are not suggested.
    assert names(result) == ["food", "soup", "tomato", "pea"]
    food, soup, tomato, pea = result.tags
    assert 0.3 < tomato.score < 0.7  # 2 of 4 soups, weighted by their similarity
    assert (tomato.post_count, tomato.cluster_posts) == (2, 7)
    assert tomato.evidence == "on 2 of the 7 most similar posts"
    assert food.evidence == "on 7 of the 7 most similar posts"
    assert result.cluster_set == soups_and_cakes.pk
    assert "neighbours from" in result.notes[0]
    assert result.as_dict()["method"] == "ivf"


def test_the_patent_method_stays_available(soups_and_cakes, settings):
    query = unit(1, 0.1, seed=99)
    assert suggest(query, method="cluster").tags[2].evidence == "in 2 of 4 similar posts"
    method(settings, "cluster")
    result = suggest(query)
    assert result.method == "cluster"
    assert names(result) == ["food", "soup", "tomato", "pea"]
    assert [t.post_count for t in result.tags] == [4, 4, 2, 1]


def test_a_bad_method_setting_is_refused(soups_and_cakes, settings):
    method(settings, "magic")
    with pytest.raises(ImproperlyConfigured, match="SUGGEST_METHOD"):
        suggest(unit(0))
    with pytest.raises(ValueError, match="Unknown method"):
        suggest(unit(0), method="magic")


def test_prior_weight_lets_a_well_backed_specific_tag_lead(soups_and_cakes, settings):
    # "food" is on 7 of 7 posts (prior 1.0), "soup" on 4 (prior 4/7): among soups both have
    # share ~1, so a little prior puts soup first without dropping food.
    voting(settings, PRIOR_WEIGHT=0.0)
    assert names(suggest(unit(1, 0.05, seed=3)))[:2] == ["food", "soup"]
    voting(settings, PRIOR_WEIGHT=0.1)
    top = suggest(unit(1, 0.05, seed=3)).tags
    assert [t.name for t in top[:2]] == ["soup", "food"]
    assert top[1].score == pytest.approx(0.9, abs=0.01)


def test_limit_threshold_and_exclude(soups_and_cakes, settings):
    voting(settings, PRIOR_WEIGHT=0.0)
    query = unit(0, 0.05, seed=5)
    assert names(suggest(query, limit=2)) == ["food", "sweet"]
    assert names(suggest(query, threshold=0.5)) == ["food", "sweet", "cake"]
    assert names(suggest(query, exclude=[" FOOD ", "sweet"])) == ["cake", "cupcake"]


def test_only_the_probed_clusters_are_loaded(add_post, settings, monkeypatch):
    # What a large set does; a small one is read whole (tests/test_index_scale.py).
    monkeypatch.setattr(VotingIndex, "preload_below_bytes", 0)
    for axis in range(6):
        for _n in range(3):
            add_post([f"topic{axis}", "food"], [axis])
    rebuild_clusters(k=6, algorithm="kmeans")
    voting(settings, PROBES=2)

    result = suggest(unit(4, 0.05, seed=1))

    assert result.tags[0].name in {"topic4", "food"}
    assert "topic4" in names(result)
    assert serving_cache().voting_index(active_set()).loaded_clusters == 2
    assert "6 images in the 2 nearest clusters" in result.notes[0]


def test_new_images_vote_between_rebuilds(soups_and_cakes, add_post, settings):
    voting(settings, PRIOR_WEIGHT=0.0)
    query = unit(1, 0.02, seed=7)
    assert "miso" not in names(suggest(query))  # loads the index before the new post exists

    post = add_post(["food", "soup", "miso"], [1], jitter=0.0)  # exactly on the axis
    assert assign_to_active_set(post.images.all()) == 1  # what the feature task does

    result = suggest(query)
    assert "miso" in names(result)
    miso = next(t for t in result.tags if t.name == "miso")
    assert miso.evidence == "on 1 of the 8 most similar posts"


def test_deleted_images_stop_voting_and_tags_are_read_fresh(soups_and_cakes, settings):
    voting(settings, PRIOR_WEIGHT=0.0)
    query = unit(1, 0.05, seed=8)
    assert "pea" in names(suggest(query))

    pea_post = Post.objects.get(tags__name="pea")
    StockImage.objects.filter(post=pea_post).delete()
    assert "pea" not in names(suggest(query))

    tomato = PostTag.objects.filter(tag__name="tomato").first()
    PostTag.objects.create(post=tomato.post, tag=Tag.objects.create(name="gazpacho"))
    result = suggest(query)
    assert "gazpacho" in names(result)
    assert result.tags[0].cluster_posts == 6  # the deleted post no longer counts


def test_auto_applied_tags_are_not_counted(soups_and_cakes, settings):
    voting(settings, PRIOR_WEIGHT=0.0)
    soup = Post.objects.filter(tags__name="soup").first()
    PostTag.objects.create(post=soup, tag=Tag.objects.create(name="robot"), source="auto")
    assert "robot" not in names(suggest(unit(1, 0.05, seed=9)))


def test_one_vote_per_owner(add_post, settings):
    """One uploader's three "mittens" posts against two people's "tabby" ones."""
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create(username="cat-lover")
    for _n in range(3):
        post = add_post(["cat", "mittens"], [0], jitter=0.0)  # the nearest: exactly the query
        Post.objects.filter(pk=post.pk).update(owner=user)
    for owner in ("flickr:a", "flickr:b"):
        post = add_post(["cat", "tabby"], [0], jitter=0.05)
        Post.objects.filter(pk=post.pk).update(external_owner=owner)
    add_post(["dog"], [3])
    rebuild_clusters(k=2, algorithm="kmeans")
    query = unit(0, 0.0)

    voting(settings, PRIOR_WEIGHT=0.0, TEMPERATURE=None, NEIGHBOURS=5, VOTE_BY="post")
    assert names(suggest(query))[:3] == ["cat", "mittens", "tabby"]
    # The three nearest people: cat-lover (three posts, one vote), flickr:a and flickr:b.
    voting(settings, VOTE_BY="owner", NEIGHBOURS=3)
    result = suggest(query)
    assert names(result)[:3] == ["cat", "tabby", "mittens"]
    assert result.tags[1].evidence == "from 2 of the 3 uploaders of the most similar posts"


def test_serving_and_evaluation_rank_alike(soups_and_cakes):
    """suggest() and the evaluation's LibraryModel use the same ranking code on the same data."""

    images = list(StockImage.objects.order_by("pk").select_related("post"))
    matrix = np.stack([vec.from_bytes(image.vector) for image in images])
    posts = [str(image.post_id) for image in images]
    library = ImageSet(
        entries=[None] * len(images),  # type: ignore[list-item]
        sha256=[image.sha256 for image in images],
        posts=posts,
        post_tags={
            str(image.post_id): frozenset(image.post.tags.values_list("name", flat=True))
            for image in images
        },
        vectors=matrix,
    )
    active = active_set()
    centers = np.stack(
        [vec.from_bytes(c.centroid) for c in active.clusters.order_by("index")]
    ).astype(np.float32)
    labels, sims = kmeans.nearest_centers(matrix, centers)
    counts, freqs = counting.count_tag_frequencies(labels, posts, library.post_tags, len(centers))
    result = kmeans.ClusteringResult(centers, labels, sims, 0.0, 1, "kmeans", 0.0)
    model = LibraryModel.build(library, ClusterModel(result, counts, freqs))
    params = core_voting.VoteParams()
    for seed, axis in enumerate([0, 1, 0, 1, 2]):
        query = unit(axis, 0.3, seed=seed + 20)
        assert names(suggest(query, limit=5)) == model.vote(query, params, 5)


def test_merged_suggestions_say_which_method_answered(soups_and_cakes):
    merged = suggest_many([unit(1, 0.05, seed=1), unit(1, 0.05, seed=2)], limit=3)
    assert merged.method == "ivf"
    assert merged.as_dict()["method"] == "ivf"
    assert merged.tags[0].evidence.startswith("on ")


def test_a_changed_counted_sources_setting_reaches_the_voters_tags(soups_and_cakes, settings):
    """The voters' tags are read with SQL compiled once per process: a settings change (tests,
    override_settings) compiles it again rather than keeping the old sources."""
    voting(settings, PRIOR_WEIGHT=0.0)
    query = unit(1, 0.05, seed=8)
    assert "soup" in names(suggest(query))
    settings.IMAGETAGS = {**settings.IMAGETAGS, "COUNTED_TAG_SOURCES": ["imported"]}
    assert suggest(query).tags == []  # every tag of the library is typed: none counts now
