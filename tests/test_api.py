"""The REST API: every endpoint, its permission/throttle defaults, each error status, the schema."""

from __future__ import annotations

import ast
import base64
import io
import json
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from drf_spectacular.validation import validate_schema

from imagetags.api.serializers import SuggestedTagSerializer, SuggestionsSerializer
from imagetags.images import InvalidImage, open_image
from imagetags.models import (
    ClusterSet,
    ClusterSetStatus,
    Post,
    PostTag,
    StockImage,
    SuggestionFeedback,
    Tag,
    TagFrequency,
)
from imagetags.services.extractors import get_extractor
from imagetags.services.features import compute_features
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.shown import sign_shown
from imagetags.services.suggest import NoActiveClusters, SuggestedTag, suggest, suggest_many

from .conftest import PASSWORD, PROJECT_ROOT, image_bytes


def url(name: str, *args: object) -> str:
    return reverse(f"imagetags_api:{name}", args=args)


def upload(name: str = "photo.jpg", data: bytes | None = None, **kwargs) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, image_bytes(**kwargs) if data is None else data, "image/jpeg")


def stored_files(media_root: Path) -> list[Path]:
    return [p for p in media_root.rglob("*") if p.is_file()] if media_root.exists() else []


@pytest.fixture
def two_topics(add_post) -> ClusterSet:
    """Hand-built 8-d vectors. Axis 0: cakes (3 posts); axis 1: soups (4 posts)."""
    for name in ("cake", "cake", "cupcake"):
        add_post(["food", name, "sweet"], [0])
    for extra in ("tomato", "tomato", "pea", None):
        add_post(["food", "soup"] + ([extra] if extra else []), [1])
    return rebuild_clusters(k=2, algorithm="kmeans")


@pytest.fixture
def colour_library(make_post) -> ClusterSet:
    """Real features (the test extractor) of red and blue photos, clustered: red gets red tags."""
    for seed in range(3):
        make_post(["tomato", "red"], color=(220, 20, 20), pattern="noise", seed=seed)
        make_post(["blueberry", "blue"], color=(20, 40, 220), pattern="noise", seed=seed)
    compute_features(StockImage.objects.all())
    return rebuild_clusters(k=2, algorithm="kmeans")


def red(name: str = "red.jpg") -> SimpleUploadedFile:
    return upload(name, color=(230, 30, 25), pattern="noise", seed=42)


def blue(name: str = "blue.jpg") -> SimpleUploadedFile:
    return upload(name, color=(25, 45, 230), pattern="noise", seed=43)


# --- suggestions for uploads -----------------------------------------------------------------


@pytest.mark.slow
def test_suggestions_for_an_upload_come_from_its_nearest_cluster(
    api, colour_library, media_root, settings
):
    # The evidence asserted below is the patent method's ("in n of N similar posts").
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "cluster"}
    files_before = stored_files(media_root)
    response = api.post(url("suggestions"), {"image": red(), "limit": "2"})
    assert response.status_code == 200, response.content
    body = response.json()
    expected = suggest(io.BytesIO(red().read()), limit=2)
    assert [t["name"] for t in body["tags"]] == ["red", "tomato"]
    assert body["tags"] == [
        {k: v for k, v in tag.as_dict().items() if k in body["tags"][0]} for tag in expected.tags
    ]
    assert body["tags"][0]["evidence"] == "in 3 of 3 similar posts"
    # The response is built directly (not field by field): it must still be what the schema says.
    assert set(body) == set(SuggestionsSerializer._declared_fields)
    assert all(set(tag) == set(SuggestedTagSerializer._declared_fields) for tag in body["tags"])
    assert body["cluster"] == expected.cluster and body["clusters"] == [expected.cluster]
    assert body["cluster_set"] == colour_library.pk
    assert body["extractor"] == colour_library.extractor_key
    # Asking for suggestions stores nothing.
    assert StockImage.objects.count() == 6 and stored_files(media_root) == files_before


@pytest.mark.slow
def test_several_images_merge_their_suggestions(api, colour_library):
    response = api.post(url("suggestions"), {"image": [red(), blue()], "exclude": "tomato"})
    assert response.status_code == 200, response.content
    body = response.json()
    expected = suggest_many(
        [io.BytesIO(red().read()), io.BytesIO(blue().read())], exclude=["tomato"]
    )
    assert [t["name"] for t in body["tags"]] == [t.name for t in expected.tags]
    assert {"red", "blue", "blueberry"} <= {t["name"] for t in body["tags"]}
    assert "tomato" not in {t["name"] for t in body["tags"]}
    assert body["cluster"] is None
    assert body["clusters"] == [r.cluster for r in expected.per_image]
    assert len(set(body["clusters"])) == 2


def test_each_upload_is_decoded_once(api, colour_library, monkeypatch):
    """The endpoint validates the uploads by opening them, and embeds what it opened: decoding
    a file a second time would cost as much as a light model's forward pass."""
    from imagetags import images

    opened = []
    real_open = images.open_image

    def counting_open(source, **kwargs):
        opened.append(kwargs.get("draft_size"))
        return real_open(source, **kwargs)

    monkeypatch.setattr(images, "open_image", counting_open)
    monkeypatch.setattr("imagetags.services.posts.open_image", counting_open)
    response = api.post(url("suggestions"), {"image": [red(), blue()]})
    assert response.status_code == 200, response.content
    assert len(opened) == 2  # one per file
    assert set(opened) == {get_extractor().decode_size}  # at the model's scale


def test_no_clusters_yet_is_409_with_the_reason(api, media_root):
    response = api.post(url("suggestions"), {"image": upload()})
    assert response.status_code == 409
    assert response.json() == {"detail": str(NoActiveClusters())}


def test_clusters_of_another_extractor_are_409(api, two_topics):
    ClusterSet.objects.filter(pk=two_topics.pk).update(extractor_key="tflite/other/x/224")
    response = api.get(url("image-suggestions", StockImage.objects.first().pk))
    assert response.status_code == 409
    assert "built with tflite/other/x/224" in response.json()["detail"]


# --- suggestions for stored images ---------------------------------------------------------


def test_stored_image_uses_its_stored_vector(api, two_topics):
    image = StockImage.objects.filter(post__tags__name="soup").first()
    response = api.get(url("image-suggestions", image.pk), {"limit": "3", "exclude": "food"})
    # The file is a plain JPEG: embedding it would give a 512-d vector and a 409, so a 200
    # with the soup cluster's tags means the stored 8-d vector was used.
    assert response.status_code == 200, response.content
    expected = suggest(image, limit=3, exclude=["food"])
    assert [t["name"] for t in response.json()["tags"]] == [t.name for t in expected.tags]
    assert [t["name"] for t in response.json()["tags"]] == ["soup", "tomato", "pea"]
    assert response.json()["cluster"] == expected.cluster


def test_stored_image_errors(api, two_topics, make_post):
    assert api.get(url("image-suggestions", 999999)).status_code == 404
    # No vector yet, and the file is gone: the library's state, not the client's fault.
    pending = make_post(["x"]).images.get()
    pending.image.storage.delete(pending.image.name)
    response = api.get(url("image-suggestions", pending.pk))
    assert response.status_code == 409
    assert response.json()["detail"].startswith(
        f"Image {pending.pk} has no current feature vector and its file cannot be read"
    )


@pytest.mark.parametrize("limit", ["0", "abc", "101"])
def test_bad_limit_is_a_field_error(api, two_topics, limit):
    image = StockImage.objects.first()
    response = api.get(url("image-suggestions", image.pk), {"limit": limit})
    assert response.status_code == 400
    assert list(response.json()) == ["limit"]
    response = api.post(url("suggestions"), {"image": upload(), "limit": limit})
    assert response.status_code == 400
    assert list(response.json()) == ["limit"]


# --- bad uploads ----------------------------------------------------------------------------


def test_missing_file_field_is_a_field_error(api):
    response = api.post(url("suggestions"), {"limit": "3"})
    assert response.status_code == 400
    # The shared validator's wording (the widget's JSON view says the same).
    assert response.json() == {"image": ["Send at least one image in the field “image”."]}
    response = api.post(url("suggestions"), {"image": "not a file"})
    assert response.status_code == 400 and list(response.json()) == ["image"]


@pytest.mark.parametrize(
    "data",
    [b"just some notes", b"<svg onload=alert(1)></svg>", b"", image_bytes()[:200]],
    ids=["text", "svg", "empty", "truncated-jpeg"],
)
def test_invalid_image_is_400_with_the_reason(api, two_topics, data, media_root):
    with pytest.raises(InvalidImage) as reason:
        open_image(io.BytesIO(data))
    response = api.post(url("suggestions"), {"image": upload("notes.jpg", data)})
    assert response.status_code == 400
    assert response.json() == {"image": [f"notes.jpg: {reason.value}"]}


def test_json_sent_to_the_multipart_endpoints_is_415(api):
    for name in ("suggestions", "post-list"):
        response = api.post(url(name), {"image": "x"}, content_type="application/json")
        assert response.status_code == 415, name
        assert "application/json" in response.json()["detail"]


def test_malformed_multipart_is_400(api):
    response = api.post(
        url("suggestions"), b"--x\r\ngarbage", content_type="multipart/form-data; boundary="
    )
    assert response.status_code == 400
    assert "Multipart form parse error" in response.json()["detail"]


def test_django_upload_limits_answer_in_json(api, settings, monkeypatch):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    response = api.post(url("suggestions"), {"image": [upload(f"{i}.jpg") for i in range(3)]})
    assert response.status_code == 400
    assert response.json() == {"detail": "Too many files in one request (more than 2)."}
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    response = api.post(url("suggestions"), {"image": upload(), "exclude": "x" * 200})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("The form fields (other than files) are larger")


def test_too_many_files_is_400_on_the_file_field(api, settings, media_root):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_FILES_PER_POST": 2}
    files = [upload(f"{i}.jpg") for i in range(3)]
    response = api.post(url("suggestions"), {"image": files})
    assert response.status_code == 400
    assert response.json() == {"image": ["At most 2 images per post; 3 were sent."]}
    response = api.post(url("post-list"), {"images": [upload(f"{i}.jpg") for i in range(3)]})
    assert response.status_code == 400
    assert response.json() == {"images": ["At most 2 images per post; 3 were sent."]}
    assert not Post.objects.exists() and stored_files(media_root) == []


def big_jpeg(name: str = "big.jpg") -> SimpleUploadedFile:
    return upload(name, size=(200, 200), pattern="noise")


def test_a_file_over_the_limit_is_413_while_it_streams_in(api, settings, monkeypatch):
    data = big_jpeg().read()
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": len(data) - 1}
    # Without the request validator's check: the upload handler alone must stop the file.
    monkeypatch.setattr(
        "imagetags.services.suggestion_requests.check_upload_size", lambda upload: None
    )
    response = api.post(url("suggestions"), {"image": big_jpeg()})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"big.jpg is larger than the limit of {len(data) - 1:,} bytes."
    }


def test_a_file_parsed_before_the_view_is_still_413(api, settings, monkeypatch):
    data = big_jpeg().read()
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": len(data) - 1}
    # As if a site's middleware had parsed the body without the streaming handler.
    monkeypatch.setattr(
        "imagetags.api.uploads.FileSizeLimitHandler.receive_data_chunk", lambda self, d, s: d
    )
    response = api.post(url("suggestions"), {"image": big_jpeg()})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("big.jpg is larger than the limit")


def test_a_body_too_large_to_be_valid_is_413_before_it_is_read(api, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 1000, "MAX_FILES_PER_POST": 2}
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    limit = 2 * 1000 + 1000 + 64 * 1024
    # Not even multipart: had the body been parsed, this would be a 400.
    response = api.post(
        url("suggestions"), b"x" * (limit + 1), content_type="multipart/form-data; boundary=b"
    )
    assert response.status_code == 413
    assert response.json()["detail"].startswith(f"The request body is {limit + 1:,} bytes")


def test_a_post_over_the_size_limit_saves_nothing(api, settings, media_root):
    data = big_jpeg().read()
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": len(data) - 1}
    response = api.post(url("post-list"), {"images": [upload("ok.jpg"), big_jpeg()], "tags": "x"})
    assert response.status_code == 413
    assert not Post.objects.exists() and not Tag.objects.exists()
    assert stored_files(media_root) == []


# --- authentication, permissions, throttling, CSRF -------------------------------------------


ENDPOINTS = [
    ("post", "suggestions", ()),
    ("get", "image-suggestions", (1,)),
    ("get", "tag-list", ()),
    ("get", "tag-detail", (1,)),
    ("get", "post-list", ()),
    ("post", "post-list", ()),
    ("get", "post-detail", (1,)),
    ("get", "cluster-list", ()),
    ("get", "cluster-detail", (1,)),
]


@pytest.mark.parametrize(("method", "name", "args"), ENDPOINTS)
def test_anonymous_requests_are_refused_by_default(db, client, method, name, args):
    response = getattr(client, method)(url(name, *args))
    # Session authentication comes first in DRF's defaults: it has no challenge, hence 403.
    assert response.status_code == 403
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_401_with_a_challenge_when_the_authentication_class_has_one(db, client, user, settings):
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "API_AUTHENTICATION_CLASSES": ["rest_framework.authentication.BasicAuthentication"],
    }
    response = client.get(url("tag-list"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic")
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert client.get(url("tag-list"), HTTP_AUTHORIZATION=f"Basic {token}").status_code == 200
    wrong = base64.b64encode(b"alice:nope").decode()
    assert client.get(url("tag-list"), HTTP_AUTHORIZATION=f"Basic {wrong}").status_code == 401


def test_permission_classes_come_from_settings(db, api, client, settings):
    assert api.get(url("tag-list")).status_code == 200
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "API_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    }
    assert api.get(url("tag-list")).status_code == 403
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "API_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    }
    assert client.get(url("tag-list")).status_code == 200
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_PERMISSION_CLASSES": ["no.such.Permission"]}
    with pytest.raises(ImproperlyConfigured, match=r"API_PERMISSION_CLASSES.*no\.such\.Permission"):
        api.get(url("tag-list"))


def test_throttle_answers_429_with_retry_after(api, settings, django_user_model):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_THROTTLE_RATE": "2/min"}
    assert [api.get(url("tag-list")).status_code for _ in range(2)] == [200, 200]
    response = api.get(url("tag-list"))
    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 60
    assert "throttled" in response.json()["detail"].lower()
    # Per user: someone else still gets in.
    other = Client()
    other.force_login(django_user_model.objects.create_user("bob"))
    assert other.get(url("tag-list")).status_code == 200


def test_default_throttle_rate_allows_ordinary_use_and_bad_rates_are_refused(api, settings):
    assert all(api.get(url("tag-list")).status_code == 200 for _ in range(10))
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_THROTTLE_RATE": "5/month"}
    with pytest.raises(ImproperlyConfigured, match="API_THROTTLE_RATE"):
        api.get(url("tag-list"))
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_THROTTLE_CLASSES": ["nope.Throttle"]}
    with pytest.raises(ImproperlyConfigured, match="API_THROTTLE_CLASSES"):
        api.get(url("tag-list"))


@pytest.fixture
def csrf_client(user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.cookies["csrftoken"] = "a" * 32
    return client


def test_csrf_is_enforced_for_session_authentication(csrf_client, media_root):
    response = csrf_client.post(url("post-list"), {"images": upload(), "tags": "x"})
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not Post.objects.exists()
    response = csrf_client.post(
        url("post-list"), {"images": upload(), "tags": "x"}, HTTP_X_CSRFTOKEN="a" * 32
    )
    assert response.status_code == 201, response.content


def test_upload_errors_are_json_when_csrf_parses_the_body(csrf_client, settings):
    # The CSRF check reads the body with Django's parser before DRF's: same answers.
    token = {"HTTP_X_CSRFTOKEN": "a" * 32}
    response = csrf_client.post(
        url("suggestions"),
        b"--x\r\ngarbage",
        content_type="multipart/form-data; boundary=",
        **token,
    )
    assert response.status_code == 400 and "detail" in response.json()
    data = big_jpeg().read()
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": len(data) - 1}
    response = csrf_client.post(url("suggestions"), {"image": big_jpeg()}, **token)
    assert response.status_code == 413
    assert response.json()["detail"].startswith("big.jpg is larger than the limit")
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 20 * 1024 * 1024}
    response = csrf_client.post(url("suggestions"), {"image": upload()}, **token)
    assert response.status_code == 409  # authenticated, CSRF passed, parsed: no clusters yet


# --- tags, posts, clusters -----------------------------------------------------------------


def test_tags_with_usage_counts(api, make_post, settings):
    make_post(["soup", "food"])
    make_post(["food"])
    make_post(["cake", "food"])
    response = api.get(url("tag-list"))
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [(t["name"], t["post_count"]) for t in body["results"]] == [
        ("cake", 1),
        ("food", 3),
        ("soup", 1),
    ]
    ordered = api.get(url("tag-list"), {"ordering": "-post_count", "search": "o"}).json()
    assert [t["name"] for t in ordered["results"]][0] == "food"
    assert {t["name"] for t in ordered["results"]} == {"food", "soup"}
    food = Tag.objects.get(name="food")
    assert api.get(url("tag-detail", food.pk)).json() == {
        "id": food.pk,
        "name": "food",
        "slug": food.slug,
        "post_count": 3,
    }
    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_PAGE_SIZE": 2}
    page = api.get(url("tag-list")).json()
    assert len(page["results"]) == 2 and page["next"] is not None


def test_posts_list_and_retrieve_with_image_urls_and_tag_sources(api, make_post):
    post = make_post(["soup"], images=2, title="Lunch")
    PostTag.objects.create(post=post, tag=Tag.objects.create(name="bowl"), source="suggested")
    make_post(["cake"])
    listing = api.get(url("post-list")).json()
    assert listing["count"] == 2
    body = api.get(url("post-detail", post.pk)).json()
    assert body["title"] == "Lunch"
    assert body["tags"] == [
        {"name": "bowl", "source": "suggested"},
        {"name": "soup", "source": "typed"},
    ]
    images = {image.pk: image for image in post.images.all()}
    assert {i["id"] for i in body["images"]} == set(images)
    for item in body["images"]:
        assert item["url"] == "http://testserver" + images[item["id"]].image.url
        assert (item["width"], item["height"]) == (48, 32)


def test_create_post_records_tag_sources_and_feedback(api, user, two_topics, media_root, settings):
    # The token of the suggestion response: "red" no longer exists as a tag, "bowl" is created
    # by being accepted. The method recorded is the token's, not today's setting.
    token = sign_shown(
        [SuggestedTag("soup", 0.8, 4, 5, ""), SuggestedTag("Bowl", 0.5, 2, 5, "")]
        + [SuggestedTag("red", 0.3, 1, 5, "")],
        cluster_set_id=two_topics.pk,
        method="cluster",
        user=user,
    )
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "ivf"}
    response = api.post(
        url("post-list"),
        {
            "images": [upload("a.jpg"), upload("b.png", fmt="PNG")],
            "title": "Lunch",
            "tags": 'tomato, "cuba libre"',
            "suggested_tags": ["soup", "bowl"],
            "suggestions_token": token,
        },
    )
    assert response.status_code == 201, response.content
    post = Post.objects.get(pk=response.json()["id"])
    assert response["Location"].endswith(url("post-detail", post.pk))
    assert post.owner == user and post.title == "Lunch"
    assert post.images.count() == 2
    assert dict(post.post_tags.values_list("tag__name", "source")) == {
        "soup": "suggested",
        "bowl": "suggested",
        "tomato": "typed",
        "cuba libre": "typed",
    }
    assert {(t["name"], t["source"]) for t in response.json()["tags"]} == set(
        post.post_tags.values_list("tag__name", "source")
    )
    feedback = SuggestionFeedback.objects.filter(post=post).order_by("rank")
    assert [(f.tag.name, f.accepted, f.rank, f.score) for f in feedback] == [
        ("soup", True, 1, 0.8),
        ("bowl", True, 2, 0.5),
    ]
    assert not Tag.objects.filter(name="red").exists()
    assert {(f.channel, f.user_id, f.cluster_set_id, f.method) for f in feedback} == {
        ("api", user.pk, two_topics.pk, "cluster")
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tags": "x" * 300}, "tags"),
        ({"suggested_tags": "fine, bad\x01tag"}, "suggested_tags"),
        ({"shown_suggestions": "{not json"}, "shown_suggestions"),
        ({"shown_suggestions": '[{"score": 1}]'}, "shown_suggestions"),
        ({"shown_suggestions": '["soup"]'}, "shown_suggestions"),
        ({"suggestions_token": "forged"}, "suggestions_token"),
        ({"tags": ",".join(f"t{i}" for i in range(3000))}, "tags"),
        ({"tags": "a, b, c", "suggested_tags": ",".join(f"s{i}" for i in range(48))}, "tags"),
        ({"shown_suggestions": json.dumps([f"s{i}" for i in range(3000)])}, "shown_suggestions"),
    ],
    ids=[
        "long-tag",
        "control-char",
        "bad-json",
        "no-name",
        "shown-without-token",
        "forged-token",
        "3000-tags",
        "51-tags-together",
        "3000-shown",
    ],
)
def test_create_post_bad_fields_save_nothing(api, media_root, fields, field):
    response = api.post(url("post-list"), {"images": upload(), **fields})
    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert not Post.objects.exists() and stored_files(media_root) == []
    assert not Tag.objects.exists() and not SuggestionFeedback.objects.exists()


def test_create_post_with_a_bad_image_saves_nothing(api, media_root):
    bad = upload("evil.jpg", b"<html>not an image</html>")
    response = api.post(url("post-list"), {"images": [upload("ok.jpg"), bad], "tags": "x"})
    assert response.status_code == 400
    assert response.json()["images"][0].startswith("evil.jpg: ")
    assert not Post.objects.exists() and not Tag.objects.exists()
    assert not SuggestionFeedback.objects.exists() and stored_files(media_root) == []
    response = api.post(url("post-list"), {"tags": "x"})
    assert response.json() == {"images": ["This field is required."]}


def test_clusters_of_the_active_set_with_top_tags(api, two_topics):
    body = api.get(url("cluster-list")).json()
    assert body["count"] == 2
    for cluster in body["results"]:
        assert cluster["cluster_set"] == two_topics.pk
        rows = TagFrequency.objects.filter(cluster_id=cluster["id"]).order_by(
            "-post_count", "tag__name"
        )
        assert [(t["name"], t["post_count"]) for t in cluster["top_tags"]] == [
            (row.tag.name, row.post_count) for row in rows
        ]
        assert cluster["top_tags"][0]["score"] == 1.0  # "food" is on every post
    soups = next(c for c in body["results"] if c["post_count"] == 4)
    assert [t["name"] for t in soups["top_tags"]] == ["food", "soup", "tomato", "pea"]
    assert soups["top_tags"][2]["score"] == 0.5

    one = api.get(url("cluster-detail", soups["id"]), {"top": "2"}).json()
    assert [t["name"] for t in one["top_tags"]] == ["food", "soup"]

    newer = rebuild_clusters(k=1, algorithm="kmeans")
    assert [c["cluster_set"] for c in api.get(url("cluster-list")).json()["results"]] == [newer.pk]
    assert ClusterSet.objects.get(pk=two_topics.pk).status == ClusterSetStatus.RETIRED
    older = api.get(url("cluster-list"), {"cluster_set": two_topics.pk}).json()
    assert older["count"] == 2
    assert api.get(url("cluster-detail", soups["id"])).status_code == 200  # retired, by id
    response = api.get(url("cluster-list"), {"cluster_set": "abc"})
    assert response.status_code == 400 and list(response.json()) == ["cluster_set"]


def test_cluster_list_is_empty_before_the_first_rebuild(api):
    assert api.get(url("cluster-list")).json()["count"] == 0


# --- schema, UI, packaging -------------------------------------------------------------------


def test_openapi_schema_validates_and_documents_uploads_and_errors(db, client):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)
    suggest_op = schema["paths"]["/api/imagetags/suggestions/"]["post"]
    assert "multipart/form-data" in suggest_op["requestBody"]["content"]
    assert {"200", "400", "401", "403", "409", "413", "415", "429"} <= set(suggest_op["responses"])
    assert "Retry-After" in suggest_op["responses"]["429"]["headers"]
    create_op = schema["paths"]["/api/imagetags/posts/"]["post"]
    body_ref = create_op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert body["properties"]["images"]["items"]["format"] == "binary"
    assert {"201", "400", "413", "415"} <= set(create_op["responses"])
    for path in (
        "/api/imagetags/images/{id}/suggestions/",
        "/api/imagetags/tags/",
        "/api/imagetags/posts/{id}/",
        "/api/imagetags/clusters/",
    ):
        assert path in schema["paths"]


def test_schema_generation_has_no_warnings(db, tmp_path):
    # --fail-on-warn: a field whose type drf-spectacular had to guess fails the build.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml"))
    assert "/api/imagetags/suggestions/:" in (tmp_path / "s.yml").read_text()


def test_swagger_ui_is_served_from_local_static_files(db, client):
    response = client.get("/api/schema/ui/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")


def test_the_core_never_imports_drf():
    package = PROJECT_ROOT / "imagetags"
    offenders = []
    for path in package.rglob("*.py"):
        if (package / "api") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in {"rest_framework", "drf_spectacular"} for n in names):
                offenders.append(str(path.relative_to(PROJECT_ROOT)))
    assert offenders == []
