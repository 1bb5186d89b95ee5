"""The widget's JSON view and the REST API check a request for suggestions with one validator
(``services.suggestion_requests``): a bad input is refused by both with the same status and the
same words per field, and a good one gets the same tags from both, ranked by the same method."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from PIL import Image

import imagetags.services.suggest
from imagetags.images import open_image
from imagetags.models import TAG_NAME_MAX_LENGTH, ClusterSet, SuggestionFeedback
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.shown import read_token
from imagetags.services.suggestion_requests import MAX_SUGGEST_LIMIT

from .conftest import image_bytes, unit

SUGGEST_URL = "/imagetags/suggestions/"
UPLOAD_URL = "/imagetags/upload/"

Files = Callable[[], list[Any]]


def api_url() -> str:
    return reverse("imagetags_api:suggestions")


def photo(name: str, color: tuple[int, int, int]) -> SimpleUploadedFile:
    data = image_bytes(color=color, pattern="noise", seed=len(name))
    return SimpleUploadedFile(name, data, content_type="image/jpeg")


def red(name: str = "red.jpg") -> SimpleUploadedFile:
    return photo(name, (220, 30, 25))


def blue(name: str = "blue.jpg") -> SimpleUploadedFile:
    return photo(name, (25, 40, 220))


def by_colour(source: Any, extractor_key: str | None = None) -> np.ndarray:
    """A stand-in for the model: reddish images lie on axis 0 (cakes), others on axis 1 (soups)."""
    # A file not yet opened goes through the upload rules, as the real embed() does.
    image = source if isinstance(source, Image.Image) else open_image(source)[0]
    r, _g, b = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return unit(0 if r > b else 1)


@pytest.fixture
def library(add_post, monkeypatch) -> ClusterSet:
    """Axis 0: 3 cake posts; axis 1: 4 soup posts; "food" on all 7; K = 2; uploads embedded by
    their colour, so the answer is known without running the model."""
    for name in ("cake", "cake", "cupcake"):
        add_post(["food", name, "sweet"], [0])
    for extra in ("tomato", "tomato", "pea", None):
        add_post(["food", "soup"] + ([extra] if extra else []), [1])
    monkeypatch.setattr(imagetags.services.suggest, "embed", by_colour)
    return rebuild_clusters(k=2, algorithm="kmeans")


def ask_both(client: Client, fields: dict[str, Any], files: Files) -> tuple[Any, Any]:
    """The same request (fresh copies of the files) to the JSON view and to the API."""
    answers = []
    for url in (SUGGEST_URL, api_url()):
        data = dict(fields)
        uploads = files()
        if uploads:
            data["image"] = uploads
        answers.append(client.post(url, data))
    return answers[0], answers[1]


def one_red() -> list[Any]:
    return [red()]


# (fields, files, field at fault, words its message contains)
BAD_REQUESTS: dict[str, tuple[dict[str, Any], Files, str, str]] = {
    "limit-0": ({"limit": "0"}, one_red, "limit", "whole number from 1 to 100"),
    "limit-negative": ({"limit": "-1"}, one_red, "limit", "whole number from 1 to 100"),
    "limit-huge": ({"limit": str(10**9)}, one_red, "limit", "whole number from 1 to 100"),
    "limit-text": ({"limit": "abc"}, one_red, "limit", "whole number from 1 to 100"),
    "limit-fraction": ({"limit": "2.5"}, one_red, "limit", "whole number from 1 to 100"),
    "limit-arabic-digit": ({"limit": "٣"}, one_red, "limit", "whole number from 1 to 100"),
    "threshold-above-1": ({"threshold": "1.5"}, one_red, "threshold", "number from 0 to 1"),
    "threshold-negative": ({"threshold": "-0.1"}, one_red, "threshold", "number from 0 to 1"),
    "threshold-nan": ({"threshold": "NaN"}, one_red, "threshold", "number from 0 to 1"),
    "threshold-infinite": ({"threshold": "inf"}, one_red, "threshold", "number from 0 to 1"),
    "threshold-text": ({"threshold": "lots"}, one_red, "threshold", "number from 0 to 1"),
    "exclude-too-many": (
        {"exclude": ", ".join(f"tag {i}" for i in range(51))},
        one_red,
        "exclude",
        "At most 50 tags can be left out; 51 were sent.",
    ),
    "exclude-control-character": (
        {"exclude": "soup, bad\x07name"},
        one_red,
        "exclude",
        "contains U+0007",
    ),
    "exclude-name-too-long": (
        {"exclude": "x" * (TAG_NAME_MAX_LENGTH + 1)},
        one_red,
        "exclude",
        f"Tag names are at most {TAG_NAME_MAX_LENGTH} characters",
    ),
    "token-too-long": (
        {"suggestions_token": "x" * 100_001},
        one_red,
        "suggestions_token",
        "at most 100,000 characters",
    ),
    "no-image": ({"limit": "3"}, list, "image", "Send at least one image in the field “image”."),
    "text-instead-of-a-file": ({"image": "not a file"}, list, "image", "not as text"),
    "too-many-images": (
        {},
        lambda: [red(f"{i}.jpg") for i in range(11)],
        "image",
        "At most 10 images per post; 11 were sent.",
    ),
    "not-an-image": (
        {},
        lambda: [SimpleUploadedFile("notes.txt", b"just some text\n")],
        "image",
        "notes.txt: The file is text, not an image",
    ),
    "empty-file": (
        {},
        lambda: [red(), SimpleUploadedFile("empty.jpg", b"")],
        "image",
        "empty.jpg: The file is empty.",
    ),
}


@pytest.mark.parametrize(
    ("fields", "files", "field", "words"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys()
)
def test_a_bad_request_gets_the_same_400_and_words_from_both(
    api, library, fields, files, field, words
):
    json_view, drf = ask_both(api, fields, files)
    assert (json_view.status_code, drf.status_code) == (400, 400), (json_view.content, drf.content)
    body = json_view.json()
    assert list(drf.json()) == [field]
    assert words in drf.json()[field][0]
    # The JSON view's envelope carries the API's 400 body, and its one sentence is the message.
    assert body["errors"] == drf.json()
    assert body["error"] == drf.json()[field][0]


def test_every_field_at_fault_is_named_at_once(api, library):
    json_view, drf = ask_both(
        api, {"limit": "0", "threshold": "2", "exclude": "a\x00b"}, lambda: []
    )
    assert (json_view.status_code, drf.status_code) == (400, 400)
    assert set(drf.json()) == {"image", "limit", "threshold", "exclude"}
    assert json_view.json()["errors"] == drf.json()
    assert json_view.json()["code"] == "no_image"  # the first problem, for the widget


def test_a_file_over_the_size_limit_is_413_with_the_same_words(api, library, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 1000}
    big = lambda: [SimpleUploadedFile("big.jpg", image_bytes(size=(300, 300), pattern="noise"))]  # noqa: E731
    json_view, drf = ask_both(api, {}, big)
    assert (json_view.status_code, drf.status_code) == (413, 413)
    assert json_view.json()["error"] == drf.json()["detail"]
    assert drf.json()["detail"] == "big.jpg is larger than the limit of 1,000 bytes."


def test_no_clusters_is_409_from_both_before_a_file_is_decoded(api, db, decoded_images_alive):
    json_view, drf = ask_both(
        api, {}, lambda: [SimpleUploadedFile("notes.txt", b"just some text\n")]
    )
    assert (json_view.status_code, drf.status_code) == (409, 409)
    assert decoded_images_alive == []


GOOD_REQUESTS: dict[str, tuple[dict[str, Any], Files]] = {
    "defaults": ({}, one_red),
    "limit-1": ({"limit": "1"}, lambda: [blue()]),
    # Over SUGGEST_LIMIT (10) but within the one cap (100).
    "limit-50": ({"limit": "50"}, lambda: [blue()]),
    "threshold": ({"threshold": "0.5"}, lambda: [blue()]),
    "exclude-repeated": ({"exclude": ["food", "soup, pea"]}, lambda: [blue()]),
    "several-images": ({"exclude": "food", "limit": "4"}, lambda: [red(), blue()]),
    "spaces-around-the-limit": ({"limit": " 2 "}, one_red),
}


@pytest.mark.parametrize(("fields", "files"), GOOD_REQUESTS.values(), ids=GOOD_REQUESTS.keys())
def test_a_good_request_gets_the_same_tags_from_both(api, user, library, fields, files):
    json_view, drf = ask_both(api, fields, files)
    assert (json_view.status_code, drf.status_code) == (200, 200), (json_view.content, drf.content)
    mine, theirs = json_view.json(), drf.json()
    assert mine["tags"] and mine["tags"] == theirs["tags"]
    for key in ("cluster_set", "clusters", "extractor", "method"):
        assert mine[key] == theirs[key], key
    for body in (mine, theirs):
        record = read_token(body["suggestions_token"], user)
        assert record.names == [tag["name"] for tag in body["tags"]]


def test_the_options_are_applied_alike(api, library):
    """What the good requests above ask for really happens (so equal answers mean something)."""

    def names(fields: dict[str, Any]) -> list[str]:
        _json_view, drf = ask_both(api, fields, lambda: [blue()])
        return [tag["name"] for tag in drf.json()["tags"]]

    everything = names({})
    assert {"soup", "food"} <= set(everything) and len(everything) > 1
    assert names({"limit": "1"}) == everything[:1]
    assert not {"food", "soup", "pea"} & set(names({"exclude": ["food", "soup, pea"]}))
    assert len(names({"threshold": "0.5"})) < len(everything)


@pytest.mark.parametrize("method", ["cluster", "ivf"])
def test_both_report_and_sign_the_method_that_ranked(api, user, library, settings, method):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": method}
    json_view, drf = ask_both(api, {}, lambda: [blue()])
    for body in (json_view.json(), drf.json()):
        assert body["method"] == method
        assert read_token(body["suggestions_token"], user).method == method


def test_feedback_records_the_method_that_ranked_not_todays_setting(api, user, library, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "cluster"}
    shown = api.post(SUGGEST_URL, {"image": blue()}).json()
    assert shown["method"] == "cluster"
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "ivf"}  # changed since
    state = {"channel": "widget", "token": shown["suggestions_token"], "accepted": ["soup"]}
    response = api.post(
        UPLOAD_URL,
        {
            "images": [blue()],
            "tags": "soup",
            "tags_suggestions": json.dumps(state),
            "step": "save",
        },
    )
    assert response.status_code == 302, response.content
    rows = SuggestionFeedback.objects.all()
    assert rows and {(r.method, r.channel) for r in rows} == {("cluster", "widget")}
    assert [r.tag.name for r in rows if r.accepted] == ["soup"]


def test_the_schema_states_the_validators_bounds_and_what_ivf_counts(api):
    components = api.get("/api/schema/", {"format": "json"}).json()["components"]["schemas"]
    request = components["SuggestionRequestRequest"]["properties"]
    assert (request["limit"]["minimum"], request["limit"]["maximum"]) == (1, MAX_SUGGEST_LIMIT)
    tag = components["SuggestedTag"]["properties"]
    # For ivf (the default method) the counts are of voters, not of the cluster's posts.
    for name in ("score", "post_count", "cluster_posts"):
        assert "ivf" in tag[name]["description"] and "voters" in tag[name]["description"], name
    assert "method" in components["Suggestions"]["required"]
