"""The Post admin: a post's images and tags (with their source) inline."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.db.models import Count, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.utils.html import format_html_join
from django.utils.translation import gettext_lazy as _

from imagetags.admin.common import thumbnail
from imagetags.models import Post, PostTag, StockImage, TagSource
from imagetags.services.tagging import TooManyTags, check_tag_count, remove_auto_tags


class TagSourceFilter(admin.SimpleListFilter):
    title = _("tag source")
    parameter_name = "tag_source"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return list(TagSource.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Post]) -> QuerySet[Post]:
        if self.value() in TagSource.values:
            return queryset.filter(post_tags__source=self.value()).distinct()
        return queryset


class PostTagInlineFormSet(BaseInlineFormSet):
    """A post's tags in the admin: at most ``MAX_TAGS_PER_POST`` (``tagging.check_tag_count``,
    the limit of every other path), counted over the rows that stay after the save."""

    def clean(self) -> None:
        super().clean()
        kept = [
            form
            for form in self.forms
            if getattr(form, "cleaned_data", None)
            and form.cleaned_data.get("tag")
            and not form.cleaned_data.get("DELETE")
        ]
        try:
            check_tag_count(len(kept))
        except TooManyTags as exc:
            raise forms.ValidationError(str(exc), code="too_many_tags") from None


class PostTagInline(admin.TabularInline):
    model = PostTag
    formset = PostTagInlineFormSet
    extra = 0
    autocomplete_fields = ["tag"]
    fields = ["tag", "source", "added_by", "created"]
    readonly_fields = ["added_by", "created"]


class StockImageInline(admin.TabularInline):
    model = StockImage
    extra = 0
    fields = ["preview", "image", "feature_status", "extractor_key"]
    readonly_fields = ["preview", "feature_status", "extractor_key"]
    show_change_link = True

    @admin.display(description=_("preview"))
    def preview(self, obj: StockImage) -> str:
        return thumbnail(obj, 96)


@admin.register(Post)
class PostAdmin(admin.ModelAdmin):
    list_display = ["__str__", "previews", "image_count", "tag_list", "owner", "created"]
    list_filter = [TagSourceFilter, "created"]
    search_fields = ["title", "post_tags__tag__name", "external_owner", "import_key"]
    inlines = [StockImageInline, PostTagInline]
    raw_id_fields = ["owner"]
    actions = ["remove_auto_tags"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Post]:
        return (
            super()
            .get_queryset(request)
            .annotate(_images=Count("images", distinct=True))
            .prefetch_related("post_tags__tag", "images")
        )

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # The Tag list links each tag's post count here.
        return lookup == "post_tags__tag__id__exact" or super().lookup_allowed(
            lookup, value, request
        )

    @admin.display(description=_("images"), ordering="_images")
    def image_count(self, obj: Post) -> int:
        return obj._images

    @admin.display(description=_("preview"))
    def previews(self, obj: Post) -> str:
        return format_html_join(
            "", "{}", ((thumbnail(image, 48),) for image in obj.images.all()[:3])
        )

    @admin.display(description=_("tags (source)"))
    def tag_list(self, obj: Post) -> str:
        return format_html_join(
            " ",
            '<span class="imagetags-chip imagetags-source-{}" title="{}">{}</span>',
            (
                (pt.source, pt.get_source_display(), pt.tag.name)
                for pt in sorted(obj.post_tags.all(), key=lambda pt: pt.tag.name)
            ),
        )

    @admin.action(description=_("Remove auto-applied tags"), permissions=["change"])
    def remove_auto_tags(self, request: HttpRequest, queryset: QuerySet[Post]) -> None:
        removed = sum(remove_auto_tags(post) for post in queryset)
        self.message_user(
            request, f"Removed {removed} auto-applied tags from {queryset.count()} posts."
        )
