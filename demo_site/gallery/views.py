from django.db.models import Count, Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from imagetags.models import ClusterSet, Post, StockImage
from imagetags.services.extractors import get_extractor


def home(request: HttpRequest) -> HttpResponse:
    extractor = get_extractor()
    posts = (
        Post.objects.prefetch_related(
            Prefetch("images", queryset=StockImage.objects.order_by("pk")), "post_tags__tag"
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
            "posts": posts,
            "extractor_key": extractor.key,
            "random_weights": "random" in extractor.key,
            "active_set": ClusterSet.objects.active(),
            "status_counts": status_counts,
        },
    )
