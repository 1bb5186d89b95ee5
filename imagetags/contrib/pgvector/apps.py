from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class PgvectorConfig(AppConfig):
    name = "imagetags.contrib.pgvector"
    # Not "pgvector": that label would clash with an app of the pgvector package's own name.
    label = "imagetags_pgvector"
    verbose_name = _("Image tags: pgvector")
    default_auto_field = "django.db.models.BigAutoField"
