"""Feedback counts only suggestions the server really returned: the signed suggestions token."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

import imagetags.forms
import imagetags.views
from imagetags.models import ClusterSet, Post, StockImage, SuggestionFeedback, Tag
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.shown import (
    MAX_SHOWN_SUGGESTIONS,
    InvalidSuggestionsToken,
    read_token,
    sign_shown,
)
from imagetags.services.suggest import MergedSuggestions, SuggestedTag, Suggestions

from .conftest import image_bytes

UPLOAD_URL = "/imagetags/upload/"
SUGGEST_URL = "/imagetags/suggestions/"


@pytest.fixture
def other(django_user_model):
    return django_user_model.objects.create_user("mallory", password="x")


@pytest.fixture
def soups(add_post) -> ClusterSet:
    """Hand-made vectors: every post is soup; some also tomato or pea."""
    for extra in ("tomato", "tomato", "pea", None):
        add_post(["food", "soup"] + ([extra] if extra else []), [1])
    return rebuild_clusters(k=1, algorithm="kmeans")


def tag(name: str, score: float) -> SuggestedTag:
    return SuggestedTag(name, score, 1, 4, "in 1 of 4 similar posts")


def photo(name: str = "p.jpg") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, image_bytes(), content_type="image/jpeg")


def api_suggestions(api: Client, image: StockImage) -> dict:
    url = reverse("imagetags_api:image-suggestions", args=[image.pk])
    response = api.get(url, {"exclude": "food"})
    assert response.status_code == 200, response.content
    return response.json()


def create(api: Client, **fields) -> object:
    return api.post(reverse("imagetags_api:post-list"), {"images": photo(), **fields})


# --- the record itself -------------------------------------------------------------------------


def test_a_token_holds_what_was_shown_for_whom(user, other, db):
    token = sign_shown(
        [tag("soup", 1.0), tag("pea", 0.25)], cluster_set_id=7, method="ivf", user=user
    )
    record = read_token(token, user)
    assert [(i.name, i.rank, i.score) for i in record.items] == [("soup", 1, 1.0), ("pea", 2, 0.25)]
    assert (record.cluster_set_id, record.method) == (7, "ivf")
    with pytest.raises(InvalidSuggestionsToken, match="another user"):
        read_token(token, other)
    with pytest.raises(InvalidSuggestionsToken, match="another user"):
        read_token(token, None)  # an anonymous client
    with pytest.raises(InvalidSuggestionsToken, match="not valid"):
        read_token(token[:-3] + "abc", user)
    # Narrowing keeps only names the token lists, in the token's order and ranks.
    assert [i.name for i in record.narrowed(["PEA", "made up"]).items] == ["pea"]


def test_a_new_answer_merges_the_previous_token(user, other, db):
    first = sign_shown(
        [tag("soup", 1.0), tag("pea", 0.5)], cluster_set_id=7, method="ivf", user=user
    )
    merged = sign_shown(
        [tag("tomato", 0.8), tag("soup", 0.9)],
        cluster_set_id=7,
        method="ivf",
        user=user,
        previous=first,
    )
    assert read_token(merged, user).names == ["tomato", "soup", "pea"]
    # Another set or method answered: the earlier items are not theirs, so they are dropped.
    for cluster_set, method in ((8, "ivf"), (7, "cluster")):
        again = sign_shown(
            [tag("x", 1.0)], cluster_set_id=cluster_set, method=method, user=user, previous=first
        )
        assert read_token(again, user).names == ["x"]
    # Someone else's token adds nothing.
    foreign = sign_shown([tag("evil", 1.0)], cluster_set_id=7, method="ivf", user=other)
    mine = sign_shown([tag("x", 1.0)], cluster_set_id=7, method="ivf", user=user, previous=foreign)
    assert read_token(mine, user).names == ["x"]
    # However many answers are merged, a token holds at most what one answer can show.
    token = ""
    for round_ in range(3):
        token = sign_shown(
            [tag(f"r{round_}-{i}", 0.5) for i in range(60)],
            cluster_set_id=7,
            method="ivf",
            user=user,
            previous=token,
        )
    assert len(read_token(token, user).items) == MAX_SHOWN_SUGGESTIONS


# --- the API ---------------------------------------------------------------------------------


def test_api_token_records_exactly_the_shown_items_with_the_method_that_answered(
    api, user, soups, settings
):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "cluster"}
    body = api_suggestions(api, StockImage.objects.first())
    shown = [(t["name"], t["score"]) for t in body["tags"]]
    assert [name for name, _score in shown] == ["soup", "tomato", "pea"]
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "ivf"}  # changed since

    response = create(
        api, suggested_tags="soup", tags="mine", suggestions_token=body["suggestions_token"]
    )
    assert response.status_code == 201, response.content
    rows = SuggestionFeedback.objects.order_by("rank")
    assert [(r.tag.name, r.rank, r.score, r.accepted) for r in rows] == [
        (name, rank, score, name == "soup") for rank, (name, score) in enumerate(shown, 1)
    ]
    assert {(r.method, r.cluster_set_id, r.channel, r.user_id) for r in rows} == {
        ("cluster", soups.pk, "api", user.pk)
    }


def test_api_shown_names_outside_the_token_are_dropped(api, soups):
    body = api_suggestions(api, StockImage.objects.first())
    forged = ["pea", "food"] + [f"invented {i}" for i in range(50)]
    response = create(
        api,
        suggestions_token=body["suggestions_token"],
        shown_suggestions=json.dumps(forged),
    )
    assert response.status_code == 201, response.content
    # "food" exists but was excluded from the answer: it was never shown either.
    assert list(SuggestionFeedback.objects.values_list("tag__name", flat=True)) == ["pea"]
    assert not Tag.objects.filter(name__startswith="invented").exists()


def test_api_forged_shown_names_without_a_token_record_nothing(api, soups, media_root):
    library = Post.objects.count()
    response = create(api, shown_suggestions=json.dumps(["soup", "pea"]))
    assert response.status_code == 400
    assert "suggestions_token" in response.json()["shown_suggestions"][0]
    assert Post.objects.count() == library and not SuggestionFeedback.objects.exists()


def test_api_refuses_another_users_or_an_expired_token(api, other, soups, settings):
    body = api_suggestions(api, StockImage.objects.first())
    library = Post.objects.count()
    thief = Client()
    thief.force_login(other)
    response = create(thief, suggestions_token=body["suggestions_token"])
    assert response.status_code == 400
    assert response.json() == {
        "suggestions_token": [
            "The suggestions token was issued to another user; ask for suggestions again."
        ]
    }
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGESTIONS_TOKEN_MAX_AGE": -1}
    response = create(api, suggestions_token=body["suggestions_token"])
    assert response.status_code == 400
    assert "has expired" in response.json()["suggestions_token"][0]
    assert Post.objects.count() == library and not SuggestionFeedback.objects.exists()


def test_the_schema_documents_the_token(db, client):
    schema = client.get("/api/schema/", {"format": "json"}).json()["components"]["schemas"]
    assert "suggestions_token" in schema["Suggestions"]["properties"]
    assert "suggestions_token" in schema["Suggestions"]["required"]
    create_body = next(v for k, v in schema.items() if "suggested_tags" in v.get("properties", {}))
    assert "suggestions_token" in create_body["properties"]


# --- the widget's JSON view and the upload form ------------------------------------------------


@pytest.fixture
def fake_suggestions(monkeypatch, soups):
    """Suggestions as the services make them, without running the model on the upload."""
    answers = [
        [tag("soup", 1.0), tag("tomato", 0.5)],
        [tag("pea", 0.25)],
    ]
    calls = {"n": 0}

    def suggest_many(images, **kwargs):
        for image in images:  # the view's generator names the file being handled
            del image
        tags = answers[min(calls["n"], len(answers) - 1)]
        calls["n"] += 1
        result = Suggestions(tags, 1, 0, soups.pk, 1.0, soups.extractor_key, method="cluster")
        return MergedSuggestions(tags=tags, per_image=[result])

    # The JSON view answers through the shared request service (its validator still runs).
    monkeypatch.setattr(
        imagetags.views, "suggest_for_request", lambda request: suggest_many(request.files)
    )
    monkeypatch.setattr(imagetags.forms, "suggest_many", suggest_many)
    return soups


def test_the_json_view_returns_a_token_and_merges_the_previous_one(
    admin_client, admin_user, fake_suggestions
):
    first = admin_client.post(SUGGEST_URL, {"image": photo()}).json()
    assert read_token(first["suggestions_token"], admin_user).names == ["soup", "tomato"]
    second = admin_client.post(
        SUGGEST_URL, {"image": photo(), "suggestions_token": first["suggestions_token"]}
    ).json()
    record = read_token(second["suggestions_token"], admin_user)
    assert record.names == ["pea", "soup", "tomato"]
    assert (record.cluster_set_id, record.method) == (fake_suggestions.pk, "cluster")


def test_widget_state_counts_only_what_its_token_lists(
    admin_client, admin_user, other, fake_suggestions
):
    token = admin_client.post(SUGGEST_URL, {"image": photo()}).json()["suggestions_token"]

    def save(state: dict) -> None:
        response = admin_client.post(
            UPLOAD_URL,
            {
                "images": [photo()],
                "tags": "soup, pea",
                "tags_suggestions": json.dumps(state),
                "step": "save",
            },
        )
        assert response.status_code == 302

    forged = {
        "channel": "widget",
        "shown": [{"name": "soup"}, {"name": "pea"}],
        "accepted": ["soup", "pea"],
    }
    save(forged)  # no token: nothing counts as shown, and both tags are typed
    assert not SuggestionFeedback.objects.exists()
    latest = Post.objects.order_by("-pk").first()
    assert set(latest.post_tags.values_list("source", flat=True)) == {"typed"}

    save(
        {
            **forged,
            "token": sign_shown([tag("pea", 1)], cluster_set_id=None, method="ivf", user=other),
        }
    )
    assert not SuggestionFeedback.objects.exists()

    save({**forged, "token": token})  # "pea" was never shown: dropped
    rows = SuggestionFeedback.objects.all()
    assert [(r.tag.name, r.accepted, r.method, r.channel) for r in rows] == [
        ("soup", True, "cluster", "widget")
    ]
    post = rows[0].post
    assert dict(post.post_tags.values_list("tag__name", "source")) == {
        "soup": "suggested",
        "pea": "typed",
    }


def test_the_no_js_second_step_carries_a_token(admin_client, admin_user, fake_suggestions):
    first = admin_client.post(UPLOAD_URL, {"images": [photo()], "tags": "mine", "step": "suggest"})
    assert first.status_code == 200
    form = first.context["form"]
    selection = form["tags"].value()
    assert read_token(selection.token, admin_user).names == ["soup", "tomato"]
    state = selection.state()
    assert state["token"] == selection.token
    state["shown"].append({"name": "pea"})  # a forged extra item
    second = admin_client.post(
        UPLOAD_URL,
        {
            "pending": form["pending"].value(),
            "tags": "mine",
            "tags_accept": ["tomato"],
            "tags_suggestions": json.dumps(state),
            "step": "save",
        },
    )
    assert second.status_code == 302
    rows = SuggestionFeedback.objects.order_by("rank")
    assert [(r.tag.name, r.accepted, r.channel, r.method) for r in rows] == [
        ("soup", False, "form", "cluster"),
        ("tomato", True, "form", "cluster"),
    ]
