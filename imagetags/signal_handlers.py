"""Signal handlers, connected in ``ImageTagsConfig.ready()``.

They never compute anything in the request: they enqueue a django-q2 task, with the image id
only, or delete a deleted image's file (or the file a row was given a new one in place of),
once the surrounding transaction has committed (a rolled-back upload enqueues nothing, a
rolled-back delete or replacement keeps the file).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save

from imagetags.conf import imagetags_settings
from imagetags.services.pipeline_state import feature_tasks_are_suspended


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
    from imagetags.services.stored_files import delete_stored_file

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
    from imagetags.services.stored_files import delete_stored_file

    storage = instance.image.storage
    transaction.on_commit(lambda: delete_stored_file(storage, old_name), using=kwargs.get("using"))


def register_signal_handlers() -> None:
    from imagetags.models import StockImage

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
