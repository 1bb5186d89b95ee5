"""Suggesting tags for an image: embed it, find the nearest centre of the active set, rank tags."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imagetags.conf import imagetags_settings
from imagetags.models import (
    ClusterSet,
    FeatureStatus,
    StockImage,
    TagFrequency,
    normalize_tag_name,
)
from imagetags.services import ranking, vectors
from imagetags.services.clustering import load_centers
from imagetags.services.images import ImageSource, open_image


class SuggestionUnavailable(Exception):
    """Suggestions cannot be made right now; the message says why and what fixes it."""


class NoActiveClusters(SuggestionUnavailable):
    def __init__(self) -> None:
        super().__init__(
            "No clusters yet: the library has not been clustered. "
            "Run `manage.py rebuild_clusters` once images have features."
        )


class ExtractorMismatch(SuggestionUnavailable):
    def __init__(self, cluster_key: str, extractor_key: str) -> None:
        super().__init__(
            f"The active clusters were built with {cluster_key}, but the configured extractor is "
            f"{extractor_key}. Run `manage.py compute_features --stale` and `rebuild_clusters`."
        )


@dataclass(frozen=True)
class SuggestedTag:
    name: str
    score: float  # share of the cluster's posts that carry the tag
    post_count: int
    cluster_posts: int
    evidence: str  # e.g. "in 9 of 40 similar posts"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Suggestions:
    tags: list[SuggestedTag]
    cluster: int  # Cluster primary key
    cluster_index: int
    cluster_set: int  # ClusterSet primary key: the version that answered
    similarity: float  # cosine similarity between the image and the cluster centre
    extractor: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = [tag.as_dict() for tag in self.tags]
        return data


def embed(source: StockImage | ImageSource, extractor_key: str | None = None) -> np.ndarray:
    """The unit feature vector of an image: the stored one when it is current, else computed now.

    Computing here is for the CLI, the API and tests; the upload flow stores vectors through the
    background task, so a web request only embeds an image the user is choosing right now.
    """
    from imagetags.services.extractors import get_extractor

    extractor = get_extractor()
    if isinstance(source, StockImage):
        if (
            source.feature_status == FeatureStatus.READY
            and source.vector is not None
            and source.extractor_key == extractor.key
        ):
            return vectors.from_bytes(source.vector)
        source = source.image
    image, _info = open_image(source)
    return extractor.embed_batch([image])[0]


def active_cluster_set() -> ClusterSet:
    cluster_set = ClusterSet.objects.active()
    if cluster_set is None:
        raise NoActiveClusters()
    return cluster_set


def suggest(
    image: StockImage | ImageSource | np.ndarray,
    *,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Iterable[str] = (),
) -> Suggestions:
    """Ranked tag suggestions for an image (a StockImage, a file, a path, or a unit vector).

    Top ``limit`` tags (default ``SUGGEST_LIMIT``) of the nearest cluster by post frequency,
    only those on at least ``threshold`` of its posts (default ``SUGGEST_THRESHOLD``), leaving
    out ``exclude`` (e.g. tags the post already has). Raises :class:`SuggestionUnavailable`
    subclasses when there are no clusters or they belong to another extractor, and
    ``images.InvalidImage`` for a bad file.
    """
    from imagetags.services.extractors import get_extractor

    cluster_set = active_cluster_set()
    extractor_key = get_extractor().key
    if cluster_set.extractor_key != extractor_key:
        raise ExtractorMismatch(cluster_set.extractor_key, extractor_key)
    vector = image if isinstance(image, np.ndarray) else embed(image, extractor_key)
    centers, cluster_ids, indexes = load_centers(cluster_set)
    if vector.shape[0] != centers.shape[1]:
        raise ExtractorMismatch(cluster_set.extractor_key, f"a {vector.shape[0]}-d vector")
    similarities = centers @ vector
    best = int(similarities.argmax())
    return _suggest_from_cluster(
        cluster_set,
        cluster_ids[best],
        indexes[best],
        float(similarities[best]),
        limit=imagetags_settings.SUGGEST_LIMIT if limit is None else limit,
        threshold=imagetags_settings.SUGGEST_THRESHOLD if threshold is None else threshold,
        exclude={normalize_tag_name(name) for name in exclude},
    )


def _suggest_from_cluster(
    cluster_set: ClusterSet,
    cluster_id: int,
    cluster_index: int,
    similarity: float,
    *,
    limit: int | None,
    threshold: float | None,
    exclude: Collection[str],
) -> Suggestions:
    rows = TagFrequency.objects.filter(cluster_id=cluster_id).values_list(
        "tag__name", "post_count", "cluster__post_count"
    )
    counts = {name: count for name, count, _posts in rows}
    cluster_posts = rows[0][2] if rows else 0
    ranked = ranking.rank_cluster_tags(
        counts, cluster_posts, limit=limit, threshold=threshold, exclude=exclude
    )
    return Suggestions(
        tags=[
            SuggestedTag(
                name=str(item.tag),
                score=round(item.score, 4),
                post_count=item.post_count,
                cluster_posts=item.cluster_posts,
                evidence=item.evidence,
            )
            for item in ranked
        ],
        cluster=cluster_id,
        cluster_index=cluster_index,
        cluster_set=cluster_set.pk,
        similarity=round(similarity, 4),
        extractor=cluster_set.extractor_key,
    )


@dataclass(frozen=True)
class MergedSuggestions:
    """Suggestions for several images of one post, merged tag by tag."""

    tags: list[SuggestedTag]
    per_image: list[Suggestions]

    @property
    def cluster_set(self) -> int | None:
        return self.per_image[0].cluster_set if self.per_image else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tags": [tag.as_dict() for tag in self.tags],
            "cluster_set": self.cluster_set,
            "clusters": [item.cluster for item in self.per_image],
            "extractor": self.per_image[0].extractor if self.per_image else None,
        }


def merge_suggestions(
    results: Iterable[Suggestions], limit: int | None = None
) -> MergedSuggestions:
    """Merge per-image suggestions: a tag keeps its best score (and that score's evidence), and
    tags suggested for more of the images come first among equal scores."""
    results = list(results)
    best: dict[str, SuggestedTag] = {}
    votes: dict[str, int] = {}
    for result in results:
        for tag in result.tags:
            votes[tag.name] = votes.get(tag.name, 0) + 1
            if tag.name not in best or tag.score > best[tag.name].score:
                best[tag.name] = tag
    ordered = sorted(best.values(), key=lambda t: (-t.score, -votes[t.name], t.name))
    limit = imagetags_settings.SUGGEST_LIMIT if limit is None else limit
    return MergedSuggestions(tags=ordered[:limit], per_image=results)


def suggest_many(
    images: Iterable[StockImage | ImageSource | np.ndarray],
    *,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Iterable[str] = (),
) -> MergedSuggestions:
    """Suggestions for the images of one post, merged (see :func:`merge_suggestions`)."""
    exclude = list(exclude)
    return merge_suggestions(
        (suggest(image, limit=limit, threshold=threshold, exclude=exclude) for image in images),
        limit=limit,
    )
