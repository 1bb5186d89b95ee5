"""Signal handlers, connected in ``ImageTagsConfig.ready()``.

They never compute anything heavy in the request: they enqueue a django-q2 task, with the image
id only, or delete a deleted image's file (or the file a row was given a new one in place of),
once the surrounding transaction has committed (a rolled-back upload enqueues nothing, a
rolled-back delete or replacement keeps the file).

The exception is the clusters' tag counts: every saved or deleted PostTag and every deleted
StockImage is reported to ``services.frequencies``, which recounts the few (cluster, tag) pairs
it touches in the same transaction (or once at the end of a ``deferred_recount`` block), so the
counts commit or roll back with the change, whatever path made it (the admin's inline included).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from imagetags.conf import imagetags_settings
from imagetags.models import Post, PostTag, StockImage, Tag
from imagetags.services import frequencies
from imagetags.services.pipeline_state import feature_tasks_are_suspended
from imagetags.services.stored_files import delete_stored_file


def enqueue_feature_extraction(image_id: int) -> None:
    from django_q.tasks import async_task

    async_task(
        "imagetags.tasks.extract_features",
        image_id,
        task_name=f"imagetags-features-{image_id}",
        group="imagetags-features",
    )


def stock_image_saved(
    sender: Any, instance: Any, created: bool, raw: bool = False, **kwargs: Any
) -> None:
    if raw or not imagetags_settings.AUTO_FEATURES or feature_tasks_are_suspended():
        return
    # post_save runs inside Model.save(), before StockImage.save() records the new file name, so
    # `file_changed` still compares with the name loaded from the database: True for a new row
    # or a new file, False for an unchanged re-save.
    if not instance.file_changed:
        return
    image_id = instance.pk
    transaction.on_commit(lambda: enqueue_feature_extraction(image_id), robust=True)


def stock_image_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    # Every StockImage owns its file (each save stores a new one), so the file goes with the
    # row: whether the row went alone, through the admin, the API or a cascade from its Post.
    name = instance.image.name
    if not name:
        return
    storage = instance.image.storage
    transaction.on_commit(lambda: delete_stored_file(storage, name), using=kwargs.get("using"))


def stock_image_file_replaced(
    sender: Any, instance: Any, created: bool, raw: bool = False, **kwargs: Any
) -> None:
    # A row given a new file (the admin's change form, a site's own code) owns only the new one:
    # the old file goes once the save commits, as a deleted row's does. As in stock_image_saved,
    # `_loaded_image_name` still names the file the row had when it was loaded.
    if raw or created or not instance.file_changed:
        return
    old_name = str(getattr(instance, "_loaded_image_name", "") or "")
    if not old_name or old_name == instance.image.name:
        return
    storage = instance.image.storage
    transaction.on_commit(lambda: delete_stored_file(storage, old_name), using=kwargs.get("using"))


def _deleted_with(origin: Any, model: type) -> bool:
    """Whether a cascade started at an instance or queryset of ``model``."""
    if isinstance(origin, QuerySet):
        return origin.model is model
    return isinstance(origin, model)


def post_tag_before_save(sender: Any, instance: PostTag, raw: bool = False, **kwargs: Any) -> None:
    # A row given another tag (the admin's inline can) must also recount the tag it had.
    if raw or instance._state.adding:
        return
    instance._imagetags_saved_as = (
        PostTag.objects.filter(pk=instance.pk).values_list("post_id", "tag_id").first()
    )


def post_tag_saved(
    sender: Any, instance: PostTag, created: bool, raw: bool = False, **kwargs: Any
) -> None:
    if raw:
        return
    # A new row, another source (auto -> typed starts counting), another tag or post.
    posts, taken_off = {instance.post_id}, set()
    saved_as = getattr(instance, "_imagetags_saved_as", None)
    if saved_as is not None:
        old_post, old_tag = saved_as
        posts.add(old_post)
        if (old_post, old_tag) != (instance.post_id, instance.tag_id):
            taken_off.add(old_tag)
    frequencies.posts_changed(posts, taken_off)


def post_tag_deleted(sender: Any, instance: PostTag, **kwargs: Any) -> None:
    origin = kwargs.get("origin")
    # A deleted tag takes its TagFrequency rows with it (cascade): nothing left to recount. A
    # deleted post's images go too: stock_image_counts_deleted recounts their clusters.
    if _deleted_with(origin, Tag) or _deleted_with(origin, Post):
        return
    frequencies.posts_changed([instance.post_id], [instance.tag_id])


def post_tags_added(
    sender: Any,
    instance: Any,
    action: str,
    reverse: bool,
    pk_set: set[int] | None,
    **kwargs: Any,
) -> None:
    # ``post.tags.add(...)`` and ``.set(...)`` write PostTag rows with bulk_create, which sends
    # no post_save. (``remove`` and ``clear`` delete rows one by one: post_tag_deleted.)
    if action != "post_add" or not pk_set:
        return
    frequencies.posts_changed(pk_set if reverse else [instance.pk])


def stock_image_before_delete(sender: Any, instance: StockImage, **kwargs: Any) -> None:
    # Its memberships are deleted with it (before post_delete is sent), so the clusters it was
    # in are read now, with the tags of its post, whose counts there may drop.
    clusters = frequencies.clusters_of_images([instance.pk])
    tags = (
        list(PostTag.objects.filter(post_id=instance.post_id).values_list("tag_id", flat=True))
        if clusters
        else []
    )
    instance._imagetags_clusters = (clusters, tags)


def stock_image_counts_deleted(sender: Any, instance: StockImage, **kwargs: Any) -> None:
    clusters, tags = getattr(instance, "_imagetags_clusters", ((), ()))
    if clusters:
        frequencies.clusters_changed(clusters, tags)


def register_signal_handlers() -> None:
    post_save.connect(
        stock_image_saved, sender=StockImage, dispatch_uid="imagetags_stock_image_saved"
    )
    post_save.connect(
        stock_image_file_replaced,
        sender=StockImage,
        dispatch_uid="imagetags_stock_image_file_replaced",
    )
    post_delete.connect(
        stock_image_deleted, sender=StockImage, dispatch_uid="imagetags_stock_image_deleted"
    )
    pre_delete.connect(
        stock_image_before_delete,
        sender=StockImage,
        dispatch_uid="imagetags_stock_image_before_delete",
    )
    post_delete.connect(
        stock_image_counts_deleted,
        sender=StockImage,
        dispatch_uid="imagetags_stock_image_counts_deleted",
    )
    pre_save.connect(
        post_tag_before_save, sender=PostTag, dispatch_uid="imagetags_post_tag_before_save"
    )
    post_save.connect(post_tag_saved, sender=PostTag, dispatch_uid="imagetags_post_tag_saved")
    post_delete.connect(post_tag_deleted, sender=PostTag, dispatch_uid="imagetags_post_tag_deleted")
    m2m_changed.connect(
        post_tags_added, sender=Post.tags.through, dispatch_uid="imagetags_post_tags_added"
    )
