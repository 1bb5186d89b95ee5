"""Admin integration: the library, its feature status, and the cluster sets."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from imagetags.models import (
    Cluster,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    Post,
    PostTag,
    StockImage,
    Tag,
)


def thumbnail(image: StockImage, size: int = 64) -> str:
    if not image.image:
        return "—"
    return format_html(
        '<img src="{}" alt="" style="width:{}px;height:{}px;object-fit:cover;border-radius:4px">',
        image.image.url,
        size,
        size,
    )


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "post_count"]
    search_fields = ["name"]
    readonly_fields = ["slug"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(_posts=Count("post_tags"))

    @admin.display(description=_("posts"), ordering="_posts")
    def post_count(self, obj: Tag) -> int:
        return obj._posts


class PostTagInline(admin.TabularInline):
    model = PostTag
    extra = 0
    autocomplete_fields = ["tag"]
    readonly_fields = ["added_by", "created"]


class StockImageInline(admin.TabularInline):
    model = StockImage
    extra = 0
    fields = ["preview", "image", "feature_status", "extractor_key"]
    readonly_fields = ["preview", "feature_status", "extractor_key"]

    @admin.display(description=_("preview"))
    def preview(self, obj: StockImage) -> str:
        return thumbnail(obj)


@admin.register(Post)
class PostAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "external_owner", "image_count", "tag_list", "created"]
    list_filter = ["post_tags__source", "created"]
    search_fields = ["title", "post_tags__tag__name", "external_owner", "import_key"]
    inlines = [StockImageInline, PostTagInline]
    raw_id_fields = ["owner"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(_images=Count("images", distinct=True))
            .prefetch_related("post_tags__tag")
        )

    @admin.display(description=_("images"), ordering="_images")
    def image_count(self, obj: Post) -> int:
        return obj._images

    @admin.display(description=_("tags"))
    def tag_list(self, obj: Post) -> str:
        return ", ".join(f"{pt.tag.name} ({pt.source})" for pt in obj.post_tags.all())


@admin.register(StockImage)
class StockImageAdmin(admin.ModelAdmin):
    list_display = [
        "preview",
        "__str__",
        "post",
        "feature_status",
        "feature_attempts",
        "extractor_key",
    ]
    list_filter = ["feature_status", "extractor_key"]
    search_fields = ["image", "sha256", "post__title"]
    readonly_fields = [
        "preview",
        "sha256",
        "width",
        "height",
        "feature_status",
        "feature_error",
        "feature_attempts",
        "extractor_key",
        "features_updated",
    ]
    raw_id_fields = ["post"]
    actions = ["compute_features_again"]

    @admin.display(description=_("preview"))
    def preview(self, obj: StockImage) -> str:
        return thumbnail(obj)

    @admin.action(description=_("Compute features again (in the background)"))
    def compute_features_again(self, request: HttpRequest, queryset: QuerySet) -> None:
        from imagetags.signal_handlers import enqueue_feature_extraction

        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(feature_status=FeatureStatus.PENDING, feature_attempts=0, feature_error="")
        for image_id in ids:
            enqueue_feature_extraction(image_id)
        self.message_user(request, f"Queued {len(ids)} images.", messages.SUCCESS)


class ClusterInline(admin.TabularInline):
    model = Cluster
    extra = 0
    fields = ["index", "size", "post_count", "top_tags"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(description=_("top tags"))
    def top_tags(self, obj: Cluster) -> str:
        return top_tags_html(obj)


def top_tags_html(cluster: Cluster, limit: int = 8) -> str:
    rows = cluster.tag_frequencies.select_related("tag").order_by("-post_count", "tag__name")[
        :limit
    ]
    return format_html_join(", ", "{} ({})", ((f.tag.name, f.post_count) for f in rows)) or "—"


@admin.register(ClusterSet)
class ClusterSetAdmin(admin.ModelAdmin):
    list_display = [
        "__str__",
        "status",
        "k",
        "algorithm",
        "n_images",
        "n_posts",
        "inertia",
        "duration_seconds",
        "created",
    ]
    list_filter = ["status", "algorithm"]
    readonly_fields = [f.name for f in ClusterSet._meta.fields]
    inlines = [ClusterInline]
    actions = ["activate_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description=_("Activate (roll back to) the selected cluster set"))
    def activate_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one cluster set.", messages.ERROR)
            return
        cluster_set = queryset.get()
        if cluster_set.status not in (ClusterSetStatus.ACTIVE, ClusterSetStatus.RETIRED):
            self.message_user(request, "Only a retired set can be activated again.", messages.ERROR)
            return
        cluster_set.activate()
        self.message_user(request, f"{cluster_set} is active.", messages.SUCCESS)


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin):
    list_display = ["__str__", "size", "post_count", "top_tags"]
    list_filter = ["cluster_set"]
    readonly_fields = ["cluster_set", "index", "size", "post_count", "top_tags", "members"]
    exclude = ["centroid"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description=_("top tags"))
    def top_tags(self, obj: Cluster) -> str:
        return top_tags_html(obj)

    @admin.display(description=_("members"))
    def members(self, obj: Cluster) -> str:
        images = StockImage.objects.filter(cluster_memberships__cluster=obj).order_by(
            "-cluster_memberships__similarity"
        )[:60]
        return format_html_join(" ", "{}", ((thumbnail(image, 72),) for image in images)) or "—"
