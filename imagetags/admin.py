"""Admin integration: the library, its features and tags, the cluster sets, and a map of it all.

Thin by design: the work (merging tags, the map's projection, acceptance figures) lives in
``imagetags.services``; this module queries, checks permissions and renders.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_POST

from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    Post,
    PostTag,
    StockImage,
    SuggestionFeedback,
    Tag,
    TagFrequency,
    TagSource,
)
from imagetags.services.clustering import ClusteringError
from imagetags.services.feedback import acceptance_stats, annotate_acceptance, count_subquery
from imagetags.services.library_map import (
    LibraryMapUnavailable,
    build_library_map,
    cluster_color,
    cluster_labels,
    nearest_clusters,
)
from imagetags.services.tag_admin import TagMergeError, annotate_usage, merge_tags
from imagetags.services.tagging import TooManyTags, check_tag_count

REBUILD_TASK = "imagetags.tasks.rebuild_clusters"
REBUILD_GROUP = "imagetags-rebuild"
# The change list refreshes itself while a rebuild runs; a building set silent for longer than
# this is presumed dead (its worker was killed) and no longer keeps the page refreshing.
REBUILD_SILENT_AFTER = timedelta(hours=1)
REFRESH_SECONDS = 3
_SESSION_REBUILD = "imagetags_rebuild_task"
MEMBER_GRID_SIZE = 60  # thumbnails on a cluster's page, nearest to the centre first
TOP_TAGS_SHOWN = 15  # tag frequency bars on a cluster's page
SUGGEST_MAX_IMAGES = 20  # images per "suggest tags" page: each may need the model


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


def _changelist_of(response: HttpResponse) -> Any:
    """The ChangeList a change-list response will render; None for a redirect or an error page.

    Its rows and filtered queryset are final here, and the response is rendered only later, so
    what is added to them still shows.
    """
    return (getattr(response, "context_data", None) or {}).get("cl")


def _perm(request: HttpRequest, action: str, model: type) -> bool:
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")


# --- tags ------------------------------------------------------------------------------------


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


# --- posts -----------------------------------------------------------------------------------


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
        from imagetags.services.tagging import remove_auto_tags

        removed = sum(remove_auto_tags(post) for post in queryset)
        self.message_user(
            request, f"Removed {removed} auto-applied tags from {queryset.count()} posts."
        )


# --- images ----------------------------------------------------------------------------------


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
        from imagetags.services.extractors import get_extractor

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
        from imagetags.signal_handlers import enqueue_feature_extraction

        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(feature_status=FeatureStatus.PENDING, feature_attempts=0, feature_error="")
        for image_id in ids:
            enqueue_feature_extraction(image_id)
        self.message_user(request, f"Queued {len(ids)} images.", messages.SUCCESS)

    @admin.action(description=_("Suggest tags for the selected images"), permissions=["view"])
    def suggest_tags(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse:
        from imagetags.services.images import InvalidImage
        from imagetags.services.suggest import SuggestionUnavailable, suggest

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


# --- cluster sets ----------------------------------------------------------------------------


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


def _rebuild_status(request: HttpRequest) -> dict[str, Any]:
    """What the ClusterSet change list says about rebuilds, and whether it should refresh."""
    from django_q.models import Task

    from imagetags.services.locks import queued_rebuild

    now = timezone.now()
    building = []
    for cluster_set in ClusterSet.objects.filter(status=ClusterSetStatus.BUILDING):
        last_sign = cluster_set.heartbeat or cluster_set.created
        building.append((cluster_set, now - last_sign < REBUILD_SILENT_AFTER))
    pending = False
    queued = request.session.get(_SESSION_REBUILD)
    if queued:
        # Still pending while django-q2 has no result for it (queued or running).
        pending = not Task.objects.filter(id=queued["id"]).exists() and (
            now.timestamp() - queued["at"] < REBUILD_SILENT_AFTER.total_seconds()
        )
    # Queued by anyone (the one place a queued rebuild holds): every admin's page refreshes.
    pending = pending or queued_rebuild() is not None
    last_task = Task.objects.filter(group=REBUILD_GROUP).order_by("-stopped").first()
    return {
        "building": building,
        "rebuild_pending": pending,
        "last_rebuild_task": last_task,
        "refresh_seconds": REFRESH_SECONDS
        if pending or any(alive for _set, alive in building)
        else None,
    }


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
            **_rebuild_status(request),
            "has_rebuild_permission": self.has_rebuild_permission(request),
            "acceptance": stats.overall,
            "acceptance_channels": stats.per_channel,
        }
        return super().changelist_view(request, context)

    def rebuild_view(self, request: HttpRequest) -> HttpResponse:
        """Enqueue a rebuild with the site's default settings (POST only)."""
        from django_q.tasks import async_task

        from imagetags.services.locks import (
            RebuildInProgress,
            release_queued_rebuild,
            reserve_queued_rebuild,
        )

        if not self.has_rebuild_permission(request):
            raise PermissionDenied
        changelist = HttpResponseRedirect(reverse("admin:imagetags_clusterset_changelist"))
        try:
            # One queued or running rebuild at most, whoever clicks and however often.
            token = reserve_queued_rebuild()
        except RebuildInProgress as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return changelist
        try:
            task_id = async_task(
                REBUILD_TASK, queued_as=token, task_name="imagetags-rebuild", group=REBUILD_GROUP
            )
        except ClusteringError as exc:
            # Only with django-q2's `sync` option (development, tests): the task ran here and
            # its refusal ("no vectors yet") comes back as an exception instead of a result.
            self.message_user(request, str(exc), messages.ERROR)
            return changelist
        except BaseException:
            release_queued_rebuild(token)  # nothing was queued (the broker is down, say)
            raise
        request.session[_SESSION_REBUILD] = {"id": task_id, "at": timezone.now().timestamp()}
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


# --- clusters --------------------------------------------------------------------------------


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
        changelist = _changelist_of(response)
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


# --- feedback --------------------------------------------------------------------------------


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
        changelist = _changelist_of(response)
        if changelist is not None:
            # The summary follows the list's filters: "accepted via the API last week".
            stats = acceptance_stats(changelist.queryset)
            response.context_data["acceptance"] = stats
            response.context_data["acceptance_tags"] = list(stats.per_tag.items())[:15]
        return response
