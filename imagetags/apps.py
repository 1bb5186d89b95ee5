from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ImageTagsConfig(AppConfig):
    name = "imagetags"
    verbose_name = _("Image tags")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from imagetags import checks, signal_handlers  # noqa: F401

        signal_handlers.register_signal_handlers()
