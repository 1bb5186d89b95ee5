"""Settings of the demo site: the embedded default (SQLite, django-q2's ORM broker, local media).

Environment variables:
- ``IMAGETAGS_EXTRACTOR``: ``vgg16:imagenet`` (default), ``vgg16:random`` (tests only),
  ``vgg16:/path/weights.h5``, ``tflite:/path/model.tflite`` — the same commands run online,
  offline and in CI.
- ``IMAGETAGS_DEMO_DB``: the SQLite file (default ``demo.sqlite3`` beside manage.py).
- ``IMAGETAGS_DEMO_MEDIA``: where uploads go (default ``demo_media/``).
- ``DJANGO_DEBUG``: ``0`` to turn debug off.
- ``IMAGETAGS_DEMO_EXTRACTOR_NOTE``: a sentence run_demo.sh sets when it could not use the
  ImageNet weights (why, and what it uses instead); the gallery pages show it.
"""

import os
from pathlib import Path

import imagetags.api as imagetags_api
from imagetags.services.extractors import extractor_config_from_spec

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") != "0"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

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
    "demo_site.gallery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_site.urls"
WSGI_APPLICATION = "demo_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("IMAGETAGS_DEMO_DB", str(BASE_DIR / "demo.sqlite3")),
        # The web server and the worker share the file; wait for each other's writes. IMMEDIATE:
        # an atomic block takes the write lock at BEGIN, where `timeout` applies; a deferred one
        # that reads and then writes fails at once with "database is locked" if the other
        # process is writing (docs/reliability.md, "Flaky tests").
        "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "demo_static"
MEDIA_URL = "/media/"
MEDIA_ROOT = os.environ.get("IMAGETAGS_DEMO_MEDIA", str(BASE_DIR / "demo_media"))
LOGIN_URL = "admin:login"
# Why the demo is not using ImageNet weights, if it is not (set by run_demo.sh; shown on the pages).
DEMO_EXTRACTOR_NOTE = os.environ.get("IMAGETAGS_DEMO_EXTRACTOR_NOTE", "")

# Embedded default broker: django-q2 keeps its queue in the database itself.
Q_CLUSTER = {
    "name": "imagetags-demo",
    "orm": "default",
    "workers": 1,
    "timeout": 600,
    "retry": 720,
    "max_attempts": 3,
    "catch_up": False,
}

IMAGETAGS = {
    "EXTRACTOR": extractor_config_from_spec(
        os.environ.get("IMAGETAGS_EXTRACTOR", "vgg16:imagenet")
    ),
    # A local demo: the curl examples of docs/api.md log in as admin/admin by HTTP Basic, which the
    # app leaves off by default (unthrottled password guessing). Never on a public site.
    "API_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
}

# The REST API (imagetags.api) and its OpenAPI schema; Swagger UI's files come from the sidecar
# package, so the UI works without a CDN.
REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}
SPECTACULAR_SETTINGS = imagetags_api.SPECTACULAR_SETTINGS
