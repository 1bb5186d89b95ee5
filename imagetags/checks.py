"""System checks: a misconfigured extractor or task queue is reported at start-up, with a hint."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Tags, Warning, register


@register(Tags.compatibility)
def check_extractor(app_configs: Any = None, **kwargs: Any) -> list:
    from django.core.exceptions import ImproperlyConfigured

    from imagetags.conf import imagetags_settings
    from imagetags.services.extractors import load_extractor_class

    errors: list = []
    try:
        config = imagetags_settings.EXTRACTOR
        load_extractor_class(config["CLASS"])
    except (ImproperlyConfigured, KeyError, TypeError) as exc:
        errors.append(
            Error(
                f"The configured feature extractor cannot be used: {exc}",
                hint="Set IMAGETAGS['EXTRACTOR'] = {'CLASS': 'vgg16' | 'tflite' | dotted path, "
                "'OPTIONS': {...}}.",
                id="imagetags.E001",
            )
        )
        return errors
    options = config.get("OPTIONS") or {}
    if config["CLASS"] == "vgg16" and options.get("weights", "imagenet") is None:
        errors.append(
            Warning(
                "The VGG16 extractor uses random weights: suggestions will be meaningless.",
                hint="Random weights are for tests only. Use weights='imagenet' or a weights file.",
                id="imagetags.W001",
            )
        )
    for option in ("model_path", "weights"):
        value = options.get(option)
        if isinstance(value, str) and value not in ("imagenet",) and not _exists(value):
            errors.append(
                Error(
                    f"IMAGETAGS['EXTRACTOR']['OPTIONS']['{option}'] = {value!r} does not exist.",
                    hint="Point it at a readable file on every web and worker machine.",
                    id="imagetags.E002",
                )
            )
    return errors


@register(Tags.compatibility)
def check_task_queue(app_configs: Any = None, **kwargs: Any) -> list:
    from django.apps import apps
    from django.conf import settings

    from imagetags.conf import imagetags_settings

    if not imagetags_settings.AUTO_FEATURES:
        return []
    if not apps.is_installed("django_q"):
        return [
            Error(
                "IMAGETAGS['AUTO_FEATURES'] is on but django_q is not in INSTALLED_APPS.",
                hint="Add 'django_q' to INSTALLED_APPS and configure Q_CLUSTER, or set "
                "AUTO_FEATURES to False and run `manage.py compute_features` yourself.",
                id="imagetags.E003",
            )
        ]
    if not getattr(settings, "Q_CLUSTER", None):
        return [
            Warning(
                "Q_CLUSTER is not configured; django-q2 will fall back to its defaults.",
                hint="Set Q_CLUSTER = {'name': 'imagetags', 'orm': 'default'} for the embedded "
                "ORM broker, or a Redis broker for scale-out.",
                id="imagetags.W002",
            )
        ]
    return []


@register(Tags.compatibility)
def check_sqlite_transactions(app_configs: Any = None, **kwargs: Any) -> list:
    """A SQLite database shared by processes must take its write lock when a transaction begins.

    Under SQLite's default deferred ``BEGIN``, a transaction that reads and then writes (storing
    a batch of vectors, django-q2 saving a result) fails at once with "database is locked" when
    another process holds the write lock: SQLite does not wait to upgrade a read lock (it could
    deadlock), so ``timeout`` does not help. ``BEGIN IMMEDIATE`` takes the lock up front, where
    the timeout applies.
    """
    from django.conf import settings
    from django.db import router

    from imagetags.models import StockImage

    alias = router.db_for_write(StockImage)
    config = settings.DATABASES.get(alias, {})
    if not config.get("ENGINE", "").endswith("sqlite3"):
        return []
    mode = str((config.get("OPTIONS") or {}).get("transaction_mode") or "DEFERRED").upper()
    if mode in ("IMMEDIATE", "EXCLUSIVE"):
        return []
    return [
        Warning(
            f"The SQLite database {alias!r} begins transactions in {mode} mode: a feature task "
            "that stores vectors while another process writes fails with 'database is locked', "
            "whatever the timeout.",
            hint=f"Set DATABASES[{alias!r}]['OPTIONS'] = {{'timeout': 30, 'transaction_mode': "
            "'IMMEDIATE'}: a writer then waits for the lock instead.",
            id="imagetags.W003",
        )
    ]


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
