"""Putting tags on posts: parsing typed input, recording each tag's source, auto-tagging."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import transaction

from imagetags.conf import imagetags_settings
from imagetags.models import (
    FeatureStatus,
    InvalidTagName,
    Post,
    PostTag,
    Tag,
    TagSource,
    normalize_tag_name,
    tag_name_error,
)
from imagetags.services.extractors import get_extractor
from imagetags.services.frequencies import deferred_recount
from imagetags.services.suggest import SuggestionUnavailable, suggest

logger = logging.getLogger(__name__)


class TooManyTags(ValueError):
    """A post would carry more than ``MAX_TAGS_PER_POST`` tags; the message gives both counts."""


def max_tags_per_post() -> int:
    return imagetags_settings.MAX_TAGS_PER_POST


def check_tag_count(count: int) -> None:
    """Raise :class:`TooManyTags` when a post would carry ``count`` tags, more than the limit.

    Every path that puts tags on a post checks here (``add_tags``, ``create_post`` before
    anything is written); the form, the API, the admin and manifests check the same number
    earlier so that the person gets the message next to the field.
    """
    limit = max_tags_per_post()
    if count > limit:
        raise TooManyTags(too_many_tags_message(count, limit))


def too_many_tags_message(count: int, limit: int | None = None) -> str:
    limit = max_tags_per_post() if limit is None else limit
    return f"At most {limit} tags per post; {count} were given."


def clean_tag_name(name: str) -> str:
    """A normalised tag name (``models.normalize_tag_name``), or :class:`InvalidTagName` saying
    what is wrong with it (``models.tag_name_error``: empty or invisible, too long, control,
    format, private-use or surrogate characters). The same rules as ``Tag.save``."""
    cleaned = normalize_tag_name(name)
    error = tag_name_error(cleaned)
    if error:
        raise InvalidTagName(error)
    return cleaned


def parse_tag_input(text: str) -> list[str]:
    """Split typed tags like django-taggit: commas separate, double quotes group.

    ``'salmon, "cuba libre", sushi rice'`` -> ``["salmon", "cuba libre", "sushi rice"]``.
    Without any comma or quote, spaces separate (``"salmon sushi"`` -> two tags), as in taggit.
    Inside a quoted name, two double quotes stand for one, as in CSV: ``"a ""b"" c"`` is the
    name ``a "b" c`` (``widgets.format_tag_input`` writes names that way, so any list of names
    survives a round trip). Duplicates (after normalisation) are dropped, order kept.
    """
    text = text or ""
    words: list[str] = []
    if "," not in text and '"' not in text:
        words = text.split()
    else:
        buffer: list[str] = []
        quoted = False
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == '"':
                if quoted and text.startswith('"', i + 1):
                    buffer.append('"')  # an escaped quote inside a quoted name
                    i += 1
                else:
                    quoted = not quoted
            elif ch == "," and not quoted:
                words.append("".join(buffer))
                buffer = []
            else:
                buffer.append(ch)
            i += 1
        words.append("".join(buffer))
    seen: set[str] = set()
    out: list[str] = []
    for word in words:
        name = normalize_tag_name(word)
        if name and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def add_tags(
    post: Post, names: Iterable[str], source: str = TagSource.TYPED, user=None
) -> list[PostTag]:
    """Add tags to a post (creating Tag rows as needed); tags already on the post are kept as they
    are. Raises :class:`InvalidTagName`, or :class:`TooManyTags` when the post would then carry
    more than ``MAX_TAGS_PER_POST``, before writing anything. The clusters' tag counts follow
    in the same transaction, recounted once for all the new rows."""
    cleaned = list(dict.fromkeys(clean_tag_name(name) for name in names))
    added: list[PostTag] = []
    with transaction.atomic(), deferred_recount():
        existing = set(post.post_tags.values_list("tag__name", flat=True))
        new = [name for name in cleaned if name not in existing]
        if new:
            check_tag_count(len(existing) + len(new))
        for name in new:
            tag, _ = Tag.objects.get_or_create(name=name)
            added.append(PostTag.objects.create(post=post, tag=tag, source=source, added_by=user))
    return added


def apply_auto_tags(post: Post) -> list[PostTag]:
    """Apply the top suggestions to a post whose images have features (``AUTO_TAG`` setting).

    Tags are recorded with source ``auto`` so they can be listed and removed, and by default are
    not counted into cluster frequencies (``COUNTED_TAG_SOURCES``). Suggestions from several
    images are merged by best score. Safe to call again: tags already on the post are skipped.
    """
    if not imagetags_settings.AUTO_TAG:
        return []
    # Usable vectors only: ready and made by the configured extractor (staleness is derived).
    images = list(
        post.images.filter(feature_status=FeatureStatus.READY, extractor_key=get_extractor().key)
    )
    if not images:
        return []
    best: dict[str, float] = {}
    for image in images:
        try:
            result = suggest(
                image,
                limit=imagetags_settings.AUTO_TAG_LIMIT,
                threshold=imagetags_settings.AUTO_TAG_THRESHOLD,
            )
        except SuggestionUnavailable as exc:
            logger.info("No auto tags for post %s: %s", post.pk, exc)
            return []
        for tag in result.tags:
            best[tag.name] = max(best.get(tag.name, 0.0), tag.score)
    present = set(post.post_tags.values_list("tag__name", flat=True))
    # Auto tags fill at most the room left under MAX_TAGS_PER_POST: a background task must not
    # fail on a post that people have tagged fully already.
    room = max(0, max_tags_per_post() - len(present))
    ranked = [
        name for name in sorted(best, key=lambda name: (-best[name], name)) if name not in present
    ]
    chosen = ranked[: min(imagetags_settings.AUTO_TAG_LIMIT, room)]
    return add_tags(post, chosen, source=TagSource.AUTO)


def remove_auto_tags(post: Post | None = None) -> int:
    """Remove auto-applied tags from one post, or from every post; returns how many. The
    clusters' tag counts are recounted once, in the same transaction (they change only where
    ``COUNTED_TAG_SOURCES`` counts auto tags)."""
    queryset = PostTag.objects.filter(source=TagSource.AUTO)
    if post is not None:
        queryset = queryset.filter(post=post)
    with transaction.atomic(), deferred_recount():
        deleted, _ = queryset.delete()
    return deleted
