"""The ClusterSet and Cluster admins: rebuilds, the library map, a cluster's page."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from imagetags.admin.common import (
    acceptance_html,
    changelist_of,
    thumbnail,
    top_tags_html,
)
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    SuggestionFeedback,
    TagFrequency,
)
from imagetags.services.errors import ClusteringError
from imagetags.services.feedback import acceptance_stats, count_subquery
from imagetags.services.library_map import (
    LibraryMapUnavailable,
    build_library_map,
    cluster_color,
    cluster_labels,
    nearest_clusters,
)
from imagetags.services.locks import RebuildInProgress
from imagetags.services.rebuild_status import queue_rebuild, rebuild_status

_SESSION_REBUILD = "imagetags_rebuild_task"
MEMBER_GRID_SIZE = 60  # thumbnails on a cluster's page, nearest to the centre first
TOP_TAGS_SHOWN = 15  # tag frequency bars on a cluster's page


def _perm(request: HttpRequest, action: str, model: type) -> bool:
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")


class ClusterInline(admin.TabularInline):
    model = Cluster
    extra = 0
    fields = ["index", "size", "post_count", "top_tags"]
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("top tags"))
    def top_tags(self, obj: Cluster) -> str:
        return top_tags_html(obj)


@admin.register(ClusterSet)
class ClusterSetAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "status_badge",
        "k",
        "algorithm",
        "n_images",
        "n_posts",
        "inertia_display",
        "duration_display",
        "accepted",
        "created",
    ]
    list_filter = ["status", "algorithm"]
    readonly_fields = [f.name for f in ClusterSet._meta.fields]
    inlines = [ClusterInline]
    actions = ["activate_selected"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ClusterSet]:
        feedback = SuggestionFeedback.objects.all()
        return (
            super()
            .get_queryset(request)
            .annotate(
                feedback_shown=count_subquery(feedback, "cluster_set"),
                feedback_accepted=count_subquery(feedback, "cluster_set", accepted=True),
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sets come from rebuilds (the button), never from a form

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nothing on a set is edited by hand: "change" grants activating one (the action), and
        # a set's own page is for looking.
        return obj is None and super().has_change_permission(request)

    def has_rebuild_permission(self, request: HttpRequest) -> bool:
        # Adding a cluster set is what a rebuild does, so the model's "add" permission grants it.
        return _perm(request, "add", ClusterSet)

    def get_urls(self) -> list:
        view = self.admin_site.admin_view
        return [
            path(
                "rebuild/",
                view(require_POST(self.rebuild_view)),
                name="imagetags_clusterset_rebuild",
            ),
            path("map/", view(self.library_map_view), name="imagetags_clusterset_map"),
            *super().get_urls(),
        ]

    @admin.display(description=_("cluster set"), ordering="pk")
    def name(self, obj: ClusterSet) -> str:
        return _("Set %(pk)s") % {"pk": obj.pk}

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: ClusterSet) -> str:
        # A failed set says why on hover; a building one's progress is in the panel above.
        return format_html(
            '<span class="imagetags-status imagetags-status-{}" title="{}">{}</span>',
            obj.status,
            obj.error,
            obj.get_status_display(),
        )

    @admin.display(description=_("inertia"), ordering="inertia")
    def inertia_display(self, obj: ClusterSet) -> str:
        return "—" if obj.inertia is None else f"{obj.inertia:,.1f}"

    @admin.display(description=_("duration"), ordering="duration_seconds")
    def duration_display(self, obj: ClusterSet) -> str:
        return "—" if obj.duration_seconds is None else f"{obj.duration_seconds:,.1f} s"

    @admin.display(description=_("suggestions accepted"))
    def accepted(self, obj: ClusterSet) -> str:
        return acceptance_html(obj.feedback_accepted, obj.feedback_shown)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        stats = acceptance_stats()
        context = {
            **(extra_context or {}),
            **self._rebuild_context(request),
            "has_rebuild_permission": self.has_rebuild_permission(request),
            "acceptance": stats.overall,
            "acceptance_channels": stats.per_channel,
        }
        return super().changelist_view(request, context)

    def _rebuild_context(self, request: HttpRequest) -> dict[str, Any]:
        """The rebuild panel's template variables (the clicker's own queued task is in the
        session, so their page refreshes until django-q2 has its result)."""
        status = rebuild_status(request.session.get(_SESSION_REBUILD))
        return {
            "building": status.building,
            "rebuild_pending": status.pending,
            "last_rebuild_task": status.last_task,
            "refresh_seconds": status.refresh_seconds,
        }

    def rebuild_view(self, request: HttpRequest) -> HttpResponse:
        """Enqueue a rebuild with the site's default settings (POST only)."""
        if not self.has_rebuild_permission(request):
            raise PermissionDenied
        changelist = HttpResponseRedirect(reverse("admin:imagetags_clusterset_changelist"))
        try:
            # One queued or running rebuild at most, whoever clicks and however often.
            queued = queue_rebuild()
        except RebuildInProgress as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return changelist
        except ClusteringError as exc:
            # Only with django-q2's `sync` option (development, tests): the task ran here and
            # its refusal ("no vectors yet") comes back as an exception instead of a result.
            self.message_user(request, str(exc), messages.ERROR)
            return changelist
        request.session[_SESSION_REBUILD] = queued
        self.message_user(
            request,
            _(
                "Rebuild queued. A django-q2 worker (manage.py qcluster) runs it; this page "
                "refreshes until it is done. One rebuild is queued or runs at a time: further "
                "clicks meanwhile queue nothing."
            ),
            messages.SUCCESS,
        )
        return changelist

    def library_map_view(self, request: HttpRequest) -> HttpResponse:
        """The 2-D map of the active set (or of ``?set=<id>``)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        cluster_set = None
        requested = request.GET.get("set", "")
        if requested.isdigit():
            cluster_set = ClusterSet.objects.filter(pk=int(requested)).first()
        context = {
            **self.admin_site.each_context(request),
            "title": _("Library map"),
            "opts": self.model._meta,
        }
        try:
            context["map"] = build_library_map(cluster_set)
        except LibraryMapUnavailable as exc:
            context["unavailable"] = str(exc)
        return TemplateResponse(request, "admin/imagetags/library_map.html", context)

    @admin.action(
        description=_("Activate (roll back to) the selected cluster set"), permissions=["change"]
    )
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


class ClusterSetFilter(admin.SimpleListFilter):
    """By cluster set; without a choice, the active set (the one suggestions use)."""

    title = _("cluster set")
    parameter_name = "set"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        return [("all", _("All sets"))] + [
            (str(cs.pk), str(cs)) for cs in ClusterSet.objects.order_by("-created", "-pk")
        ]

    def choices(self, changelist: Any) -> Any:
        # Like the default, but "no choice" means the active set rather than "all".
        active = ClusterSet.objects.active()
        default = str(active.pk) if active else None
        for lookup, title in self.lookup_choices:
            selected = (self.value() or default) == lookup
            yield {
                "selected": selected,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request: HttpRequest, queryset: QuerySet[Cluster]) -> QuerySet[Cluster]:
        value = self.value()
        if value is None:
            return queryset.filter(cluster_set__status=ClusterSetStatus.ACTIVE)
        if value.isdigit():
            return queryset.filter(cluster_set_id=int(value))
        return queryset


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin):
    list_display = ["title", "cluster_set", "size", "post_count", "top_tags", "strip"]
    list_filter = [ClusterSetFilter]
    list_select_related = ["cluster_set"]
    list_per_page = 50
    readonly_fields = ["cluster_set", "index", "size", "post_count"]
    exclude = ["centroid"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # written by rebuilds only; the page is for looking

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a set with a cluster missing would misplace its images

    def _labels(self, request: HttpRequest, cluster_set: ClusterSet) -> dict:
        # One label computation per set and request, not one per row.
        cache = request.__dict__.setdefault("_imagetags_cluster_labels", {})
        if cluster_set.pk not in cache:
            cache[cluster_set.pk] = cluster_labels(cluster_set)
        return cache[cluster_set.pk]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict | None = None
    ) -> HttpResponse:
        # Row callables get only the object; the labels of the page's sets are worked out here.
        response = super().changelist_view(request, extra_context)
        changelist = changelist_of(response)
        if changelist is not None:
            for cluster in changelist.result_list:
                cluster._label = self._labels(request, cluster.cluster_set).get(cluster.pk)
        return response

    @admin.display(description=_("cluster"), ordering="index")
    def title(self, obj: Cluster) -> str:
        label = getattr(obj, "_label", None)
        return format_html(
            '<span class="imagetags-swatch" style="background:{}"></span>{} · {}',
            cluster_color(obj.index),
            obj.index,
            label.text if label else "",
        )

    @admin.display(description=_("top tags"))
    def top_tags(self, obj: Cluster) -> str:
        return top_tags_html(obj)

    @admin.display(description=_("nearest to the centre"))
    def strip(self, obj: Cluster) -> str:
        members = (
            ClusterMembership.objects.filter(cluster=obj)
            .select_related("image")
            .order_by("-similarity")[:4]
        )
        return format_html(
            '<span style="white-space:nowrap">{}</span>',
            format_html_join("", "{}", ((thumbnail(m.image, 44),) for m in members)),
        )

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict | None = None,
    ) -> HttpResponse:
        cluster = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if cluster is not None:
            context.update(self._overview(request, cluster))
        return super().change_view(request, object_id, form_url, context)

    def _overview(self, request: HttpRequest, cluster: Cluster) -> dict[str, Any]:
        """What the cluster page shows above the fields: tags, members, neighbours."""
        posts = max(cluster.post_count, 1)
        frequencies = [
            {"name": f.tag.name, "posts": f.post_count, "share": f.post_count / posts}
            for f in TagFrequency.objects.filter(cluster=cluster)
            .select_related("tag")
            .order_by("-post_count", "tag__name")[:TOP_TAGS_SHOWN]
        ]
        members = [
            {
                "thumbnail": thumbnail(m.image, 112, f"{m.image} · similarity {m.similarity:.3f}"),
                "url": reverse("admin:imagetags_stockimage_change", args=[m.image_id]),
                "similarity": m.similarity,
            }
            for m in ClusterMembership.objects.filter(cluster=cluster)
            .select_related("image")
            .order_by("-similarity", "image_id")[:MEMBER_GRID_SIZE]
        ]
        labels = self._labels(request, cluster.cluster_set)
        neighbours = [
            {
                "cluster": other,
                "label": labels[other.pk].text,
                "similarity": similarity,
                "color": cluster_color(other.index),
                "url": reverse("admin:imagetags_cluster_change", args=[other.pk]),
            }
            for other, similarity in nearest_clusters(cluster)
        ]
        return {
            "cluster_label": labels[cluster.pk].text,
            "cluster_swatch": cluster_color(cluster.index),
            "frequencies": frequencies,
            "members": members,
            "neighbours": neighbours,
            "images_url": reverse("admin:imagetags_stockimage_changelist")
            + f"?cluster={cluster.pk}",
            "map_url": reverse("admin:imagetags_clusterset_map") + f"?set={cluster.cluster_set_id}",
        }
