"""Temporary re-export of :mod:`imagetags.images` (issue 11), for the modules other branches of
the issue are rewriting right now: admin, api/serializers, api/views, forms, views,
services/evaluation, services/suggest.

The image rules moved to the data layer, since ``models.py`` uses them and must not import a
service. The lead re-points those imports to ``imagetags.images`` when merging the branches, then
deletes this file and the ``images-shim`` contract in pyproject.toml, which lists who still
imports it (and fails on anyone new).
"""

from imagetags.images import (
    EXTENSIONS,
    REDUCE_MARGIN,
    ImageInfo,
    ImageSource,
    InvalidImage,
    detect_format,
    extension_for_format,
    extension_matches,
    file_sha256,
    open_image,
    stored_extension,
    to_model_input,
    to_rgb,
)

__all__ = [
    "EXTENSIONS",
    "REDUCE_MARGIN",
    "ImageInfo",
    "ImageSource",
    "InvalidImage",
    "detect_format",
    "extension_for_format",
    "extension_matches",
    "file_sha256",
    "open_image",
    "stored_extension",
    "to_model_input",
    "to_rgb",
]
