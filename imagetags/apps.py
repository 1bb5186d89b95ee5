import threading

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ImageTagsConfig(AppConfig):
    name = "imagetags"
    verbose_name = _("Image tags")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from imagetags import checks, signal_handlers  # noqa: F401

        signal_handlers.register_signal_handlers()
        _import_search_modules()
        start_warm_up()


def _import_search_modules() -> None:
    # Code, not data: what a web process imports for its searches, imported while it starts
    # like the rest of its code (WARM_UP, below, is what loads data before the first request).
    from imagetags.services import engines

    engines.import_backend_modules()


def start_warm_up() -> threading.Thread | None:
    """With ``IMAGETAGS["WARM_UP"]``, load the model, the active centres and the voting index in a
    daemon thread while the process starts, so the first suggestion request does not wait for
    them. Off by default: management commands that never embed (migrate, shell) should not pay
    for loading TensorFlow."""
    from imagetags.conf import imagetags_settings

    if not imagetags_settings.WARM_UP:
        return None
    thread = threading.Thread(target=_warm_up_in_thread, name="imagetags-warm-up", daemon=True)
    thread.start()
    return thread


def _warm_up_in_thread() -> None:
    from django.db import connections

    from imagetags.services.suggest import warm_up

    try:
        warm_up()
    finally:
        # The thread ends here; its database connection would otherwise stay open.
        connections.close_all()
