"""The tuning protocol: parameters chosen by cross-validation inside a library only (nested in
the outer folds by ``run_tuning``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from imagetags.core import voting as core_voting
from imagetags.core.metrics import MethodScores, score_rankings, summarise
from imagetags.services.evaluation.data import (
    EvaluationError,
    ImageSet,
    fold_splits,
    resolve_clusters,
)
from imagetags.services.evaluation.methods import (
    KNN,
    LibraryModel,
    Search,
    fit_cluster_model,
    method_rankers,
    score_method,
    truths,
)

# Grids searched by --tune. The rule (docs/quality.md): on the library side of each outer fold,
# 5-fold cross-validation by post; among the settings whose mean P@5 and mean P@1 are within one
# standard error of the best, take the one with the most distinct correct tags (the first in the
# grid on a tie). Probes: the fewest whose mean P@5 is within PROBE_TOLERANCE of exact voting.
KNN_GRID = [5, 10, 15, 20, 30, 50]


VOTE_GRID = [
    core_voting.VoteParams(neighbours=n, temperature=t, vote_by=by, prior_weight=w, probes=None)
    for n in (10, 20, 30, 50)
    for t in (None, 0.1, 0.05, 0.02)
    for by in ("post", "owner")
    for w in (0.0, 0.1, 0.2, 0.3)
]


PROBES_GRID = [1, 2, 3, 4, 6, 8, 12]


PROBE_TOLERANCE = 0.005


INNER_FOLDS = 5


def choose_one_se(candidates: Sequence[Any], per_fold: Sequence[Sequence[MethodScores]]) -> int:
    """Index of the candidate the one-standard-error rule picks (see the grids above)."""

    def stats(metric: str) -> tuple[np.ndarray, np.ndarray]:
        values = np.array([[getattr(s, metric) for s in folds] for folds in per_fold], float)
        se = values.std(axis=1, ddof=1) / np.sqrt(values.shape[1])
        return values.mean(axis=1), se

    p5, p5_se = stats("p_at_k")
    p1, p1_se = stats("p_at_1")
    distinct, _se = stats("distinct_correct")
    best5, best1 = int(p5.argmax()), int(p1.argmax())
    eligible = (p5 >= p5[best5] - p5_se[best5] - 1e-12) & (p1 >= p1[best1] - p1_se[best1] - 1e-12)
    ranked = sorted(np.flatnonzero(eligible), key=lambda i: (-distinct[i], i))
    return int(ranked[0])


def _cached_search(search: Search, cap: int) -> Search:
    """``search`` run once for ``cap`` candidates; smaller requests are slices of that."""
    ids, sims = search(cap)

    def cached(n: int) -> tuple[np.ndarray, np.ndarray]:
        return (ids[:n], sims[:n]) if n <= cap else search(n)

    return cached


def _score_votes(
    model: LibraryModel,
    test: ImageSet,
    params: core_voting.VoteParams,
    k: int,
    searches: Sequence[Search] | None = None,
) -> MethodScores:
    ranks = [
        model.vote(vector, params, max(k, 3), searches[q] if searches else None)
        for q, vector in enumerate(test.vectors)
    ]
    return score_rankings(ranks, truths(test), k)


def tune_parameters(
    library: ImageSet,
    *,
    k: int,
    n_clusters: int | str,
    cluster_params: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Choose the methods' parameters by cross-validation inside ``library`` only (never looking
    at the outer queries): returns the chosen ``knn`` neighbours, ``vote`` parameters and
    ``probes``, with the inner means behind each choice."""
    # Inner folds whose queries have no tags cannot be scored (tiny libraries): leave them out.
    inner = [
        (train, test)
        for train, test in fold_splits(library, min(INNER_FOLDS, len(set(library.posts))), seed)
        if len(test.tagged())
    ]
    if len(inner) < 2:
        raise EvaluationError(
            f"A library of {len(library)} images is too small to tune in: --tune needs at "
            "least two inner folds with tagged images. Give a larger library or leave out --tune."
        )
    knn_scores: list[list[MethodScores]] = [[] for _ in KNN_GRID]
    vote_scores: list[list[MethodScores]] = [[] for _ in VOTE_GRID]
    models = []
    cap = 4 * max(max(KNN_GRID), max(p.neighbours for p in VOTE_GRID))
    for train, test in inner:
        test = test.tagged()
        wanted = resolve_clusters(n_clusters, len(train))
        model = LibraryModel.build(train, fit_cluster_model(train, wanted, **cluster_params))
        models.append((model, test))
        # One exact search per query serves every grid point (smaller requests are slices).
        searches = [
            _cached_search(model.search(vector, None), min(cap, len(train)))
            for vector in test.vectors
        ]
        for n, scores in zip(KNN_GRID, knn_scores, strict=True):
            scores.append(_score_votes(model, test, replace(KNN, neighbours=n), k, searches))
        for params, scores in zip(VOTE_GRID, vote_scores, strict=True):
            scores.append(_score_votes(model, test, params, k, searches))
    knn_n = KNN_GRID[choose_one_se(KNN_GRID, knn_scores)]
    vote_index = choose_one_se(VOTE_GRID, vote_scores)
    vote = VOTE_GRID[vote_index]
    exact_p5 = float(np.mean([s.p_at_k for s in vote_scores[vote_index]]))
    probes_p5: dict[int, float] = {}
    probes = PROBES_GRID[-1]
    for m in PROBES_GRID:
        params = replace(vote, probes=m)
        values = []
        for model, test in models:
            values.append(_score_votes(model, test, params, k).p_at_k)
        probes_p5[m] = float(np.mean(values))
        if probes_p5[m] >= exact_p5 - PROBE_TOLERANCE:
            probes = m
            break

    def means(scores: Sequence[MethodScores]) -> dict[str, float]:
        return {
            "p_at_k": float(np.mean([s.p_at_k for s in scores])),
            "p_at_1": float(np.mean([s.p_at_1 for s in scores])),
            "distinct_correct": float(np.mean([s.distinct_correct for s in scores])),
        }

    return {
        "knn": {"neighbours": knn_n, "inner": means(knn_scores[KNN_GRID.index(knn_n)])},
        "vote": {**asdict(vote), "inner": means(vote_scores[vote_index])},
        "probes": {"probes": probes, "inner_p_at_k": probes_p5, "exact_p_at_k": exact_p5},
    }


def run_tuning(
    splits: Sequence[tuple[ImageSet, ImageSet]],
    *,
    k: int,
    n_clusters: int | str,
    cluster_params: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Nested cross-validation: parameters chosen inside each outer fold's library, then scored
    on that fold's queries. The outer means are an honest estimate of the tuned methods."""
    folds_out = []
    outer: dict[str, list[MethodScores]] = {}
    for number, (library, queries) in enumerate(splits):
        chosen = tune_parameters(
            library, k=k, n_clusters=n_clusters, cluster_params=cluster_params, seed=seed
        )
        vote = core_voting.VoteParams(
            **{key: chosen["vote"][key] for key in core_voting.VoteParams.__dataclass_fields__}
        )
        model = LibraryModel.build(
            library,
            fit_cluster_model(
                library, resolve_clusters(n_clusters, len(library)), **cluster_params
            ),
        )
        rankers = method_rankers(
            model,
            replace(vote, probes=chosen["probes"]["probes"]),
            knn=replace(KNN, neighbours=chosen["knn"]["neighbours"]),
        )
        scored = queries.tagged()
        fold_scores = {name: score_method(rank, scored, k) for name, rank in rankers.items()}
        for name, scores in fold_scores.items():
            outer.setdefault(name, []).append(scores)
        folds_out.append(
            {
                "fold": number,
                "chosen": chosen,
                "outer": {name: scores.as_dict() for name, scores in fold_scores.items()},
            }
        )
    return {
        "rule": "inner 5-fold CV by post on each outer library; within one standard error of "
        "the best mean P@5 and P@1, the most distinct correct tags; probes: fewest within "
        f"{PROBE_TOLERANCE} P@5 of exact voting",
        "folds": folds_out,
        "outer": {name: summarise(scores) for name, scores in outer.items()},
    }
