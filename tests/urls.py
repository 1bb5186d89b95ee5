from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.static import serve
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView


def media(request, path):
    # MEDIA_ROOT changes per test (conftest.media_root), so it is read at request time; the
    # browser tests show uploaded images from it.
    return serve(request, path, document_root=settings.MEDIA_ROOT)


urlpatterns = [
    path("media/<path:path>", media),
    path("admin/", admin.site.urls),
    path("imagetags/", include("imagetags.urls")),
    path("api/imagetags/", include("imagetags.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/schema/ui/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
