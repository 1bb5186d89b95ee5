"""Acceptance of shown suggestions: the recommender's real-world precision.

Every suggestion shown to a person is one :class:`~imagetags.models.SuggestionFeedback` row,
``accepted`` or not (``services.posts.record_feedback`` writes them). The share accepted, per tag
and overall, is what the admin shows and what ``evaluate_suggestions --from-feedback`` reports::

    from imagetags.services.feedback import acceptance_stats

    stats = acceptance_stats(channel="widget")
    stats.overall.rate          # 0.41, or None when nothing was shown
    stats.per_tag["salmon"]     # Acceptance(accepted=9, shown=20)
    stats.as_dict()             # JSON-ready

Everything is counted in the database (a few ``GROUP BY`` queries), so it scales with the number
of tags, not of feedback rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, F, FloatField, IntegerField, Q, QuerySet, Subquery
from django.db.models.expressions import Case, OuterRef, When
from django.db.models.functions import Cast, Coalesce

from imagetags.models import ClusterSet, SuggestionFeedback, Tag


@dataclass(frozen=True)
class Acceptance:
    """How many shown suggestions were accepted."""

    accepted: int
    shown: int

    @property
    def rate(self) -> float | None:
        """accepted / shown, or ``None`` when nothing was shown (0 % would be a false claim)."""
        return self.accepted / self.shown if self.shown else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.rate
        return {
            "accepted": self.accepted,
            "shown": self.shown,
            "rate": None if rate is None else round(rate, 4),
        }


@dataclass(frozen=True)
class AcceptanceStats:
    """Acceptance overall, per tag name and per channel.

    ``per_tag`` is ordered by how often the tag was shown (most first), then by name, so its head
    is where the figures mean most.
    """

    overall: Acceptance
    per_tag: dict[str, Acceptance]
    per_channel: dict[str, Acceptance]

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "per_tag": {name: item.as_dict() for name, item in self.per_tag.items()},
            "per_channel": {name: item.as_dict() for name, item in self.per_channel.items()},
        }


def acceptance_stats(
    feedback: QuerySet[SuggestionFeedback] | None = None,
    *,
    channel: str | None = None,
    method: str | None = None,
    cluster_set: ClusterSet | int | None = None,
    since: datetime | None = None,
) -> AcceptanceStats:
    """Acceptance of the suggestions in ``feedback`` (default: all), narrowed by the filters.

    ``channel`` (``widget``/``form``/``api``), ``method`` (the ranking method that made the
    suggestion), ``cluster_set`` (the ClusterSet, or its id, that answered) and ``since`` (shown
    at or after) combine with AND. The admin passes its filtered change-list queryset.
    """
    rows = SuggestionFeedback.objects.all() if feedback is None else feedback
    if channel is not None:
        rows = rows.filter(channel=channel)
    if method is not None:
        rows = rows.filter(method=method)
    if cluster_set is not None:
        rows = rows.filter(cluster_set=cluster_set)
    if since is not None:
        rows = rows.filter(created__gte=since)
    # order_by() drops the model's default ordering, which would otherwise split the groups.
    rows = rows.order_by()
    counts = {"shown": Count("pk"), "accepted_count": Count("pk", filter=Q(accepted=True))}
    overall = rows.aggregate(**counts)
    per_tag = (
        rows.values(name=F("tag__name"))
        .annotate(**counts)
        .order_by("-shown", "name")
        .values_list("name", "accepted_count", "shown")
    )
    per_channel = (
        rows.values("channel")
        .annotate(**counts)
        .order_by("channel")
        .values_list("channel", "accepted_count", "shown")
    )
    return AcceptanceStats(
        overall=Acceptance(overall["accepted_count"], overall["shown"]),
        per_tag={name: Acceptance(accepted, shown) for name, accepted, shown in per_tag},
        per_channel={name: Acceptance(accepted, shown) for name, accepted, shown in per_channel},
    )


def count_subquery(rows: QuerySet, outer_field: str, **conditions: Any) -> Coalesce:
    """``COUNT(*)`` of ``rows`` pointing at the outer row through ``outer_field``, as an expression.

    A correlated subquery instead of ``Count()`` over a join: several counts over different
    relations of one row (posts, feedback) would otherwise multiply each other.
    """
    counted = (
        rows.filter(**{outer_field: OuterRef("pk")}, **conditions)
        .order_by()
        .values(outer_field)
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def annotate_acceptance(tags: QuerySet[Tag]) -> QuerySet[Tag]:
    """Add ``feedback_shown``, ``feedback_accepted`` and ``acceptance_rate`` (``None`` when never
    shown) to each tag, so a change list can show and sort by them without a query per row."""
    return tags.annotate(
        feedback_shown=count_subquery(SuggestionFeedback.objects.all(), "tag"),
        feedback_accepted=count_subquery(SuggestionFeedback.objects.all(), "tag", accepted=True),
    ).annotate(
        acceptance_rate=Case(
            When(feedback_shown=0, then=None),
            default=Cast("feedback_accepted", FloatField()) / Cast("feedback_shown", FloatField()),
            output_field=FloatField(),
        )
    )


def feedback_report(*, top: int | None = None) -> dict[str, Any]:
    """Acceptance of the suggestions people were shown (``SuggestionFeedback``): overall, per
    channel, per method that made them, and per tag (most shown first; ``top`` limits the tags).

    The counting is ``services.feedback.acceptance_stats``, the same figures the admin shows.
    """
    stats = acceptance_stats()
    data = stats.as_dict()
    if top is not None:
        data["per_tag"] = dict(list(data["per_tag"].items())[:top])
    methods = SuggestionFeedback.objects.order_by().values_list("method", flat=True).distinct()
    data["per_method"] = {
        (method or "(unrecorded)"): acceptance_stats(method=method).overall.as_dict()
        for method in sorted(methods)
    }
    data["tags"] = len(stats.per_tag)
    return data
