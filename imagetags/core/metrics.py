"""Scoring ranked tag lists against the true tags of held-out queries (the quality protocol:
P@1, P@3, P@k, R@k and the distinct correct tags), and summarising scores over folds."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class MethodScores:
    p_at_k: float
    r_at_k: float
    distinct_correct: int
    p_at_1: float
    p_at_3: float
    query_ms: float
    # The tags behind distinct_correct (not reported; pooled over folds).
    correct_tags: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["correct_tags"]
        return data


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
        correct_tags=frozenset(distinct),
    )


_METRICS = ("p_at_k", "r_at_k", "distinct_correct", "p_at_1", "p_at_3", "query_ms")


def summarise(per_fold: Sequence[MethodScores]) -> dict[str, Any]:
    """Mean of each metric over folds, its standard deviation under ``"sd"``, and the distinct
    correct tags pooled over all folds' queries under ``"distinct_correct_pooled"``."""
    metrics = _METRICS
    rows = np.array([[getattr(scores, name) for name in metrics] for scores in per_fold], float)
    means = rows.mean(axis=0)
    sd = rows.std(axis=0, ddof=1) if len(per_fold) > 1 else np.zeros(len(metrics))
    out: dict[str, Any] = {name: float(means[i]) for i, name in enumerate(metrics)}
    out["sd"] = {name: float(sd[i]) for i, name in enumerate(metrics)}
    pooled: set[str] = set()
    for scores in per_fold:
        pooled |= scores.correct_tags
    out["distinct_correct_pooled"] = len(pooled)
    return out
