"""The Tag admin: usage and acceptance columns, and merging tags."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from imagetags.admin.common import acceptance_html
from imagetags.models import Tag
from imagetags.services.feedback import annotate_acceptance
from imagetags.services.vocabulary import TagMergeError, annotate_usage, merge_tags


class MergeTagsForm(forms.Form):
    target = forms.ModelChoiceField(
        queryset=Tag.objects.none(),
        widget=forms.RadioSelect,
        empty_label=None,
        label=_("Keep this tag"),
        help_text=_("The other selected tags are merged into it and then deleted."),
    )

    def __init__(self, *args: Any, tags: QuerySet[Tag], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["target"].queryset = tags


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "used_on", "auto_applied", "acceptance"]
    search_fields = ["name"]
    readonly_fields = ["slug"]
    actions = ["merge_selected_tags"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tag]:
        return annotate_acceptance(annotate_usage(super().get_queryset(request)))

    # Not named "posts": that is Tag's reverse relation, which list_display would pick first.
    @admin.display(description=_("posts"), ordering="post_count")
    def used_on(self, obj: Tag) -> str:
        url = reverse("admin:imagetags_post_changelist") + f"?post_tags__tag__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.post_count)

    @admin.display(description=_("of which auto"), ordering="auto_count")
    def auto_applied(self, obj: Tag) -> int:
        return obj.auto_count

    @admin.display(description=_("suggestions accepted"), ordering="acceptance_rate")
    def acceptance(self, obj: Tag) -> str:
        return acceptance_html(obj.feedback_accepted, obj.feedback_shown)

    @admin.action(description=_("Merge selected tags…"), permissions=["change", "delete"])
    def merge_selected_tags(
        self, request: HttpRequest, queryset: QuerySet[Tag]
    ) -> TemplateResponse | None:
        tags = queryset.order_by("-post_count", "name")
        if tags.count() < 2:
            self.message_user(request, _("Select at least two tags to merge."), messages.WARNING)
            return None
        form = MergeTagsForm(request.POST if "confirm" in request.POST else None, tags=tags)
        if form.is_valid():
            target = form.cleaned_data["target"]
            try:
                result = merge_tags([tag for tag in tags if tag.pk != target.pk], target)
            except TagMergeError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                return None
            self.message_user(request, result.summary(), messages.SUCCESS)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": _("Merge tags"),
            "opts": self.model._meta,
            "tags": tags,
            "form": form,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "select_across": request.POST.get("select_across", "0"),
        }
        return TemplateResponse(request, "admin/imagetags/tag/merge_tags.html", context)
