"""Putting tags on posts: parsing typed input, recording each tag's source, auto-tagging."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import transaction

from imagetags.conf import imagetags_settings
from imagetags.models import (
    TAG_NAME_MAX_LENGTH,
    FeatureStatus,
    Post,
    PostTag,
    Tag,
    TagSource,
    normalize_tag_name,
)

logger = logging.getLogger(__name__)


class InvalidTagName(ValueError):
    pass


def clean_tag_name(name: str) -> str:
    """A normalised tag name, or :class:`InvalidTagName` saying what is wrong with it.

    Any text is allowed (it is always shown escaped); only empty and over-long names and control
    characters are refused.
    """
    cleaned = normalize_tag_name(name)
    if not cleaned:
        raise InvalidTagName("A tag name cannot be empty.")
    if len(cleaned) > TAG_NAME_MAX_LENGTH:
        raise InvalidTagName(
            f"Tag names are at most {TAG_NAME_MAX_LENGTH} characters; "
            f"{cleaned[:20]!r}… has {len(cleaned)}."
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in cleaned):
        raise InvalidTagName(f"Tag name {cleaned!r} contains control characters.")
    return cleaned


def parse_tag_input(text: str) -> list[str]:
    """Split typed tags like django-taggit: commas separate, double quotes group.

    ``'salmon, "cuba libre", sushi rice'`` -> ``["salmon", "cuba libre", "sushi rice"]``.
    Without any comma or quote, spaces separate (``"salmon sushi"`` -> two tags), as in taggit.
    Duplicates (after normalisation) are dropped, order kept.
    """
    text = text or ""
    words: list[str] = []
    if "," not in text and '"' not in text:
        words = text.split()
    else:
        buffer: list[str] = []
        quoted = False
        for ch in text:
            if ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                words.append("".join(buffer))
                buffer = []
            else:
                buffer.append(ch)
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
    are. Raises :class:`InvalidTagName` before writing anything if any name is invalid."""
    cleaned = [clean_tag_name(name) for name in names]
    added: list[PostTag] = []
    with transaction.atomic():
        existing = set(post.post_tags.values_list("tag__name", flat=True))
        for name in dict.fromkeys(cleaned):
            if name in existing:
                continue
            tag, _ = Tag.objects.get_or_create(name=name)
            added.append(PostTag.objects.create(post=post, tag=tag, source=source, added_by=user))
    return added


def apply_auto_tags(post: Post) -> list[PostTag]:
    """Apply the top suggestions to a post whose images have features (``AUTO_TAG`` setting).

    Tags are recorded with source ``auto`` so they can be listed and removed, and by default are
    not counted into cluster frequencies (``COUNTED_TAG_SOURCES``). Suggestions from several
    images are merged by best score. Safe to call again: tags already on the post are skipped.
    """
    from imagetags.services.extractors import get_extractor
    from imagetags.services.suggest import SuggestionUnavailable, suggest

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
    chosen = sorted(best, key=lambda name: (-best[name], name))[: imagetags_settings.AUTO_TAG_LIMIT]
    return add_tags(post, chosen, source=TagSource.AUTO)


def remove_auto_tags(post: Post | None = None) -> int:
    """Remove auto-applied tags from one post, or from every post; returns how many."""
    queryset = PostTag.objects.filter(source=TagSource.AUTO)
    if post is not None:
        queryset = queryset.filter(post=post)
    deleted, _ = queryset.delete()
    return deleted
