"""MAX_TAGS_PER_POST on every path, and shown suggestions that never create tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django import forms
from django.urls import reverse

from imagetags.forms import SuggestedTagsField
from imagetags.models import Post, PostTag, StockImage, SuggestionFeedback, Tag
from imagetags.services.library import import_manifest
from imagetags.services.posts import ShownSuggestion, create_post, record_feedback
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.tagging import TooManyTags, add_tags, apply_auto_tags

from .conftest import image_bytes, post_admin_form_data


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def names(count: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def test_add_tags_counts_the_tags_already_on_the_post(make_post):
    post = make_post(tags=names(49))
    with pytest.raises(TooManyTags, match="At most 50 tags per post; 51 were given."):
        add_tags(post, ["new1", "new2", "t0"])
    assert post.post_tags.count() == 49 and not Tag.objects.filter(name="new1").exists()
    assert [pt.tag.name for pt in add_tags(post, ["t3", "new1"])] == ["new1"]  # exactly 50
    assert add_tags(post, ["t1", "new1"]) == []  # nothing new: no error at the limit


def test_create_post_refuses_before_writing_anything(db, make_upload, media_root, settings):
    with pytest.raises(TooManyTags, match="At most 50 tags per post; 51 were given."):
        create_post(
            files=[make_upload()], typed_tags=names(30), accepted_tags=names(21, prefix="s")
        )
    assert not Post.objects.exists() and not Tag.objects.exists()
    assert stored_files(media_root) == []
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_TAGS_PER_POST": 3}
    with pytest.raises(TooManyTags, match="At most 3 tags per post; 4 were given."):
        create_post(files=[make_upload()], typed_tags=names(4))


def test_the_form_field_reads_the_limit_when_it_cleans(settings):
    field = SuggestedTagsField()  # made before the setting changes, as forms are at import
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_TAGS_PER_POST": 2}
    with pytest.raises(forms.ValidationError, match="At most 2 tags per post; 3 were given."):
        field.clean({"text": "a, b, c", "ticked": [], "state": ""})
    assert list(field.clean({"text": "a, b", "ticked": [], "state": ""})) == ["a", "b"]


def test_the_upload_page_refuses_51_tags(admin_client, make_upload, media_root):
    response = admin_client.post(
        "/imagetags/upload/", {"images": [make_upload()], "tags": ", ".join(names(51))}
    )
    assert response.status_code == 400
    assert "At most 50 tags per post; 51 were given." in response.content.decode()
    assert not Post.objects.exists() and not Tag.objects.exists()


def test_the_api_refuses_3000_tags_with_the_limit_and_the_count(admin_client, make_upload):
    response = admin_client.post(
        "/api/imagetags/posts/", {"images": make_upload(), "tags": ", ".join(names(3000))}
    )
    assert response.status_code == 400
    assert response.json() == {"tags": ["At most 50 tags per post; 3000 were given."]}
    assert not Tag.objects.exists()


def test_manifests_refuse_a_line_and_a_post_over_the_limit(db, tmp_path, media_root):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(image_bytes(seed=len(name) + ord(name[0]), pattern="noise"))
    lines = [
        {"path": "a.jpg", "tags": names(51)},
        {"path": "b.jpg", "tags": names(30, "x"), "post": "p"},
        {"path": "c.jpg", "tags": names(30, "y"), "post": "p"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = import_manifest(tmp_path / "m.jsonl")
    reasons = {r.line: r.reason for r in summary.rejected}
    assert reasons[1] == "the post would have 51 tags; at most 50 per post (MAX_TAGS_PER_POST)"
    for line in (2, 3):
        assert (
            reasons[line] == "the post would have 60 tags; at most 50 per post (MAX_TAGS_PER_POST)"
        )
    assert summary.imported == 0 and not Tag.objects.exists() and not StockImage.objects.exists()


def test_a_manifest_cannot_grow_an_existing_post_past_the_limit(db, tmp_path, media_root):
    (tmp_path / "a.jpg").write_bytes(image_bytes(seed=1, pattern="noise"))
    (tmp_path / "b.jpg").write_bytes(image_bytes(seed=2, pattern="noise"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.jpg", "tags": names(40), "post": "p"}) + "\n")
    assert import_manifest(manifest).imported == 1
    manifest.write_text(json.dumps({"path": "b.jpg", "tags": names(11, "z"), "post": "p"}) + "\n")
    summary = import_manifest(manifest)
    assert [r.reason for r in summary.rejected] == [
        "the post would have 51 tags; at most 50 per post (MAX_TAGS_PER_POST)"
    ]
    assert Post.objects.get().tags.count() == 40 and StockImage.objects.count() == 1


def test_the_admin_inline_refuses_more_than_the_limit(admin_client, make_post, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_TAGS_PER_POST": 2}
    post = make_post(tags=["a", "b"])
    extra = Tag.objects.create(name="c")
    rows = [(row, row.tag, False) for row in post.post_tags.order_by("pk").select_related("tag")]
    data = post_admin_form_data(post, [*rows, (None, extra, False)])
    change_url = reverse("admin:imagetags_post_change", args=[post.pk])
    response = admin_client.post(change_url, data)
    assert response.status_code == 200
    assert "At most 2 tags per post; 3 were given." in response.content.decode()
    assert post.post_tags.count() == 2

    data["post_tags-0-DELETE"] = "on"  # one out, one in: two stay
    response = admin_client.post(change_url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert set(post.tags.values_list("name", flat=True)) == {"b", "c"}


def test_auto_tags_fill_only_the_room_left(add_post, settings):
    for _ in range(3):
        add_post(["soup", "food", "bowl"], [1])
    rebuild_clusters(k=1)
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "AUTO_TAG": True,
        "AUTO_TAG_THRESHOLD": 0.5,
        "MAX_TAGS_PER_POST": 3,
    }
    post = add_post(["mine", "soup"], [1])
    applied = apply_auto_tags(post)  # room for one of bowl/food; soup is there already
    assert len(applied) == 1 and post.post_tags.count() == 3
    assert apply_auto_tags(post) == []


def test_feedback_never_creates_tags_and_is_capped(make_post):
    post = make_post(tags=["soup"])
    shown = [ShownSuggestion("soup", 0.9, 1)] + [
        ShownSuggestion(f"made-up {i}", 0.1, i + 2) for i in range(3000)
    ]
    rows = record_feedback(post, shown, accepted={"soup"}, channel="api")
    assert [(row.tag.name, row.accepted) for row in rows] == [("soup", True)]
    assert Tag.objects.count() == 1

    many = [Tag.objects.create(name=f"tag {i}") for i in range(150)]
    rows = record_feedback(
        post, [ShownSuggestion(t.name) for t in many], accepted=set(), channel="api"
    )
    assert len(rows) == 100 and SuggestionFeedback.objects.count() == 101
    assert not PostTag.objects.filter(tag__in=many).exists()
