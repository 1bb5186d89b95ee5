"""Upload form, tag field and widget, the suggestions JSON view, and the no-JavaScript two steps."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from django import forms
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, override_settings
from django.urls import reverse

from imagetags.forms import (
    PostUploadForm,
    SuggestedTagsField,
    TagSelection,
    parse_widget_state,
)
from imagetags.models import Post, PostTag, StockImage, SuggestionFeedback, Tag
from imagetags.services.pending_uploads import PendingUpload
from imagetags.services.shown import sign_shown
from imagetags.services.suggest import SuggestedTag
from imagetags.services.tagging import parse_tag_input
from imagetags.widgets import TagSuggestionWidget, format_tag_input

from .conftest import image_bytes

# A URLconf without imagetags.urls, for the widget's configuration error (see the test below).
urlpatterns: list = []

SUGGEST_URL = "/imagetags/suggestions/"
UPLOAD_URL = "/imagetags/upload/"


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def tag_sources(post: Post) -> dict[str, str]:
    return dict(post.post_tags.values_list("tag__name", "source"))


def pending_files(root: Path) -> list[Path]:
    return stored_files(root / "imagetags" / "pending")


def state(
    shown: list[str],
    accepted: list[str],
    channel: str = "widget",
    cluster_set=None,
    user=None,
    method: str = "cluster",
):
    """The widget's hidden state, with the token the suggestions view would have given ``user``."""
    token = sign_shown(
        [SuggestedTag(n, 0.5, 1, 2, "") for n in shown],
        cluster_set_id=cluster_set,
        method=method,
        user=user,
    )
    return json.dumps(
        {
            "channel": channel,
            "cluster_set": cluster_set,
            "shown": [{"name": n, "score": 0.5, "rank": i} for i, n in enumerate(shown, 1)],
            "accepted": accepted,
            "token": token,
        }
    )


@pytest.fixture
def clusters(make_post):
    """A real library: red photos tagged tomato/red, blue ones blueberry/blue; VGG16 features
    (the suite's extractor) and k-means through the services."""
    from imagetags.services.features import compute_features
    from imagetags.services.rebuild import rebuild_clusters

    for seed in range(3):
        make_post(["tomato", "red"], color=(220, 20, 20), pattern="noise", seed=seed)
        make_post(["blueberry", "blue"], color=(20, 40, 220), pattern="noise", seed=seed)
    summary = compute_features(StockImage.objects.all())
    assert summary.failed == 0
    return rebuild_clusters(k=2, algorithm="kmeans")


@pytest.fixture
def hand_clusters(add_post):
    """An active cluster set from hand-made vectors: enough for every check made before a file
    is embedded (suggest() looks for clusters first, then opens the file)."""
    from imagetags.services.rebuild import rebuild_clusters

    add_post(["soup"], [0])
    add_post(["cake"], [1])
    return rebuild_clusters(k=2, algorithm="kmeans")


def red_photo(name: str = "mine.jpg", seed: int = 42) -> SimpleUploadedFile:
    data = image_bytes(color=(230, 30, 25), pattern="noise", seed=seed)
    return SimpleUploadedFile(name, data, content_type="image/jpeg")


# --- the field ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('salmon, "cuba libre", sushi rice', ["salmon", "cuba libre", "sushi rice"]),
        ("salmon sushi", ["salmon", "sushi"]),  # no comma or quote: spaces separate (taggit)
        ('"a, b", c', ["a, b", "c"]),
        ("Soup,  SOUP , soup", ["soup"]),
        ("  ", []),
    ],
)
def test_field_parses_commas_and_quoted_names(text, names):
    value = SuggestedTagsField(required=False).clean({"text": text, "ticked": [], "state": ""})
    assert isinstance(value, TagSelection) and list(value) == names
    assert value.accepted == [] and value.typed == names


def test_format_tag_input_round_trips_through_the_parser():
    names = ["salmon", "cuba libre", "a, b", "<img src=x onerror=alert(1)>"]
    assert format_tag_input(names) == 'salmon, "cuba libre", "a, b", "<img src=x onerror=alert(1)>"'
    assert parse_tag_input(format_tag_input(names)) == names
    assert parse_tag_input(format_tag_input(["cuba libre"])) == ["cuba libre"]


def test_field_refuses_bad_names_and_too_many():
    field = SuggestedTagsField(max_tags=3)
    with pytest.raises(forms.ValidationError, match="at most 100 characters"):
        field.clean({"text": "ok, " + "x" * 101, "ticked": [], "state": ""})
    with pytest.raises(forms.ValidationError, match="At most 3 tags per post; 4 were given"):
        field.clean({"text": "a, b, c, d", "ticked": [], "state": ""})
    with pytest.raises(forms.ValidationError, match="required"):
        field.clean({"text": " , ", "ticked": [], "state": ""})


def test_accepted_means_shown_and_still_in_the_tags():
    value = SuggestedTagsField().clean(
        {
            "text": "soup, tomato",
            # "bowl" was ticked on the no-JS page; "fake" claims acceptance but was never shown;
            # "red" was accepted, then deleted from the text again.
            "ticked": ["Bowl"],
            "state": state(["soup", "bowl", "red"], ["soup", "fake", "red"], cluster_set=7),
        }
    )
    assert list(value) == ["soup", "tomato", "bowl"]
    assert value.accepted == ["soup", "bowl"] and value.typed == ["tomato"]
    assert [s.name for s in value.shown] == ["soup", "bowl", "red"]
    assert value.cluster_set_id == 7 and value.channel == "widget"


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"shown": [{"name": 5}, "x", {"name": ""}], "accepted": 3, "method": "<b>"}',
    ],
)
def test_malformed_widget_state_is_ignored(raw):
    selection = parse_widget_state(raw)
    assert selection.shown == [] and selection.accepted == [] and selection.channel == "form"
    assert selection.method == ""
    value = SuggestedTagsField().clean({"text": "soup", "ticked": [], "state": raw})
    assert list(value) == ["soup"] and value.accepted == []


# --- the widget --------------------------------------------------------------------------------


class PhotoPostForm(forms.ModelForm):
    """The field on an ordinary ModelForm, watching a file input with another name."""

    photo = forms.ImageField()
    tags = SuggestedTagsField(images_field="photo")

    class Meta:
        model = Post
        fields = ["title"]


def test_widget_media_and_data_attributes(settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 1234, "MAX_FILES_PER_POST": 4}
    form = PhotoPostForm()
    media = str(form.media)
    assert "imagetags/tag-suggestions.js" in media and "imagetags/tag-suggestions.css" in media
    html = str(form["tags"])
    assert "data-imagetags-widget" in html
    assert f'data-imagetags-suggest-url="{reverse("imagetags:suggestions")}"' in html
    assert 'data-imagetags-images-field="photo"' in html
    assert 'data-imagetags-max-bytes="1234"' in html and 'data-imagetags-max-files="4"' in html
    assert 'name="tags_suggestions"' in html and 'id="id_tags"' in html
    assert 'aria-describedby="id_tags_helptext"' in html


def test_widget_in_a_model_form_gives_a_tag_selection():
    form = PhotoPostForm(
        data={"title": "Lunch", "tags": 'soup, "cuba libre"', "tags_suggestions": ""},
        files={"photo": SimpleUploadedFile("p.jpg", image_bytes(), content_type="image/jpeg")},
    )
    assert form.is_valid(), form.errors
    assert form.cleaned_data["tags"] == ["soup", "cuba libre"]


def test_widget_renders_initial_tags_and_escaped_suggestion_checkboxes():
    widget = TagSuggestionWidget(suggest_url="/x/")
    widget.suggestions = [
        SuggestedTag("<img src=x onerror=alert(1)>", 0.5, 1, 2, "in 1 of 2 similar posts"),
        SuggestedTag("soup", 1.0, 2, 2, "in 2 of 2 similar posts"),
    ]
    html = widget.render("tags", TagSelection(["soup", "cuba libre"]))
    assert 'value="soup, &quot;cuba libre&quot;"' in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert re.search(r'value="soup" checked>', html)  # already among the tags: ticked
    assert "(in 2 of 2 similar posts)" in html
    assert 'data-imagetags-suggest-url="/x/"' in html


@override_settings(ROOT_URLCONF="tests.test_forms")
def test_widget_without_the_urls_says_how_to_fix_it():
    with pytest.raises(ImproperlyConfigured, match=r'include\("imagetags.urls"\)'):
        TagSuggestionWidget().render("tags", "")


# --- the JSON view -----------------------------------------------------------------------------


def test_suggestions_need_login_post_and_csrf(db, client, admin_user, settings):
    response = client.post(SUGGEST_URL, {"image": red_photo()})
    assert response.status_code == 403 and response.json()["code"] == "login_required"
    assert "Log in" in response.json()["error"]

    settings.IMAGETAGS = {**settings.IMAGETAGS, "LOGIN_REQUIRED": False}
    response = client.post(SUGGEST_URL, {})
    assert response.status_code == 400 and response.json()["code"] == "no_image"

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(admin_user)
    assert strict.post(SUGGEST_URL, {"image": red_photo()}).status_code == 403  # no token
    assert strict.get(SUGGEST_URL).status_code == 405


@pytest.mark.parametrize(
    ("files", "limits", "status", "code", "message"),
    [
        ([], {}, 400, "no_image", "at least one image"),
        (
            [SimpleUploadedFile("notes.txt", b"just some text\n")],
            {},
            400,
            "invalid_image",
            "notes.txt: The file is text, not an image",
        ),
        (
            [SimpleUploadedFile("page.jpg", b"<!doctype html><html></html>")],
            {},
            400,
            "invalid_image",
            "page.jpg: The file is an HTML page",
        ),
        (
            [SimpleUploadedFile("big.jpg", image_bytes(size=(300, 300), pattern="noise"))],
            {"MAX_UPLOAD_BYTES": 2048},
            413,
            "too_large",
            # Stopped while the file streams in (imagetags.uploads), before its size is known.
            "big.jpg is larger than the limit of 2,048 bytes",
        ),
        (
            [red_photo(f"{i}.jpg") for i in range(3)],
            {"MAX_FILES_PER_POST": 2},
            400,
            "too_many_files",
            "At most 2 images per post; 3 were sent",  # the API's wording, shared
        ),
    ],
    ids=["none", "text", "html", "too-large", "too-many"],
)
def test_suggestions_errors(
    admin_client, hand_clusters, settings, files, limits, status, code, message
):
    settings.IMAGETAGS = {**settings.IMAGETAGS, **limits}
    response = admin_client.post(SUGGEST_URL, {"image": files})
    assert response.status_code == status
    body = response.json()
    assert body["code"] == code and message in body["error"]


def test_suggestions_before_any_clustering_is_409(admin_client):
    response = admin_client.post(SUGGEST_URL, {"image": red_photo()})
    assert response.status_code == 409
    assert response.json()["code"] == "no_clusters"
    assert "not been clustered" in response.json()["error"]


def test_suggestions_bad_limit(admin_client):
    response = admin_client.post(SUGGEST_URL, {"image": red_photo(), "limit": "lots"})
    assert response.status_code == 400 and response.json()["code"] == "bad_limit"


@pytest.mark.slow
def test_suggestions_for_one_and_several_images(admin_client, clusters):
    response = admin_client.post(SUGGEST_URL, {"image": red_photo()})
    assert response.status_code == 200, response.content
    body = response.json()
    # Whatever the ranking method, the red library's tags come first, with their evidence.
    assert {t["name"] for t in body["tags"][:2]} == {"red", "tomato"}
    assert re.fullmatch(r"(in|on) \d+ of .*similar posts", body["tags"][0]["evidence"])
    assert body["cluster_set"] == clusters.pk and body["method"]

    blue = SimpleUploadedFile(
        "blue.jpg", image_bytes(color=(25, 45, 225), pattern="noise", seed=43), "image/jpeg"
    )
    merged = admin_client.post(
        SUGGEST_URL, {"image": [red_photo(), blue], "exclude": "blue", "limit": "3"}
    ).json()
    assert {t["name"] for t in merged["tags"]} == {"red", "tomato", "blueberry"}


# --- the upload page ---------------------------------------------------------------------------


def test_upload_page_needs_login(client, db):
    response = client.get(UPLOAD_URL)
    assert response.status_code == 302
    assert (
        response["Location"].startswith(reverse("admin:login")) and "next=" in response["Location"]
    )


def test_upload_page_renders_the_widget_and_the_no_js_step(admin_client):
    html = admin_client.get(UPLOAD_URL).content.decode()
    assert "imagetags/tag-suggestions.js" in html and "data-imagetags-widget" in html
    assert 'enctype="multipart/form-data"' in html
    assert re.search(r'value="suggest"[^>]*data-imagetags-nojs', html)


def test_widget_submission_saves_sources_and_feedback(admin_client, admin_user, media_root):
    """What the chips' script sends: the text and the hidden state (channel "widget")."""
    Tag.objects.create(name="soup")  # suggestions are made from the library's existing tags
    response = admin_client.post(
        UPLOAD_URL,
        {
            "images": [red_photo("a.jpg"), red_photo("b.jpg", seed=2)],
            "title": "Dinner",
            "tags": 'tomato, red, "sunday lunch"',
            "tags_suggestions": state(
                ["tomato", "red", "soup"], ["tomato", "red"], user=admin_user
            ),
            "step": "save",
        },
    )
    assert response.status_code == 302 and response["Location"] == UPLOAD_URL
    post = Post.objects.get()
    assert post.title == "Dinner" and post.owner == admin_user and post.images.count() == 2
    assert tag_sources(post) == {
        "tomato": "suggested",
        "red": "suggested",
        "sunday lunch": "typed",
    }
    feedback = SuggestionFeedback.objects.filter(post=post)
    assert dict(feedback.values_list("tag__name", "accepted")) == {
        "tomato": True,
        "red": True,
        "soup": False,
    }
    assert set(feedback.values_list("channel", flat=True)) == {"widget"}
    assert pending_files(media_root) == []


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"evil.jpg": b"<html>no</html>"}, "evil.jpg: The file is an HTML page"),
        ({}, "Choose at least one image."),
        ({"empty.jpg": b""}, "The submitted file is empty."),
        ({"ok.jpg": image_bytes(), "cut.jpg": image_bytes()[:200]}, "cut.jpg: The image"),
    ],
    ids=["not-an-image", "no-image", "empty-file", "one-of-two-truncated"],
)
@pytest.mark.parametrize("step", ["save", "suggest"])
def test_bad_images_save_nothing(admin_client, media_root, files, message, step):
    uploads = [SimpleUploadedFile(name, data) for name, data in files.items()]
    response = admin_client.post(UPLOAD_URL, {"images": uploads, "tags": "x", "step": step})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Post.objects.exists() and not StockImage.objects.exists()
    assert stored_files(media_root) == []


def test_too_many_images_save_nothing(admin_client, media_root, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_FILES_PER_POST": 1}
    response = admin_client.post(UPLOAD_URL, {"images": [red_photo(), red_photo("b.jpg")]})
    assert response.status_code == 400
    assert "At most 1 images per post; 2 were sent" in response.content.decode()
    assert not Post.objects.exists() and stored_files(media_root) == []


def test_a_bad_tag_keeps_the_images_for_the_next_try(admin_client, media_root):
    response = admin_client.post(
        UPLOAD_URL, {"images": [red_photo("keep.jpg")], "tags": "ok, " + "x" * 150, "step": "save"}
    )
    assert response.status_code == 400
    assert "at most 100 characters" in response.content.decode()
    assert not Post.objects.exists() and not StockImage.objects.exists()
    # Nothing saved, but the valid image is kept (only in the pending folder) with a token.
    assert len(pending_files(media_root)) == 1 and stored_files(media_root) == pending_files(
        media_root
    )
    token = response.context["form"]["pending"].value()
    assert "keep.jpg" in response.content.decode()

    response = admin_client.post(UPLOAD_URL, {"pending": token, "tags": "ok", "step": "save"})
    assert response.status_code == 302
    image = StockImage.objects.get()
    assert image.image.name.endswith("keep.jpg") and image.post.tags.get().name == "ok"
    assert pending_files(media_root) == []


@pytest.mark.slow
def test_two_step_flow_without_javascript(admin_client, admin_user, media_root, clusters):
    first = admin_client.post(
        UPLOAD_URL,
        {"images": [red_photo("dinner.jpg")], "title": "Dinner", "tags": "mine", "step": "suggest"},
    )
    assert first.status_code == 200
    html = first.content.decode()
    assert not Post.objects.filter(title="Dinner").exists()
    assert len(pending_files(media_root)) == 1
    # The suggestions as checkboxes, with their evidence; the typed tag and title carried over.
    for name in ("red", "tomato"):
        assert f'name="tags_accept" value="{name}"' in html
    assert re.search(r"\((in|on) \d+ of [^)]*similar posts\)", html)
    assert 'value="mine"' in html and 'value="Dinner"' in html
    assert 'value="suggest"' not in html  # the second step only saves
    form = first.context["form"]
    token = form["pending"].value()
    shown_state = form["tags"].value()
    assert isinstance(shown_state, TagSelection) and shown_state.method
    shown = [s.name for s in shown_state.shown]
    assert set(shown[:2]) == {"red", "tomato"}

    second = admin_client.post(
        UPLOAD_URL,
        {
            "pending": token,
            "title": "Dinner",
            "tags": 'mine, "sunday lunch"',
            "tags_accept": ["tomato"],
            "tags_suggestions": json.dumps(shown_state.state()),
            "step": "save",
        },
    )
    assert second.status_code == 302
    post = Post.objects.get(title="Dinner")
    assert post.owner == admin_user
    assert post.images.get().image.name.endswith("dinner.jpg")
    assert tag_sources(post) == {
        "mine": "typed",
        "sunday lunch": "typed",
        "tomato": "suggested",
    }
    feedback = SuggestionFeedback.objects.filter(post=post)
    assert dict(feedback.values_list("tag__name", "accepted")) == {
        name: name == "tomato" for name in shown
    }
    assert set(feedback.values_list("channel", flat=True)) == {"form"}
    assert set(feedback.values_list("cluster_set", flat=True)) == {clusters.pk}
    assert set(feedback.values_list("method", flat=True)) == {shown_state.method}
    assert pending_files(media_root) == []

    # Submitting the second step again (a double click) cannot save the post twice.
    again = admin_client.post(UPLOAD_URL, {"pending": token, "tags": "mine", "step": "save"})
    assert again.status_code == 400 and "already saved or expired" in again.content.decode()
    assert Post.objects.filter(title="Dinner").count() == 1


def test_two_steps_without_clusters_still_save(admin_client, media_root):
    first = admin_client.post(
        UPLOAD_URL, {"images": [red_photo()], "tags": "soup", "step": "suggest"}
    )
    assert first.status_code == 200
    assert "No suggestions yet: this site&#x27;s image library" in first.content.decode()
    token = first.context["form"]["pending"].value()
    second = admin_client.post(UPLOAD_URL, {"pending": token, "tags": "soup", "step": "save"})
    assert second.status_code == 302
    assert list(PostTag.objects.values_list("tag__name", "source")) == [("soup", "typed")]
    assert not SuggestionFeedback.objects.exists() and pending_files(media_root) == []


def test_kept_images_belong_to_their_user_and_expire(
    admin_client, django_user_model, media_root, settings
):
    token = (
        admin_client.post(UPLOAD_URL, {"images": [red_photo()], "step": "suggest"})
        .context["form"]["pending"]
        .value()
    )

    other = Client()
    other.force_login(django_user_model.objects.create_user("other", password="x"))
    response = other.post(UPLOAD_URL, {"pending": token, "tags": "x", "step": "save"})
    assert response.status_code == 400 and "could not be found" in response.content.decode()

    tampered = admin_client.post(UPLOAD_URL, {"pending": token[:-2] + "xx", "step": "save"})
    assert tampered.status_code == 400 and "could not be found" in tampered.content.decode()

    settings.IMAGETAGS = {**settings.IMAGETAGS, "PENDING_UPLOAD_MAX_AGE": -1}
    expired = admin_client.post(UPLOAD_URL, {"pending": token, "step": "save"})
    assert expired.status_code == 400 and "have expired" in expired.content.decode()
    assert not Post.objects.exists()


def test_abandoned_kept_images_are_swept_at_the_next_upload(db, media_root, settings):
    old = PendingUpload.store([red_photo("old.jpg")])
    old_path = pending_files(media_root)[0]
    an_hour_ago = time.time() - 3601
    os.utime(old_path, (an_hour_ago, an_hour_ago))
    new = PendingUpload.store([red_photo("new.jpg")])
    assert pending_files(media_root) == [media_root / new.files[0][0]]
    assert [f.name for f in new.open()] == ["new.jpg"]
    assert old.files[0][0] != new.files[0][0]


def test_second_step_form_can_replace_the_kept_images(admin_client, media_root):
    token = (
        admin_client.post(UPLOAD_URL, {"images": [red_photo("first.jpg")], "step": "suggest"})
        .context["form"]["pending"]
        .value()
    )
    response = admin_client.post(
        UPLOAD_URL,
        {"pending": token, "images": [red_photo("second.jpg", seed=3)], "step": "save"},
    )
    assert response.status_code == 302
    assert StockImage.objects.get().image.name.endswith("second.jpg")
    assert pending_files(media_root) == []


def test_upload_form_can_be_used_directly(db, admin_user, media_root):
    form = PostUploadForm(
        data={
            "title": "T",
            "tags": "a, b",
            "tags_suggestions": state(["a"], ["a"], "form", user=admin_user),
        },
        files={"images": [red_photo()]},
        user=admin_user,
    )
    assert form.is_valid(), form.errors
    post = form.save()
    assert tag_sources(post) == {
        "a": "suggested",
        "b": "typed",
    }
    assert SuggestionFeedback.objects.get().channel == "form"


# --- the demo site's pages ---------------------------------------------------------------------


@pytest.fixture
def demo_site(settings):
    settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "demo_site.gallery"]
    settings.ROOT_URLCONF = "demo_site.urls"
    settings.DEMO_EXTRACTOR_NOTE = "ImageNet VGG16 weights could not be downloaded (no internet?)."


def test_demo_pages_say_why_suggestions_may_be_meaningless(
    demo_site, client, admin_user, make_post
):
    make_post(["soup"], title="Lunch")
    make_post(["cake"], source="suggested", title="Tea")
    response = client.get("/upload/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")

    client.force_login(admin_user)
    html = client.get("/").content.decode()
    # The suite's extractor has random weights, and run_demo.sh's reason comes through settings.
    assert "Suggestions are not meaningful here" in html
    assert "ImageNet VGG16 weights could not be downloaded (no internet?)." in html
    assert '<li class="tag typed" title="typed by a user">soup</li>' in html
    assert '<li class="tag suggested" title="accepted suggestion">cake</li>' in html
    assert (
        'href="/upload/"' in html and 'href="/admin/"' in html and 'href="/api/schema/ui/"' in html
    )

    upload = client.get("/upload/").content.decode()
    assert "data-imagetags-widget" in upload and "imagetags/tag-suggestions.js" in upload
    assert "no internet?" in upload
    saved = client.post("/upload/", {"images": [red_photo()], "title": "New", "tags": "x"})
    assert saved.status_code == 302 and saved["Location"] == "/"
    assert "Saved “New” with 1 tag." in client.get("/").content.decode()
