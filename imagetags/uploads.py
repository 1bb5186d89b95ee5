"""Guards for views that take uploads: a streaming size limit and a per-client throttle.

Plain Django (no DRF), so the upload page and the suggestions JSON view get the same guards as
the REST API, which reuses the size limit from here:

- a request whose ``Content-Length`` cannot fit ``MAX_FILES_PER_POST`` files of
  ``MAX_UPLOAD_BYTES`` plus the form fields is refused before a byte of it is read;
- :class:`FileSizeLimitHandler`, the first upload handler, stops the parse as soon as one file
  passes ``MAX_UPLOAD_BYTES``, so a 2 GB file is never written to a temporary file;
- :func:`throttle_wait` counts requests per user (per IP address when anonymous) in the cache,
  at ``THROTTLE_RATE``.

The limits themselves, and the words that refuse them, come from ``services.images``
(``max_upload_bytes``, ``max_files_per_post``, ``file_too_large_message``), which the
suggestion request validator and the posts service use too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from imagetags.conf import imagetags_settings
from imagetags.images import (
    UploadTooLarge,
    file_too_large_message,
    max_files_per_post,
    max_upload_bytes,
)

__all__ = [
    "MULTIPART_FRAMING_BYTES",
    "FileSizeLimitHandler",
    "body_limit",
    "guard_body",
    "throttle_wait",
    "upload_guards",
]

# Part headers and boundaries of a multipart body, on top of its files and form fields.
MULTIPART_FRAMING_BYTES = 64 * 1024

# Methods whose bodies are parsed.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_RATE = re.compile(r"^(\d+)/(s|sec|second|m|min|minute|h|hour|d|day)$")
_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def body_limit() -> int | None:
    """Largest body that can hold a valid upload; None when form fields are unbounded."""
    fields = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if fields is None:
        return None
    return max_upload_bytes() * max_files_per_post() + fields + MULTIPART_FRAMING_BYTES


class FileSizeLimitHandler(FileUploadHandler):
    """Stops a multipart parse with :class:`UploadTooLarge` once a file passes the limit.

    It only watches: chunks pass on to Django's own handlers, which build the files.
    """

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) > max_upload_bytes():
            raise UploadTooLarge(file_too_large_message(self.file_name))
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler returns the file


def guard_body(request: HttpRequest) -> None:
    """Refuse a body too large to be valid (before reading it), and watch each file of the
    rest as it streams in. Call it before anything reads ``request.POST`` or ``FILES``."""
    if request.method not in BODY_METHODS:
        return
    limit = body_limit()
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0  # Django's parser reports a bad length itself
    if limit is not None and length > limit:
        raise UploadTooLarge(
            f"The request body is {length:,} bytes; at most {limit:,} are accepted "
            f"({max_files_per_post()} images of up to {max_upload_bytes():,} bytes each)."
        )
    if not any(isinstance(h, FileSizeLimitHandler) for h in request.upload_handlers):
        request.upload_handlers.insert(0, FileSizeLimitHandler(request))


def parse_rate(rate: Any, key: str) -> tuple[int, int] | None:
    """``"N/min"`` as (N, 60 seconds); None for no limit; ImproperlyConfigured naming ``key``."""
    if rate is None:
        return None
    match = _RATE.match(str(rate))
    if match is None:
        raise ImproperlyConfigured(
            f"IMAGETAGS[{key!r}] is {rate!r}; use 'N/s', 'N/min', 'N/hour', 'N/day' or None."
        )
    return int(match[1]), _PERIODS[match[2][0]]


def throttle_wait(request: HttpRequest, scope: str = "views") -> int | None:
    """Count this request; the seconds to wait when it is over ``THROTTLE_RATE``, else None.

    A fixed window per client in the default cache (share one, e.g. Redis, between web
    processes, as for the API's throttle).
    """
    limit = parse_rate(imagetags_settings.THROTTLE_RATE, "THROTTLE_RATE")
    if limit is None:
        return None
    count, period = limit
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        client = f"user-{user.pk}"
    else:
        client = f"ip-{request.META.get('REMOTE_ADDR', '')}"
    now = time.time()
    window = int(now // period)
    key = f"imagetags:throttle:{scope}:{client}:{window}"
    cache.add(key, 0, timeout=period + 1)
    try:
        seen = cache.incr(key)
    except ValueError:  # evicted between add and incr: this request opens the window again
        cache.set(key, 1, timeout=period + 1)
        seen = 1
    if seen <= count:
        return None
    return max(1, int((window + 1) * period - now + 0.999))


Refusal = Callable[[HttpRequest, int, str, dict[str, str]], HttpResponse]


def upload_guards(refuse: Refusal) -> Callable[[Callable[..., HttpResponse]], Any]:
    """A view decorator: throttle, then the body limits, then the view.

    ``refuse(request, status, message, headers)`` answers a refusal (429 or 413) in the view's
    own format. The view keeps its CSRF check (``csrf_protect``), which now runs after the
    limits are in place: CsrfViewMiddleware would otherwise read the whole body first.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            wait = throttle_wait(request)
            if wait is not None:
                return refuse(
                    request,
                    429,
                    f"Too many requests; try again in {wait} seconds.",
                    {"Retry-After": str(wait)},
                )
            try:
                guard_body(request)
                return view(request, *args, **kwargs)
            except UploadTooLarge as exc:
                return refuse(request, 413, str(exc), {})

        return csrf_exempt(guarded)

    return decorator
