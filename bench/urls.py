"""URLs of the benchmark site: the REST API, when its optional dependencies are installed."""

import contextlib

from django.urls import include, path

urlpatterns = []
with contextlib.suppress(ImportError):  # without the `api` extra the API rows are skipped
    urlpatterns.append(path("api/imagetags/", include("imagetags.api.urls")))
