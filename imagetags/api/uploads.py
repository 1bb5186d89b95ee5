"""The upload limits of :mod:`imagetags.uploads`, answered as DRF errors (413, JSON).

The API views install them before authentication (session authentication reads the body for
its CSRF check, so they must be in place before it). Too many files is a 400 on the file field,
decided by the serializer once the (size-bounded) body is parsed.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from rest_framework import status
from rest_framework.exceptions import APIException

from imagetags.conf import imagetags_settings
from imagetags.uploads import (
    MULTIPART_FRAMING_BYTES,
    FileSizeLimitHandler,
    UploadTooLarge,
    body_limit,
    file_too_large_message,
    guard_body,
)

__all__ = [
    "MULTIPART_FRAMING_BYTES",
    "FileSizeLimitHandler",
    "PayloadTooLarge",
    "body_limit",
    "check_upload_size",
    "guard_upload",
]


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = _("The request body is too large.")
    default_code = "payload_too_large"


def check_upload_size(upload: Any) -> None:
    """Raise :class:`PayloadTooLarge` for a parsed upload over ``MAX_UPLOAD_BYTES``.

    The streaming handler normally stops such a file earlier; this catches bodies that were
    parsed before the view ran (a site's middleware reading ``request.POST``).
    """
    if (getattr(upload, "size", 0) or 0) > imagetags_settings.MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(file_too_large_message(getattr(upload, "name", "")))


def guard_upload(request: HttpRequest) -> None:
    """:func:`imagetags.uploads.guard_body` with its refusal as a 413 :class:`PayloadTooLarge`."""
    try:
        guard_body(request)
    except UploadTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from exc
