from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/imagetags/", include("imagetags.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/schema/ui/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("imagetags/", include("imagetags.urls")),
    path("", include("demo_site.gallery.urls")),
] + static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT)
