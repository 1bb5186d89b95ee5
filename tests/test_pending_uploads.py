"""Kept uploads of the no-JavaScript two steps: one post per token, bound to a session, bounded.

(The form's ordinary two-step flow is in tests/test_forms.py.)
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connections
from django.test import Client

from imagetags.forms import PostUploadForm
from imagetags.models import PendingUploadBatch, Post, StockImage
from imagetags.services.pending_uploads import PendingUpload, PendingUploadError
from imagetags.services.pipeline_state import feature_tasks_suspended

from .conftest import image_bytes

UPLOAD_URL = "/imagetags/upload/"


def photo(name: str = "mine.jpg", seed: int = 42) -> SimpleUploadedFile:
    data = image_bytes(color=(230, 30, 25), pattern="noise", seed=seed)
    return SimpleUploadedFile(name, data, content_type="image/jpeg")


def pending_files(root: Path) -> list[Path]:
    folder = root / "imagetags" / "pending"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def anonymous_uploads(settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "LOGIN_REQUIRED": False}


def first_step(client: Client, *files: SimpleUploadedFile) -> str:
    response = client.post(UPLOAD_URL, {"images": list(files), "tags": "x", "step": "suggest"})
    assert response.status_code == 200, response.content.decode()[:500]
    return response.context["form"]["pending"].value()


def errors(response) -> str:
    return " ".join(response.context["form"].errors.get("images", []))


# --- one post per token ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_three_simultaneous_submits_of_one_token_make_one_post(media_root, anonymous_uploads):
    visitor = Client()
    token = first_step(visitor, photo())
    # Three tabs of one browser: the same session cookie, the same token, sent at once.
    tabs = [Client() for _ in range(3)]
    for tab in tabs:
        tab.cookies = visitor.cookies
    barrier = threading.Barrier(len(tabs))
    responses: list = []

    def submit(tab: Client) -> None:
        try:
            with feature_tasks_suspended():
                barrier.wait()
                responses.append(
                    tab.post(UPLOAD_URL, {"pending": token, "tags": "soup", "step": "save"})
                )
        finally:
            connections.close_all()

    threads = [threading.Thread(target=submit, args=(tab,)) for tab in tabs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.status_code for r in responses) == [302, 400, 400]
    refused = [r for r in responses if r.status_code == 400]
    for response in refused:
        assert "already saved" in errors(response), errors(response)
    assert Post.objects.count() == 1 and StockImage.objects.count() == 1
    assert Post.objects.get().tags.get().name == "soup"
    assert pending_files(media_root) == []


def test_a_claimed_token_is_refused_even_while_its_files_remain(db, media_root):
    kept = PendingUpload.store([photo()])
    kept.claim()  # a post is being saved from it right now
    with pytest.raises(PendingUploadError, match="already saved as a post"):
        PendingUpload.load(kept.token)
    with pytest.raises(PendingUploadError, match="already saved as a post"):
        kept.claim()


def test_a_failed_save_gives_the_token_back(db, admin_user, media_root, monkeypatch):
    import imagetags.forms as forms_module

    kept = PendingUpload.store([photo()], admin_user)

    def form() -> PostUploadForm:
        bound = PostUploadForm({"pending": kept.token, "tags": "soup"}, user=admin_user)
        assert bound.is_valid(), bound.errors
        return bound

    def broken(**kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(forms_module, "create_post", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            form().save()
    # The claim was rolled back with the post: the same token saves now, once.
    assert PendingUploadBatch.objects.get(batch=kept.batch).claimed is None
    assert form().save().tags.get().name == "soup"
    assert not PostUploadForm({"pending": kept.token}, user=admin_user).is_valid()


# --- bound to the session ----------------------------------------------------------------------


def test_another_sessions_anonymous_token_is_refused(db, media_root, anonymous_uploads):
    owner = Client()
    token = first_step(owner, photo())

    stranger = Client()
    stranger.get(UPLOAD_URL)  # a session of its own
    response = stranger.post(UPLOAD_URL, {"pending": token, "tags": "x", "step": "save"})
    assert response.status_code == 400
    assert "could not be found" in errors(response)
    cookieless = Client().post(UPLOAD_URL, {"pending": token, "tags": "x", "step": "save"})
    assert cookieless.status_code == 400 and "could not be found" in errors(cookieless)
    assert not Post.objects.exists()

    # The session it was made in still uses it.
    saved = owner.post(UPLOAD_URL, {"pending": token, "tags": "x", "step": "save"})
    assert saved.status_code == 302 and Post.objects.count() == 1


def test_a_token_made_without_a_session_is_refused_in_one(db, media_root):
    class Session(dict):
        pass

    unbound = PendingUpload.store([photo()])  # a form built without a session, as before
    with pytest.raises(PendingUploadError, match="could not be found"):
        PendingUpload.load(unbound.token, session=Session())
    bound = PendingUpload.store([photo()], session=(session := Session()))
    assert PendingUpload.load(bound.token, session=session).batch == bound.batch
    with pytest.raises(PendingUploadError, match="could not be found"):
        PendingUpload.load(bound.token)  # and a session's token is refused without it


# --- bounded per user --------------------------------------------------------------------------


def test_kept_files_per_user_are_bounded_oldest_dropped_first(
    admin_client, django_user_model, media_root, settings
):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_PENDING_UPLOADS_PER_USER": 4}
    other = Client()
    other.force_login(django_user_model.objects.create_user("other", password="x"))
    theirs = first_step(other, photo("theirs.jpg"))

    tokens = [
        first_step(admin_client, photo(f"a{i}.jpg", seed=i), photo(f"b{i}.jpg", seed=10 + i))
        for i in range(3)
    ]

    # 2 + 2 + 2 files: the oldest batch went, the two newest (4 files) stay; other users' too.
    assert len(pending_files(media_root)) == 4 + 1
    oldest = admin_client.post(UPLOAD_URL, {"pending": tokens[0], "tags": "x", "step": "save"})
    assert oldest.status_code == 400 and "are gone" in errors(oldest)
    for token in tokens[1:]:
        saved = admin_client.post(UPLOAD_URL, {"pending": token, "tags": "x", "step": "save"})
        assert saved.status_code == 302
    assert other.post(UPLOAD_URL, {"pending": theirs, "step": "save"}).status_code == 302
    assert Post.objects.count() == 3

    # A batch larger than the bound on its own is still kept: the newest always is.
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_PENDING_UPLOADS_PER_USER": 1}
    first_step(admin_client, photo("c.jpg"), photo("d.jpg", seed=5))
    assert len(pending_files(media_root)) == 2
    assert PendingUploadBatch.objects.filter(claimed__isnull=True).count() == 1
