"""Minimal settings for the test suite.

The extractor is real: VGG16 with seeded random weights on small inputs by default (fast, no
download), or whatever ``IMAGETAGS_EXTRACTOR`` names (e.g. ``tflite:../shared/models/...``).
The database is a file so that a real ``qcluster`` worker process can share it.
"""

import os
import tempfile
from pathlib import Path

import imagetags.api as imagetags_api

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "imagetags-tests-not-secret"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_q",
    "imagetags",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
# The upload page (imagetags:upload) sends anonymous visitors to the admin's login form.
LOGIN_URL = "admin:login"

_TEST_DB = os.environ.get(
    "IMAGETAGS_TEST_DB",
    os.path.join(tempfile.gettempdir(), f"imagetags-test-{os.getpid()}.sqlite3"),
)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # NAME is what a worker subprocess opens (tests pass it the test database's path).
        "NAME": _TEST_DB,
        # transaction_mode IMMEDIATE: every atomic block takes SQLite's write lock at BEGIN,
        # waiting up to `timeout` for it. Under the default deferred BEGIN, a block that reads
        # and then writes (compute_features storing a batch, django-q2's monitor saving a
        # result) fails at once with "database is locked" when another process holds the write
        # lock at that moment: SQLite never waits to upgrade a read lock (that could deadlock),
        # so the timeout does not apply. That made the worker tests flaky on a busy machine
        # (docs/reliability.md, "Flaky tests"; tests/test_worker.py shows it).
        "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
        "TEST": {"NAME": _TEST_DB},
    }
}

# The production stack (docs/deployment.md): IMAGETAGS_TEST_DATABASE_URL runs the suite on
# PostgreSQL, e.g. postgresql://imagetags:secret@127.0.0.1:5432/imagetags (pytest-django creates
# and drops test_<name>). A worker subprocess is pointed at that test database by IMAGETAGS_TEST_DB,
# as it is at the SQLite file otherwise.
_DATABASE_URL = os.environ.get("IMAGETAGS_TEST_DATABASE_URL", "")
if _DATABASE_URL:
    from urllib.parse import unquote, urlsplit

    _url = urlsplit(_DATABASE_URL)
    if _url.scheme not in ("postgres", "postgresql") or not _url.path.strip("/"):
        raise ValueError(
            "IMAGETAGS_TEST_DATABASE_URL must look like "
            f"postgresql://user:password@host:port/dbname, not {_DATABASE_URL!r}"
        )
    _name = unquote(_url.path.strip("/"))
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("IMAGETAGS_TEST_DB", _name),
            "USER": unquote(_url.username or ""),
            "PASSWORD": unquote(_url.password or ""),
            "HOST": _url.hostname or "",
            "PORT": str(_url.port or ""),
            "TEST": {"NAME": f"test_{_name}"},
        }
    }

MEDIA_ROOT = os.environ.get(
    "IMAGETAGS_TEST_MEDIA", os.path.join(tempfile.gettempdir(), "imagetags-test-media")
)
MEDIA_URL = "/media/"

# django-q2 reads Q_CLUSTER at import time, so `sync` cannot be changed with override_settings:
# tests that need a real queue patch django_q.conf.Conf.SYNC (see tests/test_worker.py).
Q_CLUSTER = {
    "name": "imagetags-tests",
    "orm": "default",
    # The qcluster subprocess of tests/test_worker.py sets IMAGETAGS_TEST_SYNC=0: a real worker
    # must close database connections before forking its pool, which django-q2 skips when sync.
    "sync": os.environ.get("IMAGETAGS_TEST_SYNC", "1") != "0",
    "workers": 1,
    "timeout": 120,
    "retry": 150,
    "max_attempts": 2,
    "catch_up": False,
    "poll": 0.2,
}
# IMAGETAGS_TEST_REDIS (e.g. redis://127.0.0.1:6379/0) swaps the ORM broker for django-q2's Redis
# broker, as a scale-out site runs it. IMAGETAGS_TEST_Q_NAME names the queue, so a test and the
# workers it starts agree on it; IMAGETAGS_TEST_Q_RETRY shortens the ORM broker's redelivery.
if os.environ.get("IMAGETAGS_TEST_REDIS"):
    del Q_CLUSTER["orm"]
    Q_CLUSTER["redis"] = os.environ["IMAGETAGS_TEST_REDIS"]
if os.environ.get("IMAGETAGS_TEST_Q_NAME"):
    Q_CLUSTER["name"] = os.environ["IMAGETAGS_TEST_Q_NAME"]
if os.environ.get("IMAGETAGS_TEST_Q_RETRY"):
    Q_CLUSTER["retry"] = int(os.environ["IMAGETAGS_TEST_Q_RETRY"])
    Q_CLUSTER["timeout"] = min(Q_CLUSTER["timeout"], Q_CLUSTER["retry"] - 1)


def _extractor() -> dict:
    spec = os.environ.get("IMAGETAGS_EXTRACTOR")
    if spec:
        from imagetags.services.extractors import extractor_config_from_spec

        return extractor_config_from_spec(spec)
    # Random weights are flagged in the key and by a warning: fine for tests, never for a site.
    return {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "avg", "input_size": 64}}


IMAGETAGS = {"EXTRACTOR": _extractor()}

# IMAGETAGS_TEST_SEARCH picks the vector-search engine the suite serves with (.ci/run's third run:
# pgvector); unset, the app's default (exact). pgvector searches in the test database itself,
# whose server must have pgvector (tests/pgvector_server.py's has it in template1); usearch keeps
# its files in one directory per session, handed to worker subprocesses through the environment.
_SEARCH = os.environ.get("IMAGETAGS_TEST_SEARCH", "")
if _SEARCH == "pgvector":
    IMAGETAGS["SEARCH"] = {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}}
    INSTALLED_APPS.append("imagetags.contrib.pgvector")
elif _SEARCH == "usearch":
    if not os.environ.get("IMAGETAGS_TEST_SEARCH_PATH"):
        import atexit
        import shutil

        os.environ["IMAGETAGS_TEST_SEARCH_PATH"] = tempfile.mkdtemp(prefix="imagetags-usearch-")
        atexit.register(shutil.rmtree, os.environ["IMAGETAGS_TEST_SEARCH_PATH"], True)
    IMAGETAGS["SEARCH"] = {
        "BACKEND": "usearch",
        "OPTIONS": {"PATH": os.environ["IMAGETAGS_TEST_SEARCH_PATH"]},
    }
elif _SEARCH not in ("", "exact"):
    raise ValueError(f"IMAGETAGS_TEST_SEARCH must be exact, usearch or pgvector, not {_SEARCH!r}")

# The REST API (imagetags.api) and its OpenAPI schema; Swagger UI's files come from the sidecar
# package, so the UI works without a CDN.
REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}
SPECTACULAR_SETTINGS = imagetags_api.SPECTACULAR_SETTINGS

LOGGING = {"version": 1, "disable_existing_loggers": False}
