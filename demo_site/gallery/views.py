"""The demo's pages: a gallery of posts with their tags, and the upload page with the widget.

Thin: the upload page is the app's own ``PostUploadView`` with the demo's template; everything
here only gathers what the pages show about the demo's state (extractor, clusters, features).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Count, Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse, reverse_lazy

from imagetags.forms import PostUploadForm
from imagetags.models import ClusterSet, FeatureStatus, Post, StockImage, TagSource
from imagetags.services.extractors import get_extractor
from imagetags.views import PostUploadView


def _url_or_none(name: str) -> str | None:
    # The API is optional (the `api` extra); the pages link to it only when it is installed.
    try:
        return reverse(name)
    except NoReverseMatch:
        return None


def demo_context() -> dict[str, Any]:
    """What every demo page says about the demo itself: the extractor (and whether its
    suggestions mean anything), the active clustering, and where the admin and API are."""
    key = get_extractor().key
    return {
        "extractor_key": key,
        # vgg16 keys name their weights ("random-seed0"); random weights make noise, not tags.
        "random_weights": "random" in key,
        "extractor_note": getattr(settings, "DEMO_EXTRACTOR_NOTE", ""),
        "active_set": ClusterSet.objects.active(),
        "api_docs_url": _url_or_none("api-docs"),
        "tag_sources": TagSource.choices,
    }


def home(request: HttpRequest) -> HttpResponse:
    posts = (
        Post.objects.prefetch_related(
            Prefetch("images", queryset=StockImage.objects.order_by("pk")),
            "post_tags__tag",
        )
        .annotate(n_images=Count("images"))
        .order_by("-created", "-pk")[:48]
    )
    status_counts = dict(
        StockImage.objects.values_list("feature_status").annotate(n=Count("pk")).order_by()
    )
    return render(
        request,
        "gallery/home.html",
        {
            **demo_context(),
            "posts": posts,
            "n_posts": Post.objects.count(),
            "status_counts": status_counts,
            "pending": status_counts.get(FeatureStatus.PENDING, 0),
        },
    )


class UploadView(PostUploadView):
    """The app's upload page in the demo's frame; after saving, back to the gallery."""

    template_name = "gallery/upload.html"
    success_url = reverse_lazy("gallery:home")

    def get_context_data(self, form: PostUploadForm) -> dict[str, Any]:
        return {**super().get_context_data(form), **demo_context()}
