"""Creating posts from uploads: the one path shared by the upload form, the API and the admin.

Everything is checked before anything is written (images opened with the upload rules, tag
names cleaned), then the post, its images, its tags (with their sources) and the feedback on the
suggestions that were shown are saved in one transaction. If that transaction fails, the files
already written to storage are deleted again: nothing is left half-saved.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.files.storage import Storage
from django.db import transaction
from PIL import Image

from imagetags.conf import imagetags_settings
from imagetags.models import (
    ClusterSet,
    FeedbackChannel,
    Post,
    StockImage,
    SuggestionFeedback,
    Tag,
    TagSource,
)
from imagetags.services.images import InvalidImage, open_image
from imagetags.services.tagging import add_tags, clean_tag_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShownSuggestion:
    """A suggestion as it was shown to the person (for feedback records)."""

    name: str
    score: float | None = None
    rank: int | None = None


class TooManyFiles(InvalidImage):
    pass


@contextlib.contextmanager
def discard_files_on_error(storage: Storage) -> Iterator[list[str]]:
    """Collect names of files written to ``storage``; delete them if the block raises."""
    stored: list[str] = []
    try:
        yield stored
    except BaseException:
        for name in stored:
            try:
                storage.delete(name)
            except OSError:  # a failed clean-up must not hide the original error
                logger.exception("Could not delete %s after a failed save", name)
        raise


def validate_uploads(files: Sequence[Any], *, draft_size: int | None = None) -> list[Image.Image]:
    """Open every file with the upload rules; :class:`InvalidImage` names the file at fault.

    Returns the decoded images, so a caller that embeds them next (the suggestions endpoint)
    decodes each file once; ``draft_size`` as in ``images.open_image``.
    """
    if not files:
        raise InvalidImage("Choose at least one image.")
    limit = imagetags_settings.MAX_FILES_PER_POST
    if len(files) > limit:
        raise TooManyFiles(f"At most {limit} images per post; {len(files)} were sent.")
    images = []
    for upload in files:
        try:
            images.append(open_image(upload, draft_size=draft_size)[0])
        except InvalidImage as exc:
            name = getattr(upload, "name", "") or "the file"
            raise InvalidImage(f"{name}: {exc}") from None
    return images


def create_post(
    *,
    files: Sequence[Any],
    title: str = "",
    typed_tags: Iterable[str] = (),
    accepted_tags: Iterable[str] = (),
    shown: Iterable[ShownSuggestion] = (),
    owner: Any = None,
    channel: str = FeedbackChannel.FORM,
    cluster_set: ClusterSet | None = None,
    method: str = "",
) -> Post:
    """Save a post with its images and tags, and record which shown suggestions were taken.

    ``accepted_tags`` are saved with source ``suggested``, the other ``typed_tags`` with source
    ``typed``. Raises :class:`InvalidImage` or ``tagging.InvalidTagName`` before writing anything.
    """
    validate_uploads(files)
    accepted = list(dict.fromkeys(clean_tag_name(name) for name in accepted_tags))
    typed = [
        name
        for name in dict.fromkeys(clean_tag_name(n) for n in typed_tags)
        if name not in accepted
    ]
    shown = list(shown)
    user = owner if getattr(owner, "is_authenticated", False) else None
    storage = StockImage._meta.get_field("image").storage
    with discard_files_on_error(storage) as stored, transaction.atomic():
        post = Post.objects.create(owner=user, title=title[:200])
        for upload in files:
            if hasattr(upload, "seek"):
                upload.seek(0)
            image = StockImage(post=post, image=upload)
            image.save()
            stored.append(image.image.name)
        add_tags(post, accepted, source=TagSource.SUGGESTED, user=user)
        add_tags(post, typed, source=TagSource.TYPED, user=user)
        record_feedback(
            post,
            shown,
            accepted=set(accepted),
            channel=channel,
            user=user,
            cluster_set=cluster_set,
            method=method,
        )
    return post


def record_feedback(
    post: Post | None,
    shown: Iterable[ShownSuggestion],
    *,
    accepted: set[str],
    channel: str,
    user: Any = None,
    cluster_set: ClusterSet | None = None,
    method: str = "",
) -> list[SuggestionFeedback]:
    """One row per suggestion shown: accepted if its (normalised) name is in ``accepted``."""
    rows = []
    for item in shown:
        try:
            name = clean_tag_name(item.name)
        except ValueError:
            continue  # a client sent garbage as a "shown" tag: nothing to learn from it
        tag, _ = Tag.objects.get_or_create(name=name)
        rows.append(
            SuggestionFeedback(
                post=post,
                tag=tag,
                accepted=name in accepted,
                score=item.score,
                rank=item.rank,
                cluster_set=cluster_set,
                method=method,
                channel=channel,
                user=user if getattr(user, "is_authenticated", False) else None,
            )
        )
    return SuggestionFeedback.objects.bulk_create(rows)
