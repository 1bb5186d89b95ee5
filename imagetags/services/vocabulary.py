"""Looking after the tag vocabulary: usage counts and merging duplicate tags.

Merging ``"salmon fillet"`` and ``"salmon-fillet"`` into ``"salmon"`` must leave the library as if
people had typed ``"salmon"`` all along: every post keeps one ``salmon`` row (never two, never a
lost source), the clusters' tag frequencies count each post once, and feedback on the old names
counts for the new one. :func:`merge_tags` does all of it in one transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import QuerySet

from imagetags.models import (
    PostTag,
    SuggestionFeedback,
    Tag,
    TagSource,
    normalize_tag_name,
    tag_name_error,
)
from imagetags.services.feedback import count_subquery
from imagetags.services.frequencies import deferred_recount, posts_changed
from imagetags.services.store import IDS_PER_QUERY, batched

# Which row survives when a post carries several of the merged tags: what a person gave beats
# what was imported, which beats what the machine applied on its own.
SOURCE_PRECEDENCE = (TagSource.TYPED, TagSource.SUGGESTED, TagSource.IMPORTED, TagSource.AUTO)

# Ids per `IN (...)` list: below SQLite's historical limit of 999 bound parameters.
_ID_CHUNK = IDS_PER_QUERY


class TagMergeError(ValueError):
    """The merge cannot go ahead; the message says why."""


@dataclass
class MergeResult:
    """What :func:`merge_tags` changed."""

    target: str
    merged: list[str] = field(default_factory=list)
    posts_moved: int = 0  # posts that now carry the target instead of a merged tag
    duplicates_removed: int = 0  # rows dropped because the post already had the target
    feedback_moved: int = 0
    clusters_recounted: int = 0

    def summary(self) -> str:
        return (
            f"Merged {', '.join(repr(name) for name in self.merged)} into {self.target!r}: "
            f"{self.posts_moved} posts re-tagged, {self.duplicates_removed} duplicate tags "
            f"removed, {self.feedback_moved} feedback rows moved, tag counts of "
            f"{self.clusters_recounted} clusters recounted."
        )


def annotate_usage(tags: QuerySet[Tag]) -> QuerySet[Tag]:
    """Add ``post_count`` (posts carrying the tag, any source) and ``auto_count`` (of which
    auto-applied) to each tag."""
    post_tags = PostTag.objects.all()
    return tags.annotate(
        post_count=count_subquery(post_tags, "tag"),
        auto_count=count_subquery(post_tags, "tag", source=TagSource.AUTO),
    )


def _rank(row: dict) -> tuple:
    try:
        precedence = SOURCE_PRECEDENCE.index(row["source"])
    except ValueError:  # a source added later ranks after the known ones
        precedence = len(SOURCE_PRECEDENCE)
    return (precedence, row["created"], row["pk"])


def merge_tags(sources: Iterable[Tag | int], target: Tag | int) -> MergeResult:
    """Merge the ``sources`` tags into ``target`` and delete them, atomically.

    - **Posts**: a post keeps exactly one row of ``target``. Where it had several of the merged
      tags, the surviving row takes the most trustworthy source (typed > suggested > imported >
      auto; earliest first), so a typed tag never turns into an auto one.
    - **Tag frequencies**: in every cluster holding a re-tagged post (of the active and the
      retired sets, so a rollback stays right), the counts of the target and the merged tags
      are recounted from the cluster's members (``frequencies.recount_posts``): posts carrying
      the target with a counted source, each once. Summing would count a post that had both
      tags twice.
    - **Feedback**: rows about a merged tag now name the target.

    Raises :class:`TagMergeError` (nothing changed) when there is nothing to merge or a tag
    does not exist. Any database error rolls everything back.
    """
    target_id = target.pk if isinstance(target, Tag) else int(target)
    source_ids = sorted(
        {tag.pk if isinstance(tag, Tag) else int(tag) for tag in sources} - {target_id}
    )
    if not source_ids:
        raise TagMergeError("Choose at least one tag to merge into the target, besides itself.")
    with transaction.atomic():
        # Lock the tags so two merges of overlapping tags run one after the other.
        names = dict(
            Tag.objects.select_for_update()
            .filter(pk__in=[target_id, *source_ids])
            .values_list("pk", "name")
        )
        missing = [pk for pk in [target_id, *source_ids] if pk not in names]
        if missing:
            raise TagMergeError(f"Tags {missing} do not exist (any more).")
        # The rules of every other path: merging into a name no one could type now (an old row
        # with an invisible or control character) would spread it instead of removing it.
        target_name = names[target_id]
        error = tag_name_error(target_name)
        if error or normalize_tag_name(target_name) != target_name:
            raise TagMergeError(
                f"{target_name!r} cannot be kept: "
                f"{error or 'it is not in normalised form (run manage.py normalize_tags)'}. "
                "Choose another tag to keep."
            )
        result = MergeResult(target=names[target_id], merged=sorted(names[pk] for pk in source_ids))
        # One recount at the end of the block, for the rows deleted (they report themselves)
        # and those moved or upgraded by update() (which sends no signal, so reported here).
        with deferred_recount() as recount:
            affected = _merge_post_tags(source_ids, target_id, result)
            posts_changed(affected, [target_id, *source_ids])
        result.clusters_recounted = recount.clusters_recounted
        result.feedback_moved = SuggestionFeedback.objects.filter(tag_id__in=source_ids).update(
            tag_id=target_id
        )
        Tag.objects.filter(pk__in=source_ids).delete()
    return result


def _merge_post_tags(source_ids: list[int], target_id: int, result: MergeResult) -> set[int]:
    """Re-tag the posts; returns the ids of those that carried a merged tag."""
    affected_posts = PostTag.objects.filter(tag_id__in=source_ids).values("post_id")
    by_post: dict[int, list[dict]] = defaultdict(list)
    for row in PostTag.objects.filter(
        tag_id__in=[target_id, *source_ids], post_id__in=affected_posts
    ).values("pk", "post_id", "tag_id", "source", "added_by_id", "created"):
        by_post[row["post_id"]].append(row)

    delete_ids: list[int] = []
    move_ids: list[int] = []
    upgrades: list[PostTag] = []
    for rows in by_post.values():
        best = min(rows, key=_rank)
        current = next((row for row in rows if row["tag_id"] == target_id), None)
        if current is None:
            move_ids.append(best["pk"])  # the best merged row becomes the target's row
            delete_ids.extend(row["pk"] for row in rows if row is not best)
            continue
        delete_ids.extend(row["pk"] for row in rows if row is not current)
        if best is not current:
            # The post already had the target, but a merged tag had a stronger source.
            upgrades.append(
                PostTag(pk=current["pk"], source=best["source"], added_by_id=best["added_by_id"])
            )
    # Delete first: moving a row onto a post that still had a duplicate would break the
    # (post, tag) unique constraint.
    for chunk in batched(delete_ids):
        PostTag.objects.filter(pk__in=chunk).delete()
    for chunk in batched(move_ids):
        PostTag.objects.filter(pk__in=chunk).update(tag_id=target_id)
    PostTag.objects.bulk_update(upgrades, ["source", "added_by_id"], batch_size=_ID_CHUNK)
    result.posts_moved = len(move_ids)
    result.duplicates_removed = len(delete_ids)
    return set(by_post)


# --- names stored before the current normalisation -----------------------------------------


@dataclass(frozen=True)
class UnnormalisedTag:
    """A stored tag whose name the current rules (``models.normalize_tag_name``) would change."""

    pk: int
    name: str
    normalised: str
    error: str | None  # why the normalised name is still not a valid one, if it is not
    existing: int | None  # pk of the tag already carrying the normalised name

    @property
    def action(self) -> str:
        if self.error:
            return "rename by hand"
        return "merge" if self.existing is not None else "rename"


def unnormalised_tags() -> list[UnnormalisedTag]:
    """Tags saved before names were NFKC-normalised and refused invisible characters.

    Such rows stay usable (they are shown escaped, suggested and counted as before); but a name
    typed now never matches them (``"food\u200b"`` is typed as ``"food"``), so they should be
    merged into, or renamed to, their normalised name. Reads names only (one query over all
    tags, plus one for the names they would become).
    """
    found = []
    for pk, name in Tag.objects.order_by("pk").values_list("pk", "name").iterator():
        normalised = normalize_tag_name(name)
        if normalised != name or tag_name_error(name):
            found.append((pk, name, normalised, tag_name_error(normalised)))
    targets = dict(
        Tag.objects.filter(name__in=[item[2] for item in found if not item[3]]).values_list(
            "name", "pk"
        )
    )
    return [
        UnnormalisedTag(pk, name, normalised, error, targets.get(normalised))
        for pk, name, normalised, error in found
    ]


def normalise_tag_names() -> list[tuple[UnnormalisedTag, str]]:
    """Merge each unnormalised tag into the tag with its normalised name, or rename it to that
    name when there is none; names that stay invalid are left for a person. Returns what was
    done to each (``merge_tags`` summaries, "renamed", or why it was left)."""
    done = []
    for item in unnormalised_tags():
        if item.error:
            done.append((item, f"left: {item.error}"))
        elif item.existing is not None:
            done.append((item, merge_tags([item.pk], item.existing).summary()))
        else:
            with transaction.atomic():
                # A later row of this run may normalise to the same name: look again.
                target = Tag.objects.filter(name=item.normalised).first()
                if target is not None:
                    done.append((item, merge_tags([item.pk], target).summary()))
                else:
                    Tag.objects.filter(pk=item.pk).update(name=item.normalised)
                    done.append((item, f"renamed to {item.normalised!r}"))
    return done
