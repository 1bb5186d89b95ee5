"""The SuggestionFeedback admin: what was shown, what was accepted, and a summary."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from imagetags.admin.common import changelist_of
from imagetags.models import SuggestionFeedback
from imagetags.services.feedback import acceptance_stats


@admin.register(SuggestionFeedback)
class SuggestionFeedbackAdmin(admin.ModelAdmin):
    list_display = [
        "tag",
        "accepted",
        "channel",
        "rank",
        "score",
        "method",
        "cluster_set",
        "created",
    ]
    list_filter = ["channel", "accepted", "method", "cluster_set"]
    list_select_related = ["tag", "cluster_set"]
    search_fields = ["tag__name"]
    date_hierarchy = "created"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # written by the upload flow, as people accept or ignore suggestions

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        changelist = changelist_of(response)
        if changelist is not None:
            # The summary follows the list's filters: "accepted via the API last week".
            stats = acceptance_stats(changelist.queryset)
            response.context_data["acceptance"] = stats
            response.context_data["acceptance_tags"] = list(stats.per_tag.items())[:15]
        return response
