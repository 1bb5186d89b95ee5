"""The StockImage admin: vectors, clusters, and "suggest tags" for chosen images."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import IntegerField, OuterRef, QuerySet, Subquery, Value
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from imagetags.admin.common import thumbnail
from imagetags.images import InvalidImage
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    StockImage,
)
from imagetags.services.extractors import get_extractor
from imagetags.services.library_map import cluster_labels
from imagetags.services.suggest import SuggestionUnavailable, suggest
from imagetags.signal_handlers import enqueue_feature_extraction

SUGGEST_MAX_IMAGES = 20  # images per "suggest tags" page: each may need the model


def _membership_in(cluster_set: ClusterSet | None) -> QuerySet[ClusterMembership]:
    return ClusterMembership.objects.filter(cluster_set=cluster_set, image=OuterRef("pk"))


class ActiveClusterFilter(admin.SimpleListFilter):
    title = _("cluster (active set)")
    parameter_name = "cluster"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        active = ClusterSet.objects.active()
        if active is None:
            return [("none", _("not clustered"))]
        labels = cluster_labels(active)
        clusters = Cluster.objects.filter(cluster_set=active).order_by("index")
        return [("none", _("not in the active set"))] + [
            (str(c.pk), f"{c.index} · {labels[c.pk].text}") for c in clusters
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "none":
            return queryset.exclude(
                cluster_memberships__cluster_set__status=ClusterSetStatus.ACTIVE
            )
        if value and value.isdigit():
            # Any cluster id works, so a retired set's cluster page can link here too.
            return queryset.filter(cluster_memberships__cluster_id=int(value))
        return queryset


class UsableVectorFilter(admin.SimpleListFilter):
    """Whether the vector is usable with the configured extractor. Staleness is derived (ready
    under another key), never stored, so the status column alone does not say it."""

    title = _("vector for the configured extractor")
    parameter_name = "vector"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("usable", _("usable")), ("stale", _("stale (another extractor)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        key = get_extractor().key
        if self.value() == "usable":
            return queryset.filter(feature_status=FeatureStatus.READY, extractor_key=key)
        if self.value() == "stale":
            return queryset.filter(feature_status=FeatureStatus.READY).exclude(extractor_key=key)
        return queryset


@admin.register(StockImage)
class StockImageAdmin(admin.ModelAdmin):
    list_display = ["preview", "__str__", "post_link", "feature_status", "extractor", "cluster"]
    list_filter = ["feature_status", UsableVectorFilter, ActiveClusterFilter, "extractor_key"]
    list_select_related = ["post"]
    search_fields = ["image", "sha256", "post__title"]
    readonly_fields = [
        "preview",
        "cluster",
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
    actions = ["compute_features_again", "suggest_tags"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[StockImage]:
        active = ClusterSet.objects.active()
        queryset = super().get_queryset(request)
        if active is None:
            none = Value(None, output_field=IntegerField())
            return queryset.annotate(_cluster_id=none, _cluster_index=none)
        membership = _membership_in(active)
        return queryset.annotate(
            _cluster_id=Subquery(membership.values("cluster_id")[:1]),
            _cluster_index=Subquery(membership.values("cluster__index")[:1]),
        )

    @admin.display(description=_("preview"))
    def preview(self, obj: StockImage) -> str:
        return thumbnail(obj)

    @admin.display(description=_("post"), ordering="post")
    def post_link(self, obj: StockImage) -> str:
        url = reverse("admin:imagetags_post_change", args=[obj.post_id])
        return format_html('<a href="{}">{}</a>', url, obj.post)

    @admin.display(description=_("extractor"), ordering="extractor_key")
    def extractor(self, obj: StockImage) -> str:
        # Keys run to 60 characters ("tflite/<hash>/MobilenetV2/Logits/AvgPool/224"): the
        # backbone names it in a list, the whole key is on hover and on the image's page.
        return format_html(
            '<span title="{}">{}</span>', obj.extractor_key, obj.extractor_key.split("/")[0] or "—"
        )

    @admin.display(description=_("cluster (active set)"), ordering="_cluster_index")
    def cluster(self, obj: StockImage) -> str:
        if getattr(obj, "_cluster_id", None) is None:
            return "—"
        url = reverse("admin:imagetags_cluster_change", args=[obj._cluster_id])
        return format_html('<a href="{}">{}</a>', url, obj._cluster_index)

    @admin.action(
        description=_("Compute features again (in the background)"), permissions=["change"]
    )
    def compute_features_again(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(feature_status=FeatureStatus.PENDING, feature_attempts=0, feature_error="")
        for image_id in ids:
            enqueue_feature_extraction(image_id)
        self.message_user(request, f"Queued {len(ids)} images.", messages.SUCCESS)

    @admin.action(description=_("Suggest tags for the selected images"), permissions=["view"])
    def suggest_tags(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse:
        images = list(queryset.select_related("post").order_by("pk")[:SUGGEST_MAX_IMAGES])
        rows = []
        for image in images:
            current = set(image.post.post_tags.values_list("tag__name", flat=True))
            row = {"image": image, "thumbnail": thumbnail(image, 120), "current": sorted(current)}
            try:
                result = suggest(image)
            except (SuggestionUnavailable, InvalidImage, OSError) as exc:
                row["error"] = str(exc)
            else:
                row["result"] = result
                row["cluster_url"] = reverse(
                    "admin:imagetags_cluster_change", args=[result.cluster]
                )
                row["tags"] = [(tag, tag.name in current) for tag in result.tags]
            rows.append(row)
        context = {
            **self.admin_site.each_context(request),
            "title": _("Suggested tags"),
            "opts": self.model._meta,
            "rows": rows,
            "more": max(0, queryset.count() - len(images)),
        }
        return TemplateResponse(request, "admin/imagetags/stockimage/suggest_tags.html", context)
