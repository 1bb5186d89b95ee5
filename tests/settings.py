"""Minimal settings for the test suite.

The extractor is real: VGG16 with seeded random weights on small inputs by default (fast, no
download), or whatever ``IMAGETAGS_EXTRACTOR`` names (e.g. ``tflite:../shared/models/...``).
The database is a file so that a real ``qcluster`` worker process can share it.
"""

import os
import tempfile
from pathlib import Path

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

_TEST_DB = os.environ.get(
    "IMAGETAGS_TEST_DB",
    os.path.join(tempfile.gettempdir(), f"imagetags-test-{os.getpid()}.sqlite3"),
)
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # NAME is what a worker subprocess opens (tests pass it the test database's path).
        "NAME": _TEST_DB,
        "OPTIONS": {"timeout": 30},
        "TEST": {"NAME": _TEST_DB},
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


def _extractor() -> dict:
    spec = os.environ.get("IMAGETAGS_EXTRACTOR")
    if spec:
        from imagetags.services.extractors import extractor_config_from_spec

        return extractor_config_from_spec(spec)
    # Random weights are flagged in the key and by a warning: fine for tests, never for a site.
    return {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "avg", "input_size": 64}}


IMAGETAGS = {"EXTRACTOR": _extractor()}

LOGGING = {"version": 1, "disable_existing_loggers": False}
