from django.apps import AppConfig


class GalleryConfig(AppConfig):
    name = "demo_site.gallery"
    label = "gallery"
    verbose_name = "Demo gallery"
    default_auto_field = "django.db.models.BigAutoField"
