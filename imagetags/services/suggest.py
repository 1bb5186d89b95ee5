"""Suggesting tags for an image: embed it, compare it with the active cluster set, rank tags.

Two methods (``IMAGETAGS["SUGGEST_METHOD"]``, docs/quality.md has the measurements):

- ``"ivf"`` (default): neighbour voting. The image's nearest neighbours among the members of its
  ``VOTING["PROBES"]`` nearest clusters vote for their posts' tags, each post (or uploader) once,
  weighted by similarity; evidence "on 6 of the 20 most similar posts".
- ``"cluster"``: the patent's method. The nearest cluster's tags by the share of its posts that
  carry them; evidence "in 9 of 40 similar posts".
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError
from PIL import Image

from imagetags.conf import imagetags_settings
from imagetags.core import voting
from imagetags.images import ImageSource
from imagetags.models import (
    ClusterSet,
    FeatureStatus,
    StockImage,
    TagFrequency,
    normalize_tag_name,
)
from imagetags.services import vectors
from imagetags.services.errors import SuggestionUnavailable
from imagetags.services.extractors import get_extractor
from imagetags.services.extractors import warm_up as warm_up_extractor
from imagetags.services.serving import METHODS, serving_cache

logger = logging.getLogger(__name__)


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
            f"{extractor_key}. Run `manage.py compute_features --stale` and `rebuild_clusters`, "
            "or set IMAGETAGS['EXTRACTOR'] back."
        )


__all__ = [
    "METHODS",
    "ExtractorMismatch",
    "MergedSuggestions",
    "NoActiveClusters",
    "SuggestedTag",
    "SuggestionUnavailable",
    "Suggestions",
    "active_cluster_set",
    "embed",
    "merge_suggestions",
    "suggest",
    "suggest_many",
    "suggest_method",
    "vote_params",
    "warm_up",
]


@dataclass(frozen=True)
class SuggestedTag:
    name: str
    # What the list is ordered by, 0..1. cluster: share of the cluster's posts carrying the tag;
    # ivf: similarity-weighted share of the neighbour posts, less VOTING["PRIOR_WEIGHT"] × the
    # tag's library-wide share.
    score: float
    post_count: int  # posts (ivf: voters) behind the evidence that carry the tag
    cluster_posts: int  # posts (ivf: voters) the evidence counts
    evidence: str  # e.g. "in 9 of 40 similar posts", "on 6 of the 20 most similar posts"

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
    method: str = "cluster"  # the method that ranked the tags (SUGGEST_METHOD)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = [tag.as_dict() for tag in self.tags]
        return data


def embed(
    source: StockImage | ImageSource | Image.Image, extractor_key: str | None = None
) -> np.ndarray:
    """The unit feature vector of an image: the stored one when it is current, else computed now.

    A PIL image is taken as already opened and checked (``images.open_image``), e.g. by the API's
    validation, which decodes each upload once.

    Computing here is for the CLI, the API and tests; the upload flow stores vectors through the
    background task, so a web request only embeds an image the user is choosing right now.
    """
    extractor = get_extractor()
    if isinstance(source, StockImage):
        if (
            source.feature_status == FeatureStatus.READY
            and source.vector is not None
            and source.extractor_key == extractor.key
        ):
            return vectors.from_bytes(source.vector)
        source = source.image
    image = source if isinstance(source, Image.Image) else extractor.open_image(source)
    return extractor.embed_batch([image])[0]


def active_cluster_set() -> ClusterSet:
    """The active cluster set (``ServingCache.active_set``: one indexed query per call, the row
    read again only when another set has been activated)."""
    cluster_set = serving_cache().active_set()
    if cluster_set is None:
        raise NoActiveClusters()
    return cluster_set


def warm_up() -> None:
    """Make the first suggestion as fast as later ones: load the model, and the active set's
    centres and (for the ``ivf`` method) its whole voting index.

    ``IMAGETAGS["WARM_UP"]`` runs this in a background thread when a process starts; a site may
    also call it from a worker hook. Without clusters (a new site, a database not migrated yet)
    only the model is loaded: the warm-up must never stop a process from starting.
    """

    warm_up_extractor()
    try:
        cluster_set = active_cluster_set()
        cache = serving_cache()
        cache.centers(cluster_set)
        if suggest_method() == "ivf":
            params = vote_params()
            cache.voting_index(cluster_set).load_all(params.vote_by)
    except NoActiveClusters:
        return
    except DatabaseError:
        logger.warning("Suggestions not warmed up: the database is not ready", exc_info=True)


def suggest_method() -> str:
    """The method ``suggest()`` uses: ``IMAGETAGS["SUGGEST_METHOD"]``, checked."""
    method = imagetags_settings.SUGGEST_METHOD
    if method not in METHODS:
        raise ImproperlyConfigured(
            f"IMAGETAGS['SUGGEST_METHOD'] is {method!r}; choose one of {', '.join(METHODS)}."
        )
    return method


def vote_params() -> voting.VoteParams:
    """``IMAGETAGS["VOTING"]`` as :class:`core.voting.VoteParams`, checked."""
    try:
        return voting.VoteParams.from_setting(imagetags_settings.VOTING)
    except (KeyError, TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"IMAGETAGS['VOTING'] is not usable: {exc}") from exc


def suggest(
    image: StockImage | ImageSource | Image.Image | np.ndarray,
    *,
    limit: int | None = None,
    threshold: float | None = None,
    exclude: Iterable[str] = (),
    method: str | None = None,
) -> Suggestions:
    """Ranked tag suggestions for an image (a StockImage, a file, a path, an image opened by
    ``images.open_image``, or a unit vector).

    Top ``limit`` tags (default ``SUGGEST_LIMIT``) by ``method`` (default ``SUGGEST_METHOD``,
    see the module docstring), only those on at least ``threshold`` of the posts behind them
    (default ``SUGGEST_THRESHOLD``), leaving out ``exclude`` (e.g. tags the post already has).
    Raises :class:`SuggestionUnavailable` subclasses when there are no clusters or they belong
    to another extractor, and ``images.InvalidImage`` for a bad file.
    """
    if method is None:
        method = suggest_method()
    elif method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    cluster_set = active_cluster_set()
    extractor_key = get_extractor().key
    if cluster_set.extractor_key != extractor_key:
        raise ExtractorMismatch(cluster_set.extractor_key, extractor_key)
    vector = image if isinstance(image, np.ndarray) else embed(image, extractor_key)
    centers, cluster_ids, indexes = serving_cache().centers(cluster_set)
    if vector.shape[0] != centers.shape[1]:
        raise ExtractorMismatch(cluster_set.extractor_key, f"a {vector.shape[0]}-d vector")
    options = {
        "limit": imagetags_settings.SUGGEST_LIMIT if limit is None else limit,
        "threshold": imagetags_settings.SUGGEST_THRESHOLD if threshold is None else threshold,
        "exclude": {normalize_tag_name(name) for name in exclude},
    }
    if method == "ivf":
        best, similarity = voting.nearest_cluster(vector, centers)
        return _suggest_by_votes(
            cluster_set, vector, cluster_ids[best], indexes[best], similarity, **options
        )
    return _suggest_from_cluster(cluster_set, vector, centers, cluster_ids, indexes, **options)


def _suggest_by_votes(
    cluster_set: ClusterSet,
    vector: np.ndarray,
    cluster_id: int,
    cluster_index: int,
    similarity: float,
    *,
    limit: int | None,
    threshold: float | None,
    exclude: Collection[str],
) -> Suggestions:
    """Neighbour voting over the inverted file of the active set (``services/index.py``)."""
    params = vote_params()
    index = serving_cache().voting_index(cluster_set)
    # With the neighbours' tags, read by this query.
    ranked, found = index.vote(vector, params, limit=limit, threshold=threshold, exclude=exclude)
    return Suggestions(
        tags=[
            SuggestedTag(
                name=str(item.tag),
                score=round(max(0.0, item.score), 4),
                post_count=item.votes,
                cluster_posts=item.voters,
                evidence=voting.voting_evidence(item.votes, item.voters, params.vote_by),
            )
            for item in ranked
        ],
        cluster=cluster_id,
        cluster_index=cluster_index,
        cluster_set=cluster_set.pk,
        similarity=round(similarity, 4),
        extractor=cluster_set.extractor_key,
        notes=[
            f"{found.image_ids.shape[0]} neighbours from {found.searched} images in the "
            f"{found.probes} nearest clusters"
            if found.engine == "exact"
            else f"{found.image_ids.shape[0]} nearest neighbours found by the {found.engine} "
            "search over the whole library"
        ],
        method="ivf",
    )


def _suggest_from_cluster(
    cluster_set: ClusterSet,
    vector: np.ndarray,
    centers: np.ndarray,
    cluster_ids: list[int],
    indexes: list[int],
    *,
    limit: int | None,
    threshold: float | None,
    exclude: Collection[str],
) -> Suggestions:
    """The patent's method (``core.voting.cluster_tags``), the counts read from TagFrequency."""

    def counts_of(position: int) -> tuple[dict[str, int], int]:
        rows = list(
            TagFrequency.objects.filter(cluster_id=cluster_ids[position]).values_list(
                "tag__name", "post_count", "cluster__post_count"
            )
        )
        return {name: count for name, count, _posts in rows}, (rows[0][2] if rows else 0)

    answer = voting.cluster_tags(
        vector, centers, counts_of, limit=limit, threshold=threshold, exclude=exclude
    )
    ranked = answer.tags
    cluster_id, cluster_index = cluster_ids[answer.index], indexes[answer.index]
    similarity = answer.similarity
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
        method="cluster",
    )


@dataclass(frozen=True)
class MergedSuggestions:
    """Suggestions for several images of one post, merged tag by tag."""

    tags: list[SuggestedTag]
    per_image: list[Suggestions]

    @property
    def cluster_set(self) -> int | None:
        return self.per_image[0].cluster_set if self.per_image else None

    @property
    def method(self) -> str | None:
        """The method that ranked the tags (the same for every image of one call)."""
        return self.per_image[0].method if self.per_image else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tags": [tag.as_dict() for tag in self.tags],
            "cluster_set": self.cluster_set,
            "clusters": [item.cluster for item in self.per_image],
            "extractor": self.per_image[0].extractor if self.per_image else None,
            "method": self.method,
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
    images: Iterable[StockImage | ImageSource | Image.Image | np.ndarray],
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
