"""What the imagetags admin pages share: thumbnails, percentages, small HTML pieces."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.utils.html import format_html, format_html_join

from imagetags.models import Cluster, StockImage


def thumbnail(image: StockImage, size: int = 64, title: str = "") -> str:
    if not image.image:
        return "—"
    return format_html(
        '<img src="{}" alt="{}" title="{}" loading="lazy" width="{}" height="{}" '
        'class="imagetags-thumb">',
        image.image.url,
        str(image),
        title or str(image),
        size,
        size,
    )


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "—"


def acceptance_html(accepted: int, shown: int) -> str:
    if not shown:
        return "—"
    return format_html(
        '{} <span class="imagetags-muted">({} of {})</span>',
        percent(accepted, shown),
        accepted,
        shown,
    )


def top_tags_html(cluster: Cluster, limit: int = 6) -> str:
    rows = cluster.tag_frequencies.select_related("tag").order_by("-post_count", "tag__name")[
        :limit
    ]
    return format_html_join(", ", "{} ({})", ((f.tag.name, f.post_count) for f in rows)) or "—"


def changelist_of(response: HttpResponse) -> Any:
    """The ChangeList a change-list response will render; None for a redirect or an error page.

    Its rows and filtered queryset are final here, and the response is rendered only later, so
    what is added to them still shows.
    """
    return (getattr(response, "context_data", None) or {}).get("cl")
