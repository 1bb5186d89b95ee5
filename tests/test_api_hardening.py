"""Hardening of the API and the plain upload views: bounds on every input, error shapes,
authentication and post visibility defaults, and the plain views' size limit and throttle."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from django.test import Client, RequestFactory
from django.urls import reverse
from PIL import Image

from imagetags import views
from imagetags.api.filters import MAX_SEARCH_LENGTH, MAX_SEARCH_TERMS, SEARCH_PATTERN
from imagetags.models import Post, StockImage, Tag

from .conftest import PASSWORD, image_bytes

SUGGEST_URL = "/imagetags/suggestions/"
UPLOAD_URL = "/imagetags/upload/"


def url(name: str, *args: object) -> str:
    return reverse(f"imagetags_api:{name}", args=args)


def schema(client: Client) -> dict:
    return client.get("/api/schema/", {"format": "json"}).json()


# --- bounds: search, integer filters, path ids, pages -----------------------------------------


def test_a_thousand_search_terms_is_a_400_not_a_server_error(api, make_post):
    make_post(["soup"])
    response = api.get(url("tag-list"), {"search": " ".join(f"t{i}" for i in range(1000))})
    assert response.status_code == 400 and list(response.json()) == ["search"]
    response = api.get(url("tag-list"), {"search": " ".join(["s"] * (MAX_SEARCH_TERMS + 1))})
    assert response.status_code == 400
    assert response.json() == {
        "search": [f"At most {MAX_SEARCH_TERMS} search terms (separated by spaces or commas)."]
    }
    ten = api.get(url("tag-list"), {"search": " ".join(["s"] * MAX_SEARCH_TERMS)})
    assert ten.status_code == 200 and ten.json()["count"] == 1


def test_search_longer_than_a_tag_name_is_a_400(api):
    response = api.get(url("tag-list"), {"search": "x" * (MAX_SEARCH_LENGTH + 1)})
    assert response.status_code == 400
    assert response.json()["search"][0].startswith("Search text is 101 characters long")


def test_nul_in_search_is_a_field_error_in_the_documented_shape(api):
    response = api.get(url("tag-list"), {"search": "so\x00up"})
    assert response.status_code == 400
    assert response.json() == {"search": ["Search text cannot contain NUL characters."]}


def test_the_search_rule_is_the_schema_pattern(api):
    parameter = next(
        p
        for p in schema(api)["paths"]["/api/imagetags/tags/"]["get"]["parameters"]
        if p["name"] == "search"
    )
    assert parameter["schema"] == {
        "type": "string",
        "maxLength": MAX_SEARCH_LENGTH,
        "pattern": SEARCH_PATTERN,
    }
    assert re.match(SEARCH_PATTERN, "cuba, libre soup")
    assert not re.match(SEARCH_PATTERN, " ".join(["a"] * (MAX_SEARCH_TERMS + 1)))


@pytest.mark.parametrize("value", ["9223372036854775808", "99999999999999999999"])
def test_an_integer_filter_past_64_bits_is_a_400(api, value):
    response = api.get(url("cluster-list"), {"cluster_set": value})
    assert response.status_code == 400
    assert list(response.json()) == ["cluster_set"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/imagetags/posts/99999999999999999999/",
        "/api/imagetags/posts/9223372036854775808/",
        "/api/imagetags/tags/99999999999999999999/",
        "/api/imagetags/clusters/99999999999999999999/",
        "/api/imagetags/images/99999999999999999999/suggestions/",
        "/api/imagetags/images/9223372036854775808/suggestions/",
        "/api/imagetags/posts/0.5/",
        "/api/imagetags/tags/abc/",
        "/api/imagetags/images/-1/suggestions/",
        "/api/imagetags/clusters/%C2%B2/",  # a superscript two: a digit to str.isdigit
    ],
)
def test_path_ids_that_cannot_be_ids_are_a_json_404(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "detail" in response.json()


def test_the_largest_id_is_an_ordinary_404(api):
    assert api.get(url("post-detail", 2**63 - 1)).status_code == 404


def test_bad_pages_are_documented_answers(api, make_post):
    make_post(["soup"])
    for page in ("abc", "999999", "0", "9" * 30, ""):
        response = api.get(url("tag-list"), {"page": page})
        assert response.status_code == 404, page
        assert response.json() == {"detail": "Invalid page."}
    response = api.get(url("tag-list"), {"page_size": "0"})
    assert response.status_code == 400 and list(response.json()) == ["page_size"]
    assert api.get(url("tag-list"), {"page_size": "9" * 30}).status_code == 200
    paths = schema(api)["paths"]
    for path in ("/api/imagetags/tags/", "/api/imagetags/posts/", "/api/imagetags/clusters/"):
        assert {"400", "404"} <= set(paths[path]["get"]["responses"])


# --- error shapes ------------------------------------------------------------------------


def test_nested_item_errors_are_flattened_into_the_documented_shape(api, media_root):
    response = api.post(
        url("post-list"),
        {
            "images": io.BytesIO(image_bytes()),
            "shown_suggestions": json.dumps(["soup", {"name": ""}, {"name": "x", "rank": 0}]),
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["shown_suggestions"]
    assert all(isinstance(message, str) for message in body["shown_suggestions"])
    assert body["shown_suggestions"][0] == "item 2: name: This field may not be blank."
    assert body["shown_suggestions"][1].startswith("item 3: rank: ")


# --- schema: slugs, uploads, "Try it out" ------------------------------------------------


def test_unicode_slugs_match_the_schema_pattern(api):
    Tag.objects.create(name="crème brûlée")
    tag = api.get(url("tag-list")).json()["results"][0]
    pattern = schema(api)["components"]["schemas"]["Tag"]["properties"]["slug"]["pattern"]
    assert tag["slug"] == "crème-brûlée"
    assert re.match(pattern, tag["slug"])


def test_schema_upload_fields_and_try_it_out_values(api):
    components = schema(api)["components"]["schemas"]
    suggest = components["SuggestionRequestRequest"]["properties"]
    create = components["PostCreateRequest"]["properties"]
    assert suggest["image"]["minItems"] == 1 and create["images"]["minItems"] == 1
    # "Try it out" must not send threshold=1 (almost no tag) or the placeholder tag "string".
    assert suggest["threshold"]["example"] == 0
    assert suggest["exclude"]["default"] == [] and create["tags"]["default"] == []
    # The set that answered travels in the signed suggestions_token, not in a client field.
    assert "cluster_set" not in create


# --- authentication ------------------------------------------------------------------------


def test_http_basic_is_off_unless_a_site_opts_in(db, client, user, settings):
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    response = client.get(url("tag-list"), HTTP_AUTHORIZATION=f"Basic {token}")
    assert response.status_code == 403  # the right password, but Basic is not accepted
    assert "basicAuth" not in schema(client)["components"]["securitySchemes"]
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "API_AUTHENTICATION_CLASSES": [
            "rest_framework.authentication.SessionAuthentication",
            "rest_framework.authentication.BasicAuthentication",
        ],
    }
    response = client.get(url("tag-list"), HTTP_AUTHORIZATION=f"Basic {token}")
    assert response.status_code == 200


def test_loadtest_basic_mode_opts_into_basic(monkeypatch):
    from scripts import loadtest

    assert 'os.environ.get("IMAGETAGS_LOAD_AUTH") == "basic"' in loadtest.SETTINGS
    assert "BasicAuthentication" in loadtest.SETTINGS


# --- post visibility ------------------------------------------------------------------------


@pytest.fixture
def two_owners(django_user_model, user, make_post):
    bob = django_user_model.objects.create_user("bob")
    mine, theirs = make_post(["soup"]), make_post(["cake"])
    Post.objects.filter(pk=mine.pk).update(owner=user)
    Post.objects.filter(pk=theirs.pk).update(owner=bob)
    return mine, theirs


def test_posts_are_shared_by_default(api, two_owners):
    mine, theirs = two_owners
    ids = {post["id"] for post in api.get(url("post-list")).json()["results"]}
    assert ids == {mine.pk, theirs.pk}
    assert api.get(url("post-detail", theirs.pk)).status_code == 200


def test_a_scope_hides_other_users_posts_and_images(api, two_owners, settings, django_user_model):
    mine, theirs = two_owners
    settings.IMAGETAGS = {
        **settings.IMAGETAGS,
        "API_POSTS_VISIBLE_TO": "imagetags.api.views.own_posts",
    }
    assert [p["id"] for p in api.get(url("post-list")).json()["results"]] == [mine.pk]
    assert api.get(url("post-detail", theirs.pk)).status_code == 404
    their_image = StockImage.objects.get(post=theirs)
    assert api.get(url("image-suggestions", their_image.pk)).status_code == 404
    staff = Client()
    staff.force_login(django_user_model.objects.create_user("root", is_staff=True))
    assert staff.get(url("post-list")).json()["count"] == 2


def test_a_bad_scope_path_names_the_setting(api, settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.IMAGETAGS = {**settings.IMAGETAGS, "API_POSTS_VISIBLE_TO": "no.such.scope"}
    with pytest.raises(ImproperlyConfigured, match="API_POSTS_VISIBLE_TO"):
        api.get(url("post-list"))


# --- the plain views: body limit before reading, streaming stop, throttle ------------------


class ExplodingStream:
    """A request body that fails the test if the view reads any of it."""

    def read(self, *args: object) -> bytes:
        raise AssertionError("the body was read")

    readline = read


class CountingStream:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.buffer.read(size)
        self.consumed += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        chunk = self.buffer.readline(size)
        self.consumed += len(chunk)
        return chunk


def call_view(path: str, request) -> object:
    view = views.suggestions if path == SUGGEST_URL else views.PostUploadView.as_view()
    return view(request)


def multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "imagetagsboundary"
    parts = []
    for name, data in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("path", [SUGGEST_URL, UPLOAD_URL])
def test_a_body_too_large_to_be_valid_is_413_before_it_is_read(db, user, settings, path):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 1000, "MAX_FILES_PER_POST": 2}
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    request = RequestFactory().post(path, b"", content_type="multipart/form-data; boundary=b")
    request.META["CONTENT_LENGTH"] = str(300 * 1024 * 1024)
    request._stream = ExplodingStream()
    request.user = user
    response = call_view(path, request)
    assert response.status_code == 413
    assert "The request body is 314,572,800 bytes" in response.content.decode()


@pytest.mark.parametrize("path", [SUGGEST_URL, UPLOAD_URL])
def test_a_file_over_the_limit_is_stopped_while_it_streams_in(db, user, settings, path):
    limit = 100 * 1024
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": limit}
    noise = Image.effect_noise((1200, 1200), 64).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    big = buffer.getvalue()
    assert len(big) > 10 * limit
    body, content_type = multipart({"image": big})
    request = RequestFactory().post(path, body, content_type=content_type)
    stream = CountingStream(body)
    request._stream = stream
    request.user = user
    request._dont_enforce_csrf_checks = True
    response = call_view(path, request)
    assert response.status_code == 413
    assert "image.png is larger than the limit of 102,400 bytes." in response.content.decode()
    assert stream.consumed < 2 * limit + 64 * 1024  # stopped, not read to the end


class ThrottleClock:
    """The clock the plain views' fixed-window throttle reads, held still by the test: with the
    wall clock, two requests either side of a minute boundary fall into two windows and the
    second is not refused (a test that failed about one run in fifty on a loaded machine)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def throttle_clock(monkeypatch):
    from imagetags import uploads

    # 10 s into a minute window: every request of a test falls into the same one.
    clock = ThrottleClock(1_000_000 * 60 + 10.0)
    monkeypatch.setattr(uploads, "time", clock)
    return clock


def test_the_json_view_answers_429_with_retry_after_past_the_rate(
    db, user, settings, throttle_clock
):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "THROTTLE_RATE": "2/min"}
    client = Client()
    client.force_login(user)
    statuses = [client.post(SUGGEST_URL, {}).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]
    response = client.post(SUGGEST_URL, {})
    assert response.json()["code"] == "throttled"
    assert 0 < int(response["Retry-After"]) <= 60
    # Per user: someone else still gets in.
    other = Client()
    other.force_login(type(user).objects.create_user("bob"))
    assert other.post(SUGGEST_URL, {}).status_code == 400


def test_the_throttle_window_opens_again_after_its_period(db, user, settings, throttle_clock):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "THROTTLE_RATE": "1/min"}
    client = Client()
    client.force_login(user)
    assert client.post(SUGGEST_URL, {}).status_code == 400
    response = client.post(SUGGEST_URL, {})
    assert response.status_code == 429
    assert int(response["Retry-After"]) == 50  # the rest of the window, not a whole period
    throttle_clock.now += 50
    assert client.post(SUGGEST_URL, {}).status_code == 400


def test_the_upload_page_answers_429_past_the_rate(db, user, settings, throttle_clock):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "THROTTLE_RATE": "1/min"}
    client = Client()
    client.force_login(user)
    assert client.get(UPLOAD_URL).status_code == 200
    response = client.get(UPLOAD_URL)
    assert response.status_code == 429
    assert "Too many requests" in response.content.decode()
    assert response["Content-Type"].startswith("text/html")
    assert int(response["Retry-After"]) > 0


def test_a_bad_throttle_rate_names_the_setting(db, user, settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.IMAGETAGS = {**settings.IMAGETAGS, "THROTTLE_RATE": "5/month"}
    client = Client()
    client.force_login(user)
    with pytest.raises(ImproperlyConfigured, match="THROTTLE_RATE"):
        client.post(SUGGEST_URL, {})


def test_the_plain_views_still_check_csrf(db, user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(SUGGEST_URL, {}).status_code == 403
