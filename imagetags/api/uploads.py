"""Upload limits enforced while a multipart body streams in, before a view reads it whole.

Two guards, installed by the API views before authentication (session authentication reads the
body for its CSRF check, so they must be in place before it):

- a request whose ``Content-Length`` cannot fit ``MAX_FILES_PER_POST`` files of
  ``MAX_UPLOAD_BYTES`` plus the form fields is refused before a byte of it is read;
- :class:`FileSizeLimitHandler`, the first upload handler, stops the parse as soon as one file
  passes ``MAX_UPLOAD_BYTES``, so a 2 GB file is never written to a temporary file.

Both answer 413 with a JSON body. Too many files is a 400 on the file field, decided by the
serializer once the (size-bounded) body is parsed.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from rest_framework import status
from rest_framework.exceptions import APIException

from imagetags.conf import imagetags_settings

# Part headers and boundaries of a multipart body, on top of its files and form fields.
MULTIPART_FRAMING_BYTES = 64 * 1024

# Methods whose bodies the API parses.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = _("The request body is too large.")
    default_code = "payload_too_large"


def file_too_large(name: str) -> PayloadTooLarge:
    limit = imagetags_settings.MAX_UPLOAD_BYTES
    return PayloadTooLarge(f"{name or 'A file'} is larger than the limit of {limit:,} bytes.")


def check_upload_size(upload: Any) -> None:
    """Raise :class:`PayloadTooLarge` for a parsed upload over ``MAX_UPLOAD_BYTES``.

    The streaming handler normally stops such a file earlier; this catches bodies that were
    parsed before the view ran (a site's middleware reading ``request.POST``).
    """
    if (getattr(upload, "size", 0) or 0) > imagetags_settings.MAX_UPLOAD_BYTES:
        raise file_too_large(getattr(upload, "name", ""))


def body_limit() -> int | None:
    """Largest body that can hold a valid upload; None when form fields are unbounded."""
    fields = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if fields is None:
        return None
    files = imagetags_settings.MAX_UPLOAD_BYTES * imagetags_settings.MAX_FILES_PER_POST
    return files + fields + MULTIPART_FRAMING_BYTES


class FileSizeLimitHandler(FileUploadHandler):
    """Stops a multipart parse with :class:`PayloadTooLarge` once a file passes the limit.

    It only watches: chunks pass on to Django's own handlers, which build the files.
    """

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) > imagetags_settings.MAX_UPLOAD_BYTES:
            raise file_too_large(self.file_name)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler returns the file


def guard_upload(request: HttpRequest) -> None:
    """Refuse a body too large to be valid, and watch each file of the rest as it streams in."""
    if request.method not in _BODY_METHODS:
        return
    limit = body_limit()
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0  # Django's parser reports a bad length itself
    if limit is not None and length > limit:
        raise PayloadTooLarge(
            f"The request body is {length:,} bytes; at most {limit:,} are accepted "
            f"({imagetags_settings.MAX_FILES_PER_POST} images of up to "
            f"{imagetags_settings.MAX_UPLOAD_BYTES:,} bytes each)."
        )
    if not any(isinstance(h, FileSizeLimitHandler) for h in request.upload_handlers):
        request.upload_handlers.insert(0, FileSizeLimitHandler(request))
