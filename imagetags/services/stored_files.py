"""Renaming stored image files whose extension is not that of their format.

Files stored before names took their extension from the bytes may carry the client's (a PNG
kept as ``evil.html`` is served as a page). :func:`fix_image_names` gives each such file the
extension of its detected format, one row at a time and safely: the file is copied under the
new name first, the row is pointed at the copy in a transaction, and the old file is deleted
only once that transaction has committed. A failure at any step leaves the row pointing at a
file that exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from django.core.files.storage import Storage
from django.db import transaction

from imagetags.images import (
    InvalidImage,
    detect_format,
    extension_for_format,
    extension_matches,
)
from imagetags.models import StockImage, safe_upload_name

logger = logging.getLogger(__name__)

# Rows read per query; the rows are read by primary key ranges, never through an open cursor
# while they are being updated (SQLite gives no isolation between the two on one connection).
CHUNK = 500


@dataclass
class RenameSummary:
    """What :func:`fix_image_names` did (or, in a dry run, would do)."""

    dry_run: bool = False
    checked: int = 0
    # (image id, old name, new name) of each file renamed, or to be renamed in a dry run.
    renamed: list[tuple[int, str, str]] = field(default_factory=list)
    # (image id, name, reason) of files left as they are: missing, or not a recognisable image.
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    # (image id, name, reason) of renames that failed; each such row still has its old file.
    failed: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        return self.checked - len(self.renamed) - len(self.skipped) - len(self.failed)


def fix_image_names(
    *, dry_run: bool = False, progress: Callable[[int], None] | None = None
) -> RenameSummary:
    """Give every StockImage file whose extension does not name its format the right one.

    ``progress`` is called with the number of rows checked so far. Safe to run again: a file
    already named right is left alone, so a second run renames nothing.
    """
    summary = RenameSummary(dry_run=dry_run)
    storage = StockImage._meta.get_field("image").storage
    last_pk = 0
    while True:
        rows = list(
            StockImage.objects.filter(pk__gt=last_pk)
            .exclude(image="")
            .order_by("pk")
            .values_list("pk", "image")[:CHUNK]
        )
        if not rows:
            return summary
        for pk, name in rows:
            _fix_one(pk, name, storage, summary, dry_run)
            summary.checked += 1
            if progress is not None:
                progress(summary.checked)
        last_pk = rows[-1][0]


def delete_stored_file(storage: Storage, name: str) -> None:
    """Delete a file whose row is gone or points elsewhere; a failure is logged, never raised
    (the database is already right, and a leftover file harms nothing but space)."""
    try:
        storage.delete(name)
    except Exception:  # any storage backend's error
        logger.exception("Could not delete %s, a file no image uses any more", name)


def total_images() -> int:
    """How many rows :func:`fix_image_names` checks (for a progress bar)."""
    return StockImage.objects.exclude(image="").count()


def _fix_one(pk: int, name: str, storage: Storage, summary: RenameSummary, dry_run: bool) -> None:
    try:
        with storage.open(name, "rb") as fh:
            fmt = detect_format(fh)
            if extension_matches(name, fmt):
                return
            folder, _slash, base = name.rpartition("/")
            wanted = (folder + "/" if folder else "") + safe_upload_name(
                base, extension_for_format(fmt)
            )
            if dry_run:
                summary.renamed.append((pk, name, wanted))
                return
            new_name = storage.save(wanted, fh)
    except FileNotFoundError:
        summary.skipped.append((pk, name, "the file is missing from storage"))
        return
    except InvalidImage as exc:
        summary.skipped.append((pk, name, str(exc)))
        return
    except OSError as exc:
        summary.failed.append((pk, name, f"the file could not be read or copied ({exc})"))
        return
    try:
        with transaction.atomic():
            # Only if the row still has the file that was copied (not changed meanwhile).
            updated = StockImage.objects.filter(pk=pk, image=name).update(image=new_name)
            if updated:
                transaction.on_commit(lambda: delete_stored_file(storage, name))
    except Exception as exc:  # the row keeps its old file; the copy must not be left behind
        delete_stored_file(storage, new_name)
        logger.exception("Could not rename the file of image %s", pk)
        summary.failed.append((pk, name, f"the row could not be updated ({exc})"))
        return
    if not updated:
        delete_stored_file(storage, new_name)
        summary.skipped.append((pk, name, "the image was changed or deleted meanwhile"))
        return
    summary.renamed.append((pk, name, new_name))
