"""suggest(): nearest centre of the active set, ranking, evidence, refusals; suggest_tags CLI."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from imagetags.images import InvalidImage
from imagetags.models import ClusterSet, FeatureStatus, StockImage
from imagetags.services import vectors
from imagetags.services.suggest import ExtractorMismatch, NoActiveClusters, suggest

from .conftest import image_bytes, unit


@pytest.fixture(autouse=True)
def patent_method(settings):
    """These tests pin the patent's nearest-cluster ranking; other methods: test_suggest_methods."""
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "cluster"}


def test_nearest_cluster_tags_ranked_by_post_frequency(soups_and_cakes):
    result = suggest(unit(1, 0.1, seed=99))
    assert [t.name for t in result.tags] == ["food", "soup", "tomato", "pea"]
    assert [t.post_count for t in result.tags] == [4, 4, 2, 1]
    assert result.tags[2].score == 0.5
    assert result.tags[2].evidence == "in 2 of 4 similar posts"
    assert result.cluster_set == soups_and_cakes.pk
    assert result.extractor == soups_and_cakes.extractor_key
    assert 0.9 < result.similarity <= 1.0


def test_limit_threshold_and_exclude(soups_and_cakes):
    query = unit(0, 0.1, seed=5)
    assert [t.name for t in suggest(query, limit=2).tags] == ["food", "sweet"]
    # cake is on 2 of 3 posts (0.67), cupcake on 1 of 3 (0.33).
    assert [t.name for t in suggest(query, threshold=0.5).tags] == ["food", "sweet", "cake"]
    assert [t.name for t in suggest(query, exclude=[" FOOD ", "sweet"]).tags] == ["cake", "cupcake"]


def test_suggest_for_a_stored_image_uses_its_vector(soups_and_cakes):
    image = StockImage.objects.filter(post__tags__name="soup").first()
    assert suggest(image, limit=2).tags[1].name == "soup"


def test_as_dict_is_json_ready(soups_and_cakes):
    data = json.loads(json.dumps(suggest(unit(0), limit=1).as_dict()))
    assert data["tags"] == [
        {
            "name": "food",
            "score": 1.0,
            "post_count": 3,
            "cluster_posts": 3,
            "evidence": "in 3 of 3 similar posts",
        }
    ]
    assert set(data) >= {"cluster", "cluster_index", "cluster_set", "similarity", "extractor"}


def test_no_clusters_yet_is_a_clear_error(db):
    with pytest.raises(NoActiveClusters, match="No clusters yet"):
        suggest(unit(0))


def test_clusters_of_another_extractor_are_not_used(soups_and_cakes):
    ClusterSet.objects.filter(pk=soups_and_cakes.pk).update(extractor_key="tflite/abc/x/224")
    with pytest.raises(ExtractorMismatch, match="built with tflite/abc/x/224"):
        suggest(unit(0))


def test_bad_file_is_refused_before_any_lookup(soups_and_cakes, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    with pytest.raises(InvalidImage, match="not an image"):
        suggest(str(bogus))


@pytest.mark.slow
def test_end_to_end_real_features_and_cli(
    db, make_upload, tmp_path, django_capture_on_commit_callbacks, capsys
):
    """Real extractor, real task path (sync django-q2), real k-means: red photos get red tags."""
    from imagetags.models import Post, PostTag, Tag

    def post_with(color, tags, seed):
        post = Post.objects.create()
        for name in tags:
            PostTag.objects.create(post=post, tag=Tag.objects.get_or_create(name=name)[0])
        with django_capture_on_commit_callbacks(execute=True):
            StockImage.objects.create(
                post=post,
                image=make_upload(f"{tags[0]}{seed}.jpg", color=color, pattern="noise", seed=seed),
            )

    for seed in range(3):
        post_with((220, 20, 20), ["tomato", "red"], seed)
        post_with((20, 40, 220), ["blueberry", "blue"], seed)
    assert StockImage.objects.filter(feature_status=FeatureStatus.READY).count() == 6

    call_command("rebuild_clusters", "--k", "2", "--algorithm", "kmeans")
    query = tmp_path / "query.jpg"
    query.write_bytes(image_bytes(color=(230, 30, 25), pattern="noise", seed=42))
    call_command("suggest_tags", str(query), "--json", "--limit", "2")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["name"] for t in line["tags"]] == ["red", "tomato"]
    assert line["tags"][0]["evidence"] == "in 3 of 3 similar posts"

    call_command("suggest_tags", str(query), "--limit", "1")
    assert "red" in capsys.readouterr().out


def test_suggest_tags_cli_reports_bad_files(soups_and_cakes, tmp_path, capsys):
    bogus = tmp_path / "bogus.jpg"
    bogus.write_bytes(b"")
    with pytest.raises(CommandError, match="1 of 1 files could not be read"):
        call_command("suggest_tags", str(bogus))
    assert "The file is empty" in capsys.readouterr().err


def test_suggest_tags_cli_without_clusters(db, tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(image_bytes())
    with pytest.raises(CommandError, match="No clusters yet"):
        call_command("suggest_tags", str(path))


def test_vectors_round_trip():
    vec = unit(3, 0.2, seed=1)
    assert (vectors.from_bytes(vectors.to_bytes(vec)) == vec).all()
