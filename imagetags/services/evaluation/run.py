"""``run_evaluation``: the whole run behind ``manage.py evaluate_suggestions``."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from imagetags.conf import imagetags_settings
from imagetags.core import kmeans
from imagetags.core import voting as core_voting
from imagetags.core.metrics import MethodScores, summarise
from imagetags.services.evaluation.backends import RECALL_DEPTH, REFERENCE, SearchBuilder
from imagetags.services.evaluation.data import (
    EvaluationError,
    ImageSet,
    Progress,
    check_sizes,
    fold_splits,
    folds_by_post,
    labelled,
    read_image_set,
    resolve_clusters,
    split_by_post,
)
from imagetags.services.evaluation.embedding import VectorCache, embed_image_set
from imagetags.services.evaluation.methods import (
    K_DEPENDENT,
    KNN,
    BackendResult,
    SplitResult,
    evaluate_split,
)
from imagetags.services.evaluation.tuning import run_tuning
from imagetags.services.extractors import FeatureExtractor
from imagetags.services.suggest import suggest_method


def run_evaluation(
    library_manifest: str | os.PathLike,
    *,
    extractor: FeatureExtractor,
    queries_manifest: str | os.PathLike | None = None,
    holdout: float | None = None,
    folds: int | None = None,
    k: int = 5,
    clusters: int | str | None = None,
    algorithm: str | None = None,
    seed: int = 0,
    k_sweep: Sequence[int | str] = (),
    tune: bool = False,
    voting: core_voting.VoteParams | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    full_decode: bool = False,
    search: Mapping[str, SearchBuilder] | None = None,
) -> dict[str, Any]:
    """Build a throwaway library and score every method (``METHODS``) on the queries.

    Queries come from ``queries_manifest``; or, with ``holdout``, from a seeded split of the
    library's posts; or, with ``folds``, every post is a query once (F-fold by post, the scores
    are means over folds with their standard deviations under ``"sd"``). ``seed`` drives the
    split and the clustering. ``clusters``, ``algorithm`` and the clustering parameters default
    to ``IMAGETAGS['CLUSTERING']``; ``voting`` (the ``vote`` and ``ivf`` methods) to
    ``IMAGETAGS['VOTING']``. ``k_sweep`` also scores the K-dependent methods for each K listed.
    ``tune`` (with ``folds``) adds the nested cross-validation of the methods' parameters.
    ``full_decode`` decodes JPEGs in full instead of at the model's scale (what every serving
    path does, ``FeatureExtractor.open_image``): it measures what that decoding changes.
    ``search``: vector-search backends by alias (``backends.search_builders``), each measured
    against exact k-NN on every split (``methods.evaluate_backends``; the report's ``"search"``).

    Returns the report ``evaluate_suggestions --json`` prints. Raises :class:`EvaluationError`
    before any extraction when the request cannot give a result.
    """
    started = time.perf_counter()
    _check_request(queries_manifest, holdout, folds, tune, k)
    defaults = imagetags_settings.CLUSTERING
    clusters = defaults["K"] if clusters is None else clusters
    algorithm = algorithm or defaults["ALGORITHM"]
    if algorithm not in kmeans.ALGORITHMS:
        raise EvaluationError(
            f"Unknown algorithm {algorithm!r}: choose {' or '.join(kmeans.ALGORITHMS)}."
        )
    try:
        voting = voting or core_voting.VoteParams.from_setting(imagetags_settings.VOTING)
    except ValueError as exc:
        raise EvaluationError(f"IMAGETAGS['VOTING'] is not usable: {exc}") from None
    batch_size = batch_size or imagetags_settings.BATCH_SIZE

    def wanted_of(n_library: int) -> list[int]:
        return [resolve_clusters(value, n_library) for value in [clusters, *k_sweep]]

    plan = _plan(library_manifest, queries_manifest, holdout, folds, seed)
    check_sizes(plan.check_library, plan.check_queries, wanted_of(len(plan.check_library)))

    extract_started = time.perf_counter()
    embedded, cache_hits = _embed(
        plan,
        extractor,
        cache_dir,
        batch_size=batch_size,
        progress=progress,
        full_decode=full_decode,
    )
    extract_seconds = time.perf_counter() - extract_started

    if folds is not None:
        splits = fold_splits(embedded[0], folds, seed)
    else:
        splits = [(embedded[0], embedded[1])]
    for library, queries in splits:  # again: undecodable files may have been dropped
        check_sizes(library, queries, wanted_of(len(library)))

    cluster_params = {
        "algorithm": algorithm,
        "seed": seed,
        "batch_size": defaults["BATCH_SIZE"],
        "max_iter": defaults["MAX_ITER"],
        "tol": defaults["TOL"],
    }
    results = [
        evaluate_split(
            library,
            queries.tagged(),
            k=k,
            n_clusters=wanted_of(len(library)),
            cluster_params=cluster_params,
            voting=voting,
            search=search,
        )
        for library, queries in splits
    ]
    report = _report(
        splits,
        results,
        plan,
        folds=folds,
        k=k,
        clusters_requested=wanted_of(len(splits[0][0]))[0],
        extractor_key=extractor.key,
        algorithm=algorithm,
        seed=seed,
        voting=voting,
        cache_hits=cache_hits,
    )
    if search:
        report["search"] = _search_report(results, folds)
    if k_sweep:
        report["k_sweep"] = _sweep_report(results, len(k_sweep), folds)
    if tune:
        report["tune"] = run_tuning(
            splits, k=k, n_clusters=clusters, cluster_params=cluster_params, seed=seed
        )
    report["seconds"] = {
        "extract": round(extract_seconds, 3),
        "cluster": round(sum(result.cluster_seconds for result in results), 3),
        "total": round(time.perf_counter() - started, 3),
    }
    return report


def _check_request(
    queries_manifest: str | os.PathLike | None,
    holdout: float | None,
    folds: int | None,
    tune: bool,
    k: int,
) -> None:
    """Refuse, before anything is read, a request that cannot give a result."""
    sources = [value is not None for value in (queries_manifest, holdout, folds)]
    if sum(sources) != 1:
        raise EvaluationError(
            "Give exactly one source of queries: --queries Q.jsonl (a separate manifest), "
            "--holdout F (hold out that share of the library's posts, e.g. --holdout 0.3) or "
            "--folds N (every post a query once, e.g. --folds 5)."
        )
    if holdout is not None and not 0 < holdout < 1:
        raise EvaluationError(
            f"--holdout must be between 0 and 1 (exclusive), not {holdout}; e.g. --holdout 0.3."
        )
    if tune and folds is None:
        raise EvaluationError("--tune needs --folds (e.g. --folds 5): it is cross-validation.")
    if k < 1:
        raise EvaluationError(f"--k must be at least 1, not {k}.")


@dataclass
class _Plan:
    """What to embed, how the queries are chosen, and the sets whose sizes are checked before
    any extraction (the smallest fold's library stands in for every fold)."""

    to_embed: list[tuple[ImageSet, str | os.PathLike]]
    split: dict[str, Any]
    check_library: ImageSet
    check_queries: ImageSet
    rejected: list[str] = field(default_factory=list)
    duplicates: int = 0


def _plan(
    library_manifest: str | os.PathLike,
    queries_manifest: str | os.PathLike | None,
    holdout: float | None,
    folds: int | None,
    seed: int,
) -> _Plan:
    read = read_image_set(library_manifest)
    rejected = labelled(library_manifest, read.rejected)
    if folds is not None:
        assignment = folds_by_post(read.images.posts, folds, seed)
        smallest = min(int((assignment != f).sum()) for f in range(folds))
        return _Plan(
            to_embed=[(read.images, library_manifest)],
            split={"folds": folds, "seed": seed},
            check_library=read.images.take(np.flatnonzero(assignment != 0)[:smallest]),
            check_queries=read.images,
            rejected=rejected,
            duplicates=read.duplicates,
        )
    if holdout is not None:
        library_idx, query_idx = split_by_post(read.images.posts, holdout, seed)
        library, queries = read.images.take(library_idx), read.images.take(query_idx)
        return _Plan(
            to_embed=[(library, library_manifest), (queries, library_manifest)],
            split={"holdout": holdout, "seed": seed},
            check_library=library,
            check_queries=queries,
            rejected=rejected,
            duplicates=read.duplicates,
        )
    assert queries_manifest is not None
    library = read.images
    # A query that is also in the library would find its own vector: drop it like a duplicate.
    query_read = read_image_set(queries_manifest, exclude_sha256=set(library.sha256))
    return _Plan(
        to_embed=[(library, library_manifest), (query_read.images, queries_manifest)],
        split={"queries": str(queries_manifest)},
        check_library=library,
        check_queries=query_read.images,
        rejected=rejected + labelled(queries_manifest, query_read.rejected),
        duplicates=read.duplicates + query_read.duplicates,
    )


def _embed(
    plan: _Plan,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike | None,
    *,
    batch_size: int,
    progress: Progress | None,
    full_decode: bool,
) -> tuple[list[ImageSet], int]:
    """Every set of the plan embedded (files that fail to decode are added to
    ``plan.rejected``), and how many vectors came from the cache."""
    # The decoding is part of what made a vector: the two kinds never share a cache file.
    decoding = "full-decode" if full_decode else "model-scale-decode"
    cache = VectorCache(cache_dir, f"{extractor.key}|{decoding}") if cache_dir else None
    if cache is not None:
        cache.load()
    cache_hits = 0
    embedded: list[ImageSet] = []
    # One progress count over every set: images still to embed (cached ones are not).
    todo = [
        sum(1 for sha256 in image_set.sha256 if cache is None or sha256 not in cache.vectors)
        for image_set, _source in plan.to_embed
    ]
    offset = 0
    for (image_set, source), count in zip(plan.to_embed, todo, strict=True):

        def report_progress(done: int, _total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, sum(todo))

        result = embed_image_set(
            image_set,
            extractor,
            cache=cache,
            batch_size=batch_size,
            progress=report_progress,
            full_decode=full_decode,
        )
        embedded.append(result.images)
        plan.rejected += labelled(source, result.rejected)
        offset += count
        cache_hits += result.cache_hits
    if cache is not None:
        cache.save()
    return embedded, cache_hits


def _report(
    splits: Sequence[tuple[ImageSet, ImageSet]],
    results: Sequence[SplitResult],
    plan: _Plan,
    *,
    folds: int | None,
    k: int,
    clusters_requested: int,
    extractor_key: str,
    algorithm: str,
    seed: int,
    voting: core_voting.VoteParams,
    cache_hits: int,
) -> dict[str, Any]:
    """The report ``evaluate_suggestions --json`` prints (DESIGN.md), without the sweep, the
    tuning and the timings."""
    libraries = [library for library, _queries in splits]
    scored = [queries.tagged() for _library, queries in splits]
    if folds is None:
        methods = {name: scores.as_dict() for name, scores in results[0].methods.items()}
    else:
        # In the order method_rankers gives them (the table's order).
        methods = {
            name: summarise([result.methods[name] for result in results])
            for name in results[0].methods
        }
    report: dict[str, Any] = {
        "k": k,
        "library": round(float(np.mean([len(library) for library in libraries]))),
        "queries": sum(len(queries) for queries in scored),
        "default": suggest_method(),
        "methods": methods,
        "unscored_queries": sum(len(q) for _l, q in splits) - sum(len(q) for q in scored),
        "library_posts": round(float(np.mean([len(library.post_tags) for library in libraries]))),
        "query_posts": sum(len(queries.post_tags) for queries in scored),
        "split": plan.split,
        "extractor": extractor_key,
        "clusters": results[0].clusters,
        "clusters_requested": clusters_requested,
        "algorithm": algorithm,
        "seed": seed,
        "voting": asdict(voting),
        "knn": asdict(KNN),
        "rejected": plan.rejected,
        "duplicates_dropped": plan.duplicates,
        "vectors_from_cache": cache_hits,
    }
    if folds is not None:
        report["per_fold"] = [
            {
                "library": len(library),
                "queries": len(queries),
                "clusters": result.clusters,
                "methods": {name: scores.as_dict() for name, scores in result.methods.items()},
            }
            for library, queries, result in zip(libraries, scored, results, strict=True)
        ]
        if results[0].backends:
            for fold, result in zip(report["per_fold"], results, strict=True):
                fold["search"] = {
                    alias: {**backend.scores.as_dict(), **_agreement([backend])}
                    for alias, backend in result.backends.items()
                }
    return report


def _agreement(per_split: Sequence[BackendResult]) -> dict[str, float]:
    """How a backend compares with exact k-NN, over the queries of all these splits (each query
    counts once, however the folds are sized)."""
    return {
        f"recall_at_{RECALL_DEPTH}": float(np.concatenate([b.recall for b in per_split]).mean()),
        "same_top_k_set": float(np.concatenate([b.same_set for b in per_split]).mean()),
        "same_top_k_order": float(np.concatenate([b.same_order for b in per_split]).mean()),
    }


def _search_report(results: Sequence[SplitResult], folds: int | None) -> dict[str, Any]:
    """Per ``--search`` backend: the scores of ``ivf``'s voting over its neighbours (as for the
    methods: means over folds, with ``"sd"``), and its agreement with exact k-NN."""
    backends: dict[str, Any] = {}
    for alias in results[0].backends:
        per_split = [result.backends[alias] for result in results]
        scores = (
            per_split[0].scores.as_dict()
            if folds is None
            else summarise([backend.scores for backend in per_split])
        )
        backends[alias] = {
            **scores,
            **_agreement(per_split),
            "build_seconds": round(sum(backend.build_seconds for backend in per_split), 3),
        }
    return {
        "reference": REFERENCE,
        "recall_depth": RECALL_DEPTH,
        # What the target "top-5 tags identical to exact" is read on.
        "target_agreement": "same_top_k_set",
        "backends": backends,
    }


def _sweep_report(
    results: Sequence[SplitResult], rows: int, folds: int | None
) -> list[dict[str, Any]]:
    """Per K of ``--k-sweep``: the K-dependent methods' scores (means over folds)."""
    out = []
    for row in range(rows):
        per_split = [result.sweep[row] for result in results]
        entry: dict[str, Any] = {
            "clusters_requested": per_split[0]["clusters_requested"],
            "clusters": round(float(np.mean([r["clusters"] for r in per_split]))),
        }
        for name in K_DEPENDENT:
            entry[name] = (
                per_split[0][name].as_dict()
                if folds is None
                else summarise([r[name] for r in per_split])
            )
        # The cluster method's figures also at the top level, as before the other methods.
        entry.update(
            {
                key: entry["cluster"][key]
                for key in MethodScores.__dataclass_fields__
                if key != "correct_tags"
            }
        )
        out.append(entry)
    return out
