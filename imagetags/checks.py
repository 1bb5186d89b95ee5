"""System checks: a misconfigured extractor, task queue or vector search is reported at start-up,
with a hint."""

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


PGVECTOR_APP = "imagetags.contrib.pgvector"
# What imagetags.search.pgvector imports: it works on a psycopg 3 connection (Django's backend may
# run on psycopg2, which the search cannot use).
PGVECTOR_MODULES = ("psycopg",)


def _search_config() -> tuple[str, dict[str, Any]]:
    """``IMAGETAGS["SEARCH"]``'s backend alias and options (not a dict: the default's)."""
    from imagetags.conf import imagetags_settings

    config = imagetags_settings.SEARCH or {}
    if not isinstance(config, dict):
        return "", {}
    options = config.get("OPTIONS") or {}
    return str(config.get("BACKEND") or "exact"), options if isinstance(options, dict) else {}


@register(Tags.compatibility)
def check_search_backend(app_configs: Any = None, **kwargs: Any) -> list:
    """What ``IMAGETAGS["SEARCH"]`` needs without opening a connection: the libraries, a
    PostgreSQL alias for pgvector, a writable directory for usearch."""
    backend, options = _search_config()
    if backend == "pgvector":
        return _check_pgvector_config(options)
    if backend == "usearch":
        return _check_usearch_config(options)
    return []


def _check_pgvector_config(options: dict[str, Any]) -> list:
    import importlib.util

    from django.db import connections
    from django.utils.connection import ConnectionDoesNotExist

    errors: list = []
    missing = [name for name in PGVECTOR_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        errors.append(
            Error(
                f"The pgvector search backend needs {', '.join(missing)}, which is not installed.",
                hint="pip install 'django-imagetags[pgvector]'",
                id="imagetags.E006",
            )
        )
    alias = options.get("DATABASE", "default")
    try:
        vendor = connections[alias].vendor
    except ConnectionDoesNotExist:
        vendor = None
    if vendor != "postgresql":
        found = f"is a {vendor} database" if vendor else "is not in DATABASES"
        errors.append(
            Error(
                f"IMAGETAGS['SEARCH']['OPTIONS']['DATABASE'] = {alias!r} {found}: the pgvector "
                "search backend needs PostgreSQL.",
                hint="Name a PostgreSQL alias of DATABASES, or use the 'usearch' backend "
                "(one machine) or 'exact'.",
                id="imagetags.E004",
            )
        )
    return errors


def _check_usearch_config(options: dict[str, Any]) -> list:
    import importlib.util
    import os

    errors: list = []
    if importlib.util.find_spec("usearch") is None:
        errors.append(
            Error(
                "The usearch search backend needs the usearch package, which is not installed.",
                hint="pip install 'django-imagetags[usearch]'",
                id="imagetags.E007",
            )
        )
    path = options.get("PATH")
    if not path:
        problem = "IMAGETAGS['SEARCH']['OPTIONS']['PATH'] is not set"
    elif not os.path.isdir(path):
        problem = f"IMAGETAGS['SEARCH']['OPTIONS']['PATH'] = {str(path)!r} is not a directory"
    elif not os.access(path, os.W_OK | os.X_OK):
        problem = f"IMAGETAGS['SEARCH']['OPTIONS']['PATH'] = {str(path)!r} is not writable"
    else:
        return errors
    errors.append(
        Error(
            f"{problem}: the usearch backend keeps its index files there.",
            hint="Point it at a local directory, writable by this process, that the web and "
            "worker processes of this machine share (e.g. /var/lib/imagetags/search).",
            id="imagetags.E008",
        )
    )
    return errors


@register(Tags.database)
def check_pgvector_extension(
    app_configs: Any = None, databases: list[str] | None = None, **kwargs: Any
) -> list:
    """The ``vector`` extension in the pgvector backend's database.

    A database check: it opens a connection, so Django runs it only where databases are named —
    ``manage.py check --database <alias>``, and ``migrate``, which checks its target database
    before migrating — never at ``runserver``'s or every command's start."""
    backend, options = _search_config()
    alias = options.get("DATABASE", "default")
    if backend != "pgvector" or not databases or alias not in databases:
        return []
    from django.apps import apps
    from django.db import connections
    from django.db.migrations.recorder import MigrationRecorder
    from django.utils.connection import ConnectionDoesNotExist

    from imagetags.contrib.pgvector.apps import PgvectorConfig
    from imagetags.contrib.pgvector.extension import extension_installed, install_hint

    try:
        connection = connections[alias]
    except ConnectionDoesNotExist:
        return []  # imagetags.E004 says so
    if connection.vendor != "postgresql" or extension_installed(connection):
        return []
    if apps.is_installed(PGVECTOR_APP):
        applied = MigrationRecorder(connection).applied_migrations()
        if not any(app == PgvectorConfig.label for app, _name in applied):
            # migrate is about to create it (and checks before it migrates): no error to stop it.
            return []
    return [
        Error(
            f"The PostgreSQL database {alias!r} has no 'vector' extension: the pgvector search "
            "backend cannot create its tables.",
            hint="Run CREATE EXTENSION vector; in that database as a superuser, or add "
            f"{PGVECTOR_APP!r} to INSTALLED_APPS and migrate (as a role that may create it). "
            f"If the server lacks pgvector, {install_hint()}.",
            id="imagetags.E005",
        )
    ]


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
