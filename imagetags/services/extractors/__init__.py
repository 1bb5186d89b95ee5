"""Backend registry: the configured extractor, built once per process and configuration.

``IMAGETAGS["EXTRACTOR"] = {"CLASS": alias-or-dotted-path, "OPTIONS": {...}}``. The instance is
cached, so a model is loaded at most once per process whatever calls for it (tasks, commands,
views); changing ``IMAGETAGS`` clears the cache.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from imagetags.services.extractors.base import FeatureExtractor

__all__ = [
    "FeatureExtractor",
    "clear_extractor_cache",
    "extractor_config_from_spec",
    "get_extractor",
    "load_extractor_class",
    "warm_up",
]

_cache: dict[str, FeatureExtractor] = {}
_lock = threading.Lock()


def load_extractor_class(name: str) -> type[FeatureExtractor]:
    """Resolve a backend alias (``vgg16``, ``tflite``) or dotted path to its class."""
    from imagetags.conf import imagetags_settings

    path = imagetags_settings.EXTRACTOR_BACKENDS.get(name, name)
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"IMAGETAGS['EXTRACTOR']['CLASS'] = {name!r} could not be imported ({exc}). "
            f"Use one of {sorted(imagetags_settings.EXTRACTOR_BACKENDS)} or a dotted path."
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractor)):
        raise ImproperlyConfigured(
            f"IMAGETAGS['EXTRACTOR']['CLASS'] = {name!r} is not a FeatureExtractor subclass."
        )
    return cls


def build_extractor(config: dict[str, Any]) -> FeatureExtractor:
    try:
        name = config["CLASS"]
    except (KeyError, TypeError):
        raise ImproperlyConfigured(
            "IMAGETAGS['EXTRACTOR'] must be a dict with a 'CLASS' key (and optional 'OPTIONS')."
        ) from None
    cls = load_extractor_class(name)
    options = config.get("OPTIONS") or {}
    try:
        return cls(**options)
    except TypeError as exc:
        raise ImproperlyConfigured(
            f"Bad IMAGETAGS['EXTRACTOR']['OPTIONS'] for {name}: {exc}"
        ) from exc


def get_extractor(config: dict[str, Any] | None = None) -> FeatureExtractor:
    """The extractor for ``config`` (default: the ``EXTRACTOR`` setting), one per process."""
    from imagetags.conf import imagetags_settings

    config = config if config is not None else imagetags_settings.EXTRACTOR
    cache_key = json.dumps(config, sort_keys=True, default=str)
    with _lock:
        extractor = _cache.get(cache_key)
        if extractor is None:
            extractor = _cache[cache_key] = build_extractor(config)
    return extractor


def warm_up() -> FeatureExtractor:
    """Load the configured extractor's model now, so that no request pays for it later.

    Called in a background thread at start-up when ``IMAGETAGS["WARM_UP"]`` is on (see
    ``ImageTagsConfig.ready``); a site may also call it from its WSGI file or a worker hook.
    """
    extractor = get_extractor()
    extractor.load()
    return extractor


def clear_extractor_cache() -> None:
    with _lock:
        _cache.clear()


def extractor_config_from_spec(spec: str) -> dict[str, Any]:
    """Turn a short spec into an ``EXTRACTOR`` setting.

    ``vgg16:imagenet``, ``vgg16:random`` (seeded random weights, tests only), ``vgg16:/path.h5``
    (local weights file), optionally followed by ``:avg|max|flatten``; ``tflite:/path/model.tflite``
    (embedding tensor found automatically) or ``tflite:/path/model.tflite#TensorName``.
    Used by demo_site's ``IMAGETAGS_EXTRACTOR`` variable and commands' ``--extractor`` option.
    """
    backend, _, rest = spec.strip().partition(":")
    if backend == "vgg16":
        weights, pooling = rest or "imagenet", "avg"
        for candidate in ("avg", "max", "flatten"):
            if weights.endswith(":" + candidate):
                weights, pooling = weights[: -len(candidate) - 1], candidate
        if weights == "random":
            weights = None
        return {"CLASS": "vgg16", "OPTIONS": {"weights": weights, "pooling": pooling}}
    if backend == "tflite":
        if not rest:
            raise ImproperlyConfigured(
                "tflite extractor spec needs a model path: tflite:/path.tflite"
            )
        path, _, tensor = rest.partition("#")
        options: dict[str, Any] = {"model_path": path}
        if tensor:
            options["tensor"] = tensor
        return {"CLASS": "tflite", "OPTIONS": options}
    raise ImproperlyConfigured(
        f"Unknown extractor spec {spec!r}: expected vgg16:imagenet, vgg16:random, "
        "vgg16:/path/weights.h5 or tflite:/path/model.tflite"
    )
