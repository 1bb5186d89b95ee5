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
from typing import TYPE_CHECKING, Any

from django.core.files.storage import Storage
from django.db import transaction
from PIL import Image

from imagetags.images import (
    ImageInfo,
    InvalidImage,
    max_files_per_post,
    open_image,
    too_many_files_message,
)
from imagetags.models import (
    ClusterSet,
    FeedbackChannel,
    Post,
    StockImage,
    SuggestionFeedback,
    Tag,
    TagSource,
)
from imagetags.services.frequencies import deferred_recount
from imagetags.services.shown import MAX_SHOWN_SUGGESTIONS, ShownRecord, ShownSuggestion
from imagetags.services.tagging import add_tags, check_tag_count, clean_tag_name

__all__ = ["ShownSuggestion", "TooManyFiles", "create_post", "record_feedback", "validate_uploads"]

if TYPE_CHECKING:
    from imagetags.services.extractors.base import FeatureExtractor

logger = logging.getLogger(__name__)


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


def iter_uploads(
    files: Sequence[Any], *, draft_size: int | None = None
) -> Iterator[tuple[Image.Image, ImageInfo]]:
    """Open the files one at a time with the upload rules, yielding each decoded image.

    The file count is checked at once; each file is decoded only when the next item is asked
    for, so a caller that lets go of one image before asking for the next never holds two.
    :class:`InvalidImage` names the file at fault; ``draft_size`` as in ``images.open_image``.
    """
    if not files:
        raise InvalidImage("Choose at least one image.")
    if len(files) > max_files_per_post():
        raise TooManyFiles(too_many_files_message(len(files)))
    return _opened_one_by_one(files, draft_size)


def _opened_one_by_one(
    files: Sequence[Any], draft_size: int | None
) -> Iterator[tuple[Image.Image, ImageInfo]]:
    for upload in files:
        try:
            # Yielded without a local name, so the generator keeps no reference to the image
            # while the next file is decoded.
            yield open_image(upload, draft_size=draft_size)
        except InvalidImage as exc:
            name = getattr(upload, "name", "") or "the file"
            raise InvalidImage(f"{name}: {exc}") from None


def validate_uploads(files: Sequence[Any], *, draft_size: int | None = None) -> list[ImageInfo]:
    """Open every file with the upload rules; :class:`InvalidImage` names the file at fault.

    Returns the facts about each file (format, size, frames), not the pixels: a request's
    decoded uploads are never held all at once (ten 6300 × 6300 GIFs would be over a GB).
    """
    infos = []
    for image, info in iter_uploads(files, draft_size=draft_size):
        infos.append(info)
        del image  # before the next file is decoded
    return infos


def validate_model_inputs(files: Sequence[Any], extractor: FeatureExtractor) -> list[Image.Image]:
    """Validate uploads as :func:`validate_uploads` does, returning each as ``extractor``'s
    model input (``extractor.prepare``, e.g. 224 × 224 RGB) ready to embed.

    For a caller that checks every file before any forward pass (the API's suggestions) and
    then embeds them: each file is decoded once, one at a time, and only what embedding needs
    is kept, a few hundred KB per file however large the upload. ``prepare`` of a prepared
    image gives the same array again, so embedding these gives the vectors of the files.
    """
    inputs = []
    for image, _info in iter_uploads(files, draft_size=extractor.decode_size):
        inputs.append(Image.fromarray(extractor.prepare(image), "RGB"))
        del image  # before the next file is decoded
    return inputs


def create_post(
    *,
    files: Sequence[Any],
    title: str = "",
    typed_tags: Iterable[str] = (),
    accepted_tags: Iterable[str] = (),
    shown: ShownRecord | Iterable[ShownSuggestion] = (),
    owner: Any = None,
    channel: str = FeedbackChannel.FORM,
) -> Post:
    """Save a post with its images and tags, and record which shown suggestions were taken.

    ``accepted_tags`` are saved with source ``suggested``, the other ``typed_tags`` with source
    ``typed``. ``shown``: what the person was shown, for feedback. Surfaces that get it from a
    client pass the :class:`~imagetags.services.shown.ShownRecord` of a verified suggestions
    token (``services.shown.read_token``), which also says which cluster set and method
    answered; a plain list of :class:`ShownSuggestion` is for server code's own records.
    Raises :class:`InvalidImage`, ``tagging.InvalidTagName`` or ``tagging.TooManyTags``
    before writing anything.
    """
    validate_uploads(files)
    accepted = list(dict.fromkeys(clean_tag_name(name) for name in accepted_tags))
    typed = [
        name
        for name in dict.fromkeys(clean_tag_name(n) for n in typed_tags)
        if name not in accepted
    ]
    check_tag_count(len(accepted) + len(typed))
    record = shown if isinstance(shown, ShownRecord) else ShownRecord(tuple(shown))
    cluster_set = (
        ClusterSet.objects.filter(pk=record.cluster_set_id).first()
        if record.cluster_set_id is not None and record.items
        else None
    )
    user = owner if getattr(owner, "is_authenticated", False) else None
    storage = StockImage._meta.get_field("image").storage
    # One recount of the clusters' tag counts for both add_tags calls.
    with discard_files_on_error(storage) as stored, transaction.atomic(), deferred_recount():
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
            record.items,
            accepted=set(accepted),
            channel=channel,
            user=user,
            cluster_set=cluster_set,
            method=record.method if record.items else "",
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
    """One row per suggestion shown: accepted if its (normalised) name is in ``accepted``.

    Only tags that exist are recorded (suggestions are made from existing tags, and accepted
    ones were just added), never a Tag row created for a "shown" name; at most
    ``MAX_SHOWN_SUGGESTIONS`` items, each name once.
    """
    items: dict[str, ShownSuggestion] = {}
    for item in shown:
        try:
            name = clean_tag_name(item.name)
        except ValueError:
            continue  # not a possible tag name: nothing to learn from it
        items.setdefault(name, item)
        if len(items) >= MAX_SHOWN_SUGGESTIONS:
            break
    tags = Tag.objects.in_bulk(list(items), field_name="name") if items else {}
    rows = [
        SuggestionFeedback(
            post=post,
            tag=tags[name],
            accepted=name in accepted,
            score=item.score,
            rank=item.rank,
            cluster_set=cluster_set,
            method=method,
            channel=channel,
            user=user if getattr(user, "is_authenticated", False) else None,
        )
        for name, item in items.items()
        if name in tags
    ]
    return SuggestionFeedback.objects.bulk_create(rows)
