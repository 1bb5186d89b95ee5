"""URLs of the REST API; include them under a prefix, e.g. ``path("api/imagetags/", ...)``.

The OpenAPI schema and its UI belong to the site (one schema for all of its APIs); see the
README for the two lines that serve them.
"""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

app_name = "imagetags_api"

# SimpleRouter, not DefaultRouter: its browsable root view would bypass the permission settings.
router = SimpleRouter()
router.register("tags", views.TagViewSet, basename="tag")
router.register("posts", views.PostViewSet, basename="post")
router.register("clusters", views.ClusterViewSet, basename="cluster")

# <str:pk>: any segment reaches the view, which answers a JSON 404 for one that is not an id.
urlpatterns = [
    path("suggestions/", views.SuggestionView.as_view(), name="suggestions"),
    path(
        "images/<str:pk>/suggestions/",
        views.ImageSuggestionView.as_view(),
        name="image-suggestions",
    ),
    *router.urls,
]
