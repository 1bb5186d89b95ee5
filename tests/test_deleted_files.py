"""Deleting an image (alone, through the admin, or with its post) deletes its file, after commit."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.db import transaction
from django.urls import reverse

from imagetags.models import Post, StockImage


def files_of(post: Post, media_root: Path) -> list[Path]:
    return [media_root / image.image.name for image in post.images.all()]


def test_admin_delete_view_of_a_post_deletes_its_image_files(
    admin_client, make_post, media_root, django_capture_on_commit_callbacks
):
    post = make_post(["x"], images=2)
    files = files_of(post, media_root)
    assert all(path.exists() for path in files)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:imagetags_post_delete", args=[post.pk]), {"post": "yes"}
        )
    assert response.status_code == 302
    assert not Post.objects.exists() and not StockImage.objects.exists()
    assert not any(path.exists() for path in files)


def test_admin_delete_action_on_images_deletes_their_files(
    admin_client, make_post, media_root, django_capture_on_commit_callbacks
):
    kept, gone = make_post(images=1), make_post(images=2)
    kept_files, gone_files = files_of(kept, media_root), files_of(gone, media_root)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:imagetags_stockimage_changelist"),
            {
                "action": "delete_selected",
                "_selected_action": [str(pk) for pk in gone.images.values_list("pk", flat=True)],
                "post": "yes",
            },
        )
    assert response.status_code == 302
    assert not any(path.exists() for path in gone_files)
    assert all(path.exists() for path in kept_files)


def test_orm_cascade_from_the_post_deletes_the_files_after_commit(
    make_post, media_root, django_capture_on_commit_callbacks
):
    post = make_post(images=3)
    files = files_of(post, media_root)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        post.delete()
    # Not before the commit: until then the delete could still be rolled back.
    assert all(path.exists() for path in files) and len(callbacks) == 3
    for callback in callbacks:
        callback()
    assert not any(path.exists() for path in files)


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_delete_keeps_the_files(make_post, media_root):
    post = make_post(images=2)
    files = files_of(post, media_root)

    class Abort(Exception):
        pass

    post_id = post.pk
    with pytest.raises(Abort), transaction.atomic():
        post.delete()
        raise Abort
    assert StockImage.objects.filter(post_id=post_id).count() == 2
    assert all(path.exists() for path in files)

    # Autocommit: the delete commits at once, and the files go with it.
    Post.objects.get(pk=post_id).delete()
    assert not any(path.exists() for path in files)


def test_a_failing_storage_delete_does_not_fail_the_delete(
    make_post, media_root, monkeypatch, django_capture_on_commit_callbacks, caplog
):
    from django.core.files.storage import FileSystemStorage

    def broken(self, name):
        raise OSError("read-only file system")

    monkeypatch.setattr(FileSystemStorage, "delete", broken)
    post = make_post(images=1)
    with django_capture_on_commit_callbacks(execute=True):
        post.delete()
    assert not StockImage.objects.exists()
    assert "Could not delete" in caplog.text


def test_a_replaced_file_is_deleted_after_commit_and_the_new_one_kept(
    make_post, make_upload, media_root, django_capture_on_commit_callbacks
):
    image = StockImage.objects.get(pk=make_post(images=1).images.get().pk)
    old = media_root / image.image.name
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        image.image = make_upload("new.jpg", color=(0, 200, 0))
        image.save()
    assert old.exists()  # not before the commit: the save could still be rolled back
    for callback in callbacks:
        callback()
    assert not old.exists()
    assert (media_root / image.image.name).exists()


def test_a_re_save_without_a_new_file_keeps_it(
    make_post, media_root, django_capture_on_commit_callbacks
):
    image = StockImage.objects.get(pk=make_post(images=1).images.get().pk)
    with django_capture_on_commit_callbacks(execute=True):
        image.save()
        image.save(update_fields=["created"])
    assert (media_root / image.image.name).exists()


def test_the_admin_change_form_replacing_a_file_deletes_the_old_one(
    admin_client, make_post, make_upload, media_root, django_capture_on_commit_callbacks
):
    image = make_post(images=1).images.get()
    old = media_root / image.image.name
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:imagetags_stockimage_change", args=[image.pk]),
            {
                "post": image.post_id,
                "image": make_upload("replacement.png", fmt="PNG"),
                "created_0": "2026-01-01",
                "created_1": "12:00:00",
            },
        )
    assert response.status_code == 302, response.context["adminform"].form.errors
    image.refresh_from_db()
    assert image.image.name.endswith("replacement.png")
    assert not old.exists()
    assert (media_root / image.image.name).exists()


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_replacement_keeps_the_old_file(make_post, make_upload, media_root):
    image = StockImage.objects.get(pk=make_post(images=1).images.get().pk)
    old = media_root / image.image.name
    with pytest.raises(RuntimeError), transaction.atomic():
        image.image = make_upload("new.jpg")
        image.save()
        raise RuntimeError("abort")
    assert old.exists()
    assert StockImage.objects.get(pk=image.pk).image.name == str(old.relative_to(media_root))
