"""The evaluation's data: image sets read from manifests, and their splits by post."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagetags.core import kmeans
from imagetags.images import file_sha256
from imagetags.services.library import (
    ManifestEntry,
    Rejection,
    group_posts,
    parse_manifest,
    post_tags,
)

# Called with (images embedded so far, images to embed).
Progress = Callable[[int, int], None]


class EvaluationError(Exception):
    """The evaluation cannot run as asked. The message says what to change."""


@dataclass
class ImageSet:
    """Usable images of a manifest, one row per image, with their posts' tags."""

    entries: list[ManifestEntry]
    sha256: list[str]
    posts: list[str]  # post of each image (ManifestEntry.post_group)
    post_tags: dict[str, frozenset[str]]  # only posts that have an image here
    vectors: np.ndarray | None = None  # (n, d) unit rows once embedded
    # Uploader of each post where the manifest names one (Post.external_owner on import).
    owners: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def take(self, indexes: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indexes``, with only their posts' tags."""
        indexes = [int(i) for i in indexes]
        posts = [self.posts[i] for i in indexes]
        return ImageSet(
            entries=[self.entries[i] for i in indexes],
            sha256=[self.sha256[i] for i in indexes],
            posts=posts,
            post_tags={post: self.post_tags[post] for post in dict.fromkeys(posts)},
            vectors=None if self.vectors is None else self.vectors[indexes],
            owners={
                post: self.owners[post] for post in dict.fromkeys(posts) if post in self.owners
            },
        )

    def tags_of(self, index: int) -> frozenset[str]:
        return self.post_tags[self.posts[index]]

    def tagged(self) -> ImageSet:
        """Only the images whose post has tags (the ones a query can be scored on)."""
        return self.take([index for index in range(len(self)) if self.tags_of(index)])


@dataclass
class ReadResult:
    images: ImageSet
    rejected: list[Rejection]  # lines the import would reject
    duplicates: int  # images dropped as byte-identical to an earlier (or excluded) one


def read_image_set(
    manifest: str | os.PathLike, *, exclude_sha256: Collection[str] = ()
) -> ReadResult:
    """Parse a manifest and checksum its images (cheap: nothing is decoded yet).

    An image byte-identical to an earlier one, or to one in ``exclude_sha256``, is dropped, as
    ``import_library`` would skip it.
    """
    entries = parse_manifest(manifest)
    kept: list[ManifestEntry] = []
    sums: list[str] = []
    rejected: list[Rejection] = []
    seen = set(exclude_sha256)
    duplicates = 0
    for entry in entries:
        if not entry.ok:
            rejected.append(Rejection(entry.line, entry.path, "; ".join(entry.errors)))
            continue
        try:
            sha256 = file_sha256(entry.file)
        except OSError as exc:
            rejected.append(Rejection(entry.line, entry.path, f"unreadable ({exc})"))
            continue
        if sha256 in seen:
            duplicates += 1
            continue
        seen.add(sha256)
        kept.append(entry)
        sums.append(sha256)
    # A post's tags are the union over all its valid lines, exactly as the import saves them.
    tags_by_post = {key: frozenset(post_tags(group)) for key, group in group_posts(entries).items()}
    posts = [entry.post_group for entry in kept]
    owners: dict[str, str] = {}
    for entry in entries:  # the first owner named on a post's lines, as the import keeps it
        if entry.ok and entry.owner and entry.post_group not in owners:
            owners[entry.post_group] = entry.owner
    images = ImageSet(
        entries=kept,
        sha256=sums,
        posts=posts,
        post_tags={post: tags_by_post[post] for post in dict.fromkeys(posts)},
        owners={post: owners[post] for post in dict.fromkeys(posts) if post in owners},
    )
    return ReadResult(images=images, rejected=rejected, duplicates=duplicates)


def split_by_post(
    posts: Sequence[str], holdout: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image indexes (library, queries): a seeded random ``holdout`` share of the *posts* are
    queries, so every post lies wholly on one side."""
    if not 0 < holdout < 1:
        raise EvaluationError(f"--holdout must be between 0 and 1 (exclusive), not {holdout}.")
    unique = list(dict.fromkeys(posts))
    if len(unique) < 2:
        raise EvaluationError(
            f"The library has {len(unique)} post(s); a hold-out split needs at least 2."
        )
    n_queries = min(len(unique) - 1, max(1, round(holdout * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    query_posts = {unique[i] for i in order[:n_queries]}
    is_query = np.array([post in query_posts for post in posts], dtype=bool)
    return np.flatnonzero(~is_query), np.flatnonzero(is_query)


def folds_by_post(posts: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every image: posts are dealt round-robin in a seeded random
    order, so folds differ by at most one post and a post's images share one fold."""
    unique = list(dict.fromkeys(posts))
    if folds < 2:
        raise EvaluationError(f"--folds must be at least 2, not {folds}.")
    if len(unique) < folds:
        raise EvaluationError(
            f"The library has {len(unique)} post(s), too few for {folds} folds: use fewer folds."
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[p]: n % folds for n, p in enumerate(order)}
    return np.array([fold_of[post] for post in posts], dtype=np.int64)


def fold_splits(images: ImageSet, folds: int, seed: int) -> list[tuple[ImageSet, ImageSet]]:
    """(library, queries) for each fold: the fold's posts are the queries, the others the library."""
    assignment = folds_by_post(images.posts, folds, seed)
    return [
        (images.take(np.flatnonzero(assignment != f)), images.take(np.flatnonzero(assignment == f)))
        for f in range(folds)
    ]


def labelled(manifest: str | os.PathLike, rejections: list[Rejection]) -> list[str]:
    name = Path(manifest).name
    return [f"{name} {rejection}" for rejection in rejections]


def check_sizes(library: ImageSet, queries: ImageSet, wanted: Sequence[int]) -> None:
    largest = max(wanted)
    if len(library) < largest:
        raise EvaluationError(
            f"The library has {len(library)} usable images, too few for K={largest} clusters: "
            "lower --clusters (or use --clusters auto), shorten --k-sweep, use a smaller "
            "--holdout, or give a larger library."
        )
    if not len(queries.tagged()):
        raise EvaluationError(
            f"None of the {len(queries)} query images has tags, so nothing can be scored: give "
            "queries whose lines (or posts) carry tags."
        )


def resolve_clusters(clusters: int | str, n_library: int) -> int:
    """K as asked: a number, or ``"auto"`` (``kmeans.auto_k`` of the library size)."""
    if clusters == "auto":
        return kmeans.auto_k(n_library)
    try:
        value = int(clusters)
    except (TypeError, ValueError):
        raise EvaluationError(
            f"--clusters must be a whole number or 'auto', not {clusters!r}."
        ) from None
    if value < 1:
        raise EvaluationError(f"--clusters must be at least 1, not {value}.")
    return value
