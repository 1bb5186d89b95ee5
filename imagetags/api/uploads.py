"""The upload limits of :mod:`imagetags.uploads`, answered as DRF errors (413, JSON).

The API views install them before authentication (session authentication reads the body for
its CSRF check, so they must be in place before it). The limits and their messages are those
of ``services.images`` (``max_upload_bytes``, ``max_files_per_post``): a file already parsed
when the view runs is checked there too (``check_upload_size``, raising ``UploadTooLarge``,
which ``views.as_api_exception`` answers as :class:`PayloadTooLarge`). Too many files is a 400
on the file field, decided by the request validator once the (size-bounded) body is parsed.
"""

from __future__ import annotations

from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from rest_framework import status
from rest_framework.exceptions import APIException

from imagetags.images import UploadTooLarge
from imagetags.uploads import MULTIPART_FRAMING_BYTES, FileSizeLimitHandler, body_limit, guard_body

__all__ = [
    "MULTIPART_FRAMING_BYTES",
    "FileSizeLimitHandler",
    "PayloadTooLarge",
    "body_limit",
    "guard_upload",
]


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = _("The request body is too large.")
    default_code = "payload_too_large"


def guard_upload(request: HttpRequest) -> None:
    """:func:`imagetags.uploads.guard_body` with its refusal as a 413 :class:`PayloadTooLarge`."""
    try:
        guard_body(request)
    except UploadTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from exc
