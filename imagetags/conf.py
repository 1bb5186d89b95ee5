"""The ``IMAGETAGS`` settings dict, merged over documented defaults and read lazily.

Usage::

    from imagetags.conf import imagetags_settings
    imagetags_settings.SUGGEST_LIMIT

Nothing here reads ``django.conf.settings`` at import time: the merged dict is built on first
attribute access and thrown away whenever ``IMAGETAGS`` changes (``override_settings`` included),
so tests and sites can change it at any point. The pattern follows DRF's ``api_settings``.
"""

from __future__ import annotations

from typing import Any

from django.core.signals import setting_changed

# Every key, its default and what it means. docs/settings.md has the same table for humans; a test
# keeps the two in step.
DEFAULTS: dict[str, Any] = {
    # Feature extractor: a backend alias from EXTRACTOR_BACKENDS or a dotted path to a
    # FeatureExtractor subclass, and the options passed to its constructor.
    "EXTRACTOR": {
        "CLASS": "vgg16",
        "OPTIONS": {"weights": "imagenet", "pooling": "avg"},
    },
    # Aliases accepted by EXTRACTOR["CLASS"]. Sites may add their own.
    "EXTRACTOR_BACKENDS": {
        "vgg16": "imagetags.services.extractors.vgg16.VGG16Extractor",
        "tflite": "imagetags.services.extractors.tflite.TFLiteExtractor",
    },
    # Images embedded per forward pass in bulk work (compute_features, import_library).
    "BATCH_SIZE": 32,
    # Enqueue a django-q2 task to compute features when a StockImage's file changes.
    "AUTO_FEATURES": True,
    # A feature task that failed this many times is not retried by `compute_features --missing`.
    "MAX_FEATURE_ATTEMPTS": 3,
    # Clustering defaults; every one can be overridden on `rebuild_clusters`' command line.
    "CLUSTERING": {
        "ALGORITHM": "minibatch",  # "kmeans" or "minibatch"
        "K": "auto",  # an integer, or "auto" (see core.kmeans.auto_k)
        "BATCH_SIZE": 10_000,  # mini-batch size (the patent's example)
        "MAX_ITER": 300,
        "TOL": 1e-4,
        "SEED": 0,
    },
    # Vectors are read from the database in chunks of this many rows.
    "CHUNK_SIZE": 5_000,
    # Suggestions: at most this many tags ...
    "SUGGEST_LIMIT": 10,
    # ... and only tags on at least this share of the nearest cluster's posts (None: no floor).
    "SUGGEST_THRESHOLD": None,
    # How suggest() ranks tags: "ivf" (neighbour voting over the members of the nearest clusters,
    # the measured best, docs/quality.md) or "cluster" (the patent: the nearest cluster's tags).
    "SUGGEST_METHOD": "ivf",
    # The engine that finds a query's neighbours for "ivf" (docs/deployment.md, "Vector search
    # backends"): "exact" (each process reads the members it needs into memory), "pgvector" (an
    # HNSW index in PostgreSQL; OPTIONS: DATABASE, the alias holding the models) or "usearch" (an
    # HNSW file per cluster set, memory-mapped by every process; OPTIONS: PATH, a local directory).
    "SEARCH": {"BACKEND": "exact", "OPTIONS": {}},
    # Neighbour voting ("ivf"): how many distinct voters, similarity weighting exp((s - s_top) / T)
    # (None: equal votes), one vote per "post" or per "owner" (uploader), how much of a tag's
    # library-wide share is subtracted (0 = none, 1 = TagVote's full prior), and how many nearest
    # clusters are searched (None: all, exact). Chosen by `evaluate_suggestions --tune`.
    "VOTING": {
        "NEIGHBOURS": 20,
        "TEMPERATURE": 0.05,
        "VOTE_BY": "post",
        "PRIOR_WEIGHT": 0.1,
        "PROBES": 6,
    },
    # Tag sources counted into cluster tag frequencies. Auto-applied tags are left out by default
    # so that the recommender does not learn from its own unreviewed output.
    "COUNTED_TAG_SOURCES": ["typed", "suggested", "imported"],
    # Auto-tagging: apply the top suggestions to a post once its images have features.
    "AUTO_TAG": False,
    "AUTO_TAG_LIMIT": 5,
    "AUTO_TAG_THRESHOLD": 0.3,
    # Upload limits.
    "MAX_UPLOAD_BYTES": 20 * 1024 * 1024,
    "MAX_PIXELS": 40_000_000,
    # Most frames an animation (GIF, APNG, WebP) or multi-page TIFF may have. Only the first
    # frame is used, and frames are counted only up to this cap: counting a GIF means reading
    # every frame's header, and a small file can hold millions of tiny frames.
    "MAX_FRAMES": 1000,
    "MAX_FILES_PER_POST": 10,
    # Most tags on one post, on every path (form, API, admin, import_library, auto-tagging).
    "MAX_TAGS_PER_POST": 50,
    "ALLOWED_FORMATS": ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"],
    # Where StockImage files go inside the default storage (strftime codes allowed).
    "UPLOAD_TO": "imagetags/%Y/%m/",
    # Load the extractor when a worker or web process starts, so the first request does not pay.
    "WARM_UP": False,
    # Upload widget and form (imagetags.forms, imagetags.views): the upload page and the
    # suggestions JSON view need a logged-in user.
    "LOGIN_REQUIRED": True,
    # Requests per user (per IP when anonymous) to the upload page and the suggestions JSON
    # view, counted in the default cache: "N/s", "N/min", "N/hour", "N/day"; None: unlimited.
    "THROTTLE_RATE": "60/min",
    # The form's no-JavaScript path keeps uploaded files here (default storage) between its two
    # steps; files older than PENDING_UPLOAD_MAX_AGE seconds are deleted at the next upload.
    "PENDING_UPLOAD_TO": "imagetags/pending/",
    "PENDING_UPLOAD_MAX_AGE": 3600,
    # Most kept files per user (or per anonymous session) at once; keeping more drops that
    # user's oldest unsaved batches first (the newest batch is always kept).
    "MAX_PENDING_UPLOADS_PER_USER": 30,
    # Seconds a suggestions token (the signed record of the suggestions a user was shown, which
    # saving a post needs for feedback to count) stays valid.
    "SUGGESTIONS_TOKEN_MAX_AGE": 3600,
    # REST API (imagetags.api, needs the `api` extra). Dotted paths, imported when a request
    # comes in. Session only by default: HTTP Basic (DRF's default too) lets a client guess
    # passwords without limit, so sites opt into Basic or Token here. None: the site's
    # REST_FRAMEWORK DEFAULT_AUTHENTICATION_CLASSES.
    "API_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "API_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "API_THROTTLE_CLASSES": ["imagetags.api.throttling.ImageTagsRateThrottle"],
    # Requests per user (or per IP for anonymous clients) in the throttle scope "imagetags";
    # "N/s", "N/min", "N/hour" or "N/day"; None: unlimited.
    "API_THROTTLE_RATE": "60/min",
    # Which posts (and their images) the API shows a client: None, every post (the library is
    # shared: suggestions come from everyone's tags); or a dotted path to a callable
    # (request, queryset) -> queryset, e.g. "imagetags.api.views.own_posts" (staff see all).
    "API_POSTS_VISIBLE_TO": None,
    # Items per page of the list endpoints (a client may ask for up to 10× with ?page_size=).
    "API_PAGE_SIZE": 50,
    # Storage of feature vectors (services.vectors): "float32", or "float16" (half the bytes;
    # rows of either format are always readable, so switching needs no migration).
    "VECTOR_DTYPE": "float32",
    # A rebuild holds the library's vectors in memory up to this size (float32 MB); larger
    # libraries (e.g. 1M images, or `flatten` pooling) are clustered by streaming chunks.
    "REBUILD_MEMORY_MB": 1024,
    # Threads k-means may use in a rebuild (None: all cores). One is the safe default on shared
    # machines: scikit-learn's spinning threads ran 6× slower than one thread on busy cores.
    "REBUILD_THREADS": 1,
}

# Keys whose values are dicts: a site's partial dict is merged over the default one, so
# IMAGETAGS = {"CLUSTERING": {"K": 40}} keeps the other clustering defaults.
_MERGED_DICTS = ("CLUSTERING", "EXTRACTOR_BACKENDS", "VOTING")


class ImageTagsSettings:
    """Attribute access to the merged ``IMAGETAGS`` dict."""

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        self.defaults = defaults or DEFAULTS
        self._cached: dict[str, Any] | None = None

    @property
    def user_settings(self) -> dict[str, Any]:
        from django.conf import settings

        return getattr(settings, "IMAGETAGS", {}) or {}

    def _merged(self) -> dict[str, Any]:
        if self._cached is None:
            user = self.user_settings
            unknown = sorted(set(user) - set(self.defaults))
            if unknown:
                from django.core.exceptions import ImproperlyConfigured

                raise ImproperlyConfigured(
                    f"Unknown IMAGETAGS setting(s): {', '.join(unknown)}. "
                    f"Known keys: {', '.join(sorted(self.defaults))}."
                )
            merged = {**self.defaults, **user}
            for key in _MERGED_DICTS:
                if key in user:
                    merged[key] = {**self.defaults[key], **user[key]}
            self._cached = merged
        return self._cached

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self.defaults:
            raise AttributeError(f"Invalid IMAGETAGS setting: {name!r}")
        return self._merged()[name]

    def reload(self) -> None:
        self._cached = None


imagetags_settings = ImageTagsSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "IMAGETAGS":
        # Extractor instances need no reset: the registry keys them by their configuration.
        imagetags_settings.reload()


setting_changed.connect(_reload)
