"""Offline evaluation of tag suggestions on a throwaway library held in memory.

The library and the queries are read with the import's parser (``library.parse_manifest``),
opened with the upload rules (``images.open_image``), embedded with a real extractor, clustered
with ``ranking.fit_clusters``, counted with ``ranking.count_tag_frequencies`` and ranked with
``ranking.rank_cluster_tags`` / ``ranking.popularity_ranking``: the functions that serve the site's
suggestions, so the numbers describe the serving code. Nothing is read from or written to the
site's database or media storage; the only file written is the optional vector cache.

Protocol (docs/quality.md): split by *post*, so the images of one post are never on both sides;
images byte-identical to an earlier one are dropped, as ``import_library`` skips them; query images
whose post has no tags are not scored (counted separately); untagged library images still take
part in clustering. Metrics per method: P@1, P@3, P@k, R@k, the number of *distinct* tags
suggested correctly at least once, and the mean ranking time per query (extraction excluded).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagetags.services import ranking
from imagetags.services.extractors import FeatureExtractor
from imagetags.services.images import InvalidImage, file_sha256, open_image
from imagetags.services.library import (
    ManifestEntry,
    Rejection,
    group_posts,
    parse_manifest,
    post_tags,
)

#: The method ``suggest()`` serves; reported as ``"default"``.
DEFAULT_METHOD = "cluster"
METHODS = ("popularity", "cluster")

# Called with (images embedded so far, images to embed).
Progress = Callable[[int, int], None]


class EvaluationError(Exception):
    """The evaluation cannot run as asked. The message says what to change."""


# --- data ------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Usable images of a manifest, one row per image, with their posts' tags."""

    entries: list[ManifestEntry]
    sha256: list[str]
    posts: list[str]  # post of each image (ManifestEntry.post_group)
    post_tags: dict[str, frozenset[str]]  # only posts that have an image here
    vectors: np.ndarray | None = None  # (n, d) unit rows once embedded

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
    images = ImageSet(
        entries=kept,
        sha256=sums,
        posts=posts,
        post_tags={post: tags_by_post[post] for post in dict.fromkeys(posts)},
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


# --- embedding -------------------------------------------------------------------------------


class VectorCache:
    """Vectors by image SHA-256 for one extractor key, in ``<dir>/<key slug>-<hash>.npz``.

    Vectors depend only on the file's bytes and the extractor, so repeated runs (seeds, K sweeps)
    skip extraction. The key is stored in the file and checked, so a changed extractor never
    reads another one's vectors.
    """

    def __init__(self, directory: str | os.PathLike, extractor_key: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", extractor_key).strip("-")[:60]
        digest = hashlib.sha256(extractor_key.encode()).hexdigest()[:16]
        self.path = Path(directory) / f"{slug}-{digest}.npz"
        self.key = extractor_key
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["key"]) != self.key:
                    return
                self.vectors = dict(zip(data["sha256"].tolist(), data["vectors"], strict=True))
        except (OSError, ValueError, KeyError):
            self.vectors = {}  # unreadable or old format: rebuild it

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sums = sorted(self.vectors)
        # Per-process temporary name: two sweeps sharing a cache must not write one file.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            key=np.array(self.key),
            sha256=np.array(sums),
            vectors=np.stack([self.vectors[s] for s in sums]).astype(np.float32),
        )
        os.replace(tmp, self.path)  # readers never see half a file
        self.dirty = False


@dataclass
class EmbedResult:
    images: ImageSet  # the images that could be embedded, with ``vectors`` set
    rejected: list[Rejection]  # files ``open_image`` refused
    cache_hits: int


def embed_image_set(
    image_set: ImageSet,
    extractor: FeatureExtractor,
    *,
    cache: VectorCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every image in batches; images found in ``cache`` are not even decoded."""
    found: dict[int, np.ndarray] = {}
    if cache is not None:
        for index, sha256 in enumerate(image_set.sha256):
            if sha256 in cache.vectors:
                found[index] = cache.vectors[sha256]
    hits = len(found)
    todo = [index for index in range(len(image_set)) if index not in found]
    rejected: list[Rejection] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch: list[int] = []
        images: list[Image.Image] = []
        for index in chunk:
            entry = image_set.entries[index]
            try:
                image, _info = open_image(entry.file)
            except (InvalidImage, OSError) as exc:
                rejected.append(Rejection(entry.line, entry.path, str(exc)))
                continue
            batch.append(index)
            images.append(_shrunk(image, extractor))
        if batch:
            matrix = extractor.embed_batch(images)
            for index, vector in zip(batch, matrix, strict=True):
                found[index] = vector
                if cache is not None:
                    cache.vectors[image_set.sha256[index]] = vector
                    cache.dirty = True
        if progress is not None:
            progress(start + len(chunk), len(todo))
    keep = sorted(found)
    embedded = image_set.take(keep)
    embedded.vectors = (
        np.stack([found[index] for index in keep]).astype(np.float32)
        if keep
        else np.empty((0, extractor.dim), dtype=np.float32)
    )
    return EmbedResult(images=embedded, rejected=rejected, cache_hits=hits)


def _shrunk(image: Image.Image, extractor: FeatureExtractor) -> Image.Image:
    """The image at model input size, so a batch of large photos is not held at full size.

    ``embed_batch`` prepares it again, a no-op at that size, so the vector is the same
    (``features._decode`` does the same for stored images).
    """
    prepared = extractor.prepare(image)
    if isinstance(prepared, np.ndarray) and prepared.dtype == np.uint8 and prepared.ndim == 3:
        return Image.fromarray(prepared, "RGB")
    return image


# --- scoring ---------------------------------------------------------------------------------


@dataclass
class MethodScores:
    p_at_k: float
    r_at_k: float
    distinct_correct: int
    p_at_1: float
    p_at_3: float
    query_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_rankings(
    rankings: Sequence[Sequence[str]],
    truths: Sequence[Collection[str]],
    k: int,
    *,
    query_seconds: float = 0.0,
) -> MethodScores:
    """Precision and recall of ranked tag lists against each query's true tags.

    P@n divides the hits in the top ``n`` by ``n`` (a method that offers fewer than ``n`` tags is
    not rewarded for it); R@k divides them by the number of true tags. ``distinct_correct``
    counts different tags that were a hit in some query's top ``k``: a method that always says
    "food, delicious, ..." scores well on P@5 and poorly here.
    """
    if not rankings or len(rankings) != len(truths):
        raise ValueError("score_rankings needs one ranking per query, and at least one query.")

    def precision(n: int) -> float:
        return float(
            np.mean([len(set(r[:n]) & set(t)) / n for r, t in zip(rankings, truths, strict=True)])
        )

    recall = float(
        np.mean([len(set(r[:k]) & set(t)) / len(t) for r, t in zip(rankings, truths, strict=True)])
    )
    distinct: set[str] = set()
    for ranked, truth in zip(rankings, truths, strict=True):
        distinct.update(set(ranked[:k]) & set(truth))
    return MethodScores(
        p_at_k=precision(k),
        r_at_k=recall,
        distinct_correct=len(distinct),
        p_at_1=precision(1),
        p_at_3=precision(3),
        query_ms=1000.0 * query_seconds / len(rankings),
    )


@dataclass
class ClusterModel:
    """The patent's model of a library: centres, and per cluster its post count and tag counts."""

    result: ranking.ClusteringResult
    post_counts: list[int]
    frequencies: list[Counter]

    def rank(self, vector: np.ndarray, limit: int) -> list[str]:
        """Tags of the cluster most similar to ``vector``, by how many of its posts carry them."""
        labels, _sims = ranking.nearest_centers(vector[None, :], self.result.centers)
        label = int(labels[0])
        ranked = ranking.rank_cluster_tags(
            self.frequencies[label], self.post_counts[label], limit=limit
        )
        return [str(item.tag) for item in ranked]


def fit_cluster_model(
    library: ImageSet,
    n_clusters: int,
    *,
    algorithm: str,
    seed: int,
    batch_size: int,
    max_iter: int,
    tol: float,
) -> ClusterModel:
    """Cluster the library's vectors and count each cluster's tags once per post."""
    assert library.vectors is not None
    result = ranking.fit_clusters(
        library.vectors,
        n_clusters,
        algorithm=algorithm,
        batch_size=batch_size,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
    )
    post_counts, frequencies = ranking.count_tag_frequencies(
        result.labels, library.posts, library.post_tags, result.k
    )
    return ClusterModel(result=result, post_counts=post_counts, frequencies=frequencies)


def score_popularity(library: ImageSet, queries: ImageSet, k: int) -> MethodScores:
    """The baseline: the library's most common tags (by post count), whatever the image."""
    popular = [str(tag) for tag, _count in ranking.popularity_ranking(library.post_tags)]
    depth = max(k, 3)
    rankings, seconds = [], 0.0
    for _index in range(len(queries)):
        started = time.perf_counter()
        rankings.append(popular[:depth])
        seconds += time.perf_counter() - started
    return score_rankings(rankings, _truths(queries), k, query_seconds=seconds)


def score_cluster(model: ClusterModel, queries: ImageSet, k: int) -> MethodScores:
    """The patent's method: nearest centre by cosine, that cluster's tags by post frequency."""
    assert queries.vectors is not None
    depth = max(k, 3)
    rankings, seconds = [], 0.0
    for vector in queries.vectors:
        started = time.perf_counter()
        rankings.append(model.rank(vector, depth))
        seconds += time.perf_counter() - started
    return score_rankings(rankings, _truths(queries), k, query_seconds=seconds)


def _truths(queries: ImageSet) -> list[frozenset[str]]:
    return [queries.tags_of(index) for index in range(len(queries))]


# --- the whole run ---------------------------------------------------------------------------


def resolve_clusters(clusters: int | str, n_library: int) -> int:
    """K as asked: a number, or ``"auto"`` (``ranking.auto_k`` of the library size)."""
    if clusters == "auto":
        return ranking.auto_k(n_library)
    try:
        value = int(clusters)
    except (TypeError, ValueError):
        raise EvaluationError(
            f"--clusters must be a whole number or 'auto', not {clusters!r}."
        ) from None
    if value < 1:
        raise EvaluationError(f"--clusters must be at least 1, not {value}.")
    return value


def run_evaluation(
    library_manifest: str | os.PathLike,
    *,
    extractor: FeatureExtractor,
    queries_manifest: str | os.PathLike | None = None,
    holdout: float | None = None,
    k: int = 5,
    clusters: int | str | None = None,
    algorithm: str | None = None,
    seed: int = 0,
    k_sweep: Sequence[int | str] = (),
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build a throwaway library, score ``popularity`` and ``cluster`` on the queries.

    Queries come from ``queries_manifest`` or, with ``holdout``, from a seeded split of the
    library's posts. ``seed`` drives both the split and the clustering. ``clusters``,
    ``algorithm`` and the clustering parameters default to ``IMAGETAGS['CLUSTERING']``.
    ``k_sweep`` additionally scores the cluster method for each K listed.

    Returns the report ``evaluate_suggestions --json`` prints. Raises :class:`EvaluationError`
    before any extraction when the request cannot give a result.
    """
    from imagetags.conf import imagetags_settings

    started = time.perf_counter()
    if (queries_manifest is None) == (holdout is None):
        raise EvaluationError(
            "Give exactly one source of queries: --queries Q.jsonl (a separate manifest) or "
            "--holdout F (hold out that share of the library's posts, e.g. --holdout 0.3)."
        )
    if holdout is not None and not 0 < holdout < 1:
        raise EvaluationError(
            f"--holdout must be between 0 and 1 (exclusive), not {holdout}; e.g. --holdout 0.3."
        )
    if k < 1:
        raise EvaluationError(f"--k must be at least 1, not {k}.")
    defaults = imagetags_settings.CLUSTERING
    clusters = defaults["K"] if clusters is None else clusters
    algorithm = algorithm or defaults["ALGORITHM"]
    if algorithm not in ranking.ALGORITHMS:
        raise EvaluationError(
            f"Unknown algorithm {algorithm!r}: choose {' or '.join(ranking.ALGORITHMS)}."
        )
    batch_size = batch_size or imagetags_settings.BATCH_SIZE

    read = read_image_set(library_manifest)
    rejected = _labelled(library_manifest, read.rejected)
    duplicates = read.duplicates
    if holdout is not None:
        library_idx, query_idx = split_by_post(read.images.posts, holdout, seed)
        library, queries = read.images.take(library_idx), read.images.take(query_idx)
        split: dict[str, Any] = {"holdout": holdout, "seed": seed}
    else:
        library = read.images
        # A query that is also in the library would find its own vector: drop it like a duplicate.
        query_read = read_image_set(queries_manifest, exclude_sha256=set(library.sha256))
        queries = query_read.images
        rejected += _labelled(queries_manifest, query_read.rejected)
        duplicates += query_read.duplicates
        split = {"queries": str(queries_manifest)}

    wanted = [resolve_clusters(value, len(library)) for value in [clusters, *k_sweep]]
    _check_sizes(library, queries, wanted)

    extract_started = time.perf_counter()
    cache = VectorCache(cache_dir, extractor.key) if cache_dir else None
    if cache is not None:
        cache.load()
    cache_hits = 0
    embedded: list[ImageSet] = []
    sources = (library_manifest, queries_manifest or library_manifest)
    # One progress count over both sets: images still to embed (cached ones are not).
    todo = [
        sum(1 for sha256 in image_set.sha256 if cache is None or sha256 not in cache.vectors)
        for image_set in (library, queries)
    ]
    offset = 0
    for image_set, source, count in zip((library, queries), sources, todo, strict=True):

        def report_progress(done: int, _total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, sum(todo))

        result = embed_image_set(
            image_set, extractor, cache=cache, batch_size=batch_size, progress=report_progress
        )
        embedded.append(result.images)
        rejected += _labelled(source, result.rejected)
        offset += count
        cache_hits += result.cache_hits
    if cache is not None:
        cache.save()
    library, queries = embedded
    extract_seconds = time.perf_counter() - extract_started
    _check_sizes(library, queries, wanted)  # again: undecodable files may have been dropped
    scored = queries.tagged()

    cluster_params = {
        "algorithm": algorithm,
        "seed": seed,
        "batch_size": defaults["BATCH_SIZE"],
        "max_iter": defaults["MAX_ITER"],
        "tol": defaults["TOL"],
    }
    cluster_started = time.perf_counter()
    model = fit_cluster_model(library, wanted[0], **cluster_params)
    cluster_seconds = time.perf_counter() - cluster_started
    methods = {
        "popularity": score_popularity(library, scored, k).as_dict(),
        "cluster": score_cluster(model, scored, k).as_dict(),
    }
    report: dict[str, Any] = {
        "k": k,
        "library": len(library),
        "queries": len(scored),
        "default": DEFAULT_METHOD,
        "methods": methods,
        "unscored_queries": len(queries) - len(scored),
        "library_posts": len(library.post_tags),
        "query_posts": len(scored.post_tags),
        "split": split,
        "extractor": extractor.key,
        "clusters": model.result.k,
        "clusters_requested": wanted[0],
        "algorithm": algorithm,
        "seed": seed,
        "rejected": rejected,
        "duplicates_dropped": duplicates,
        "vectors_from_cache": cache_hits,
    }
    if k_sweep:
        report["k_sweep"] = []
        for n_clusters in wanted[1:]:
            swept = fit_cluster_model(library, n_clusters, **cluster_params)
            report["k_sweep"].append(
                {
                    "clusters_requested": n_clusters,
                    "clusters": swept.result.k,
                    **score_cluster(swept, scored, k).as_dict(),
                }
            )
    report["seconds"] = {
        "extract": round(extract_seconds, 3),
        "cluster": round(cluster_seconds, 3),
        "total": round(time.perf_counter() - started, 3),
    }
    return report


def _labelled(manifest: str | os.PathLike, rejections: list[Rejection]) -> list[str]:
    name = Path(manifest).name
    return [f"{name} {rejection}" for rejection in rejections]


def _check_sizes(library: ImageSet, queries: ImageSet, wanted: Sequence[int]) -> None:
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
