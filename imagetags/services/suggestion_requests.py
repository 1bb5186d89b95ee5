"""One validator for a request for tag suggestions, shared by every surface that takes one.

The widget's JSON view (``imagetags.views.suggestions``) and the REST API (``SuggestionView``,
``ImageSuggestionView``) both call :func:`parse_suggestion_request` on what the client sent and
:func:`suggest_for_request` to answer; each surface only wraps :class:`InvalidRequest` in its own
envelope. So the bounds (``limit`` from 1 to :data:`MAX_SUGGEST_LIMIT`, ``threshold`` a finite
share from 0 to 1, ``exclude`` at most ``MAX_TAGS_PER_POST`` valid tag names, 1 to
``MAX_FILES_PER_POST`` images of at most ``MAX_UPLOAD_BYTES``) and the words that refuse them
are the same everywhere, word for word.

Files follow the one upload path of ``services.posts`` (format from the bytes, pixel cap, the
file at fault named), decoded one at a time into model inputs after the cheap checks and after
the library is known to be able to answer: a bad field, too many files or a library without
clusters costs no decoding, and a bad file costs no forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagetags.images import (
    InvalidImage,
    check_upload_size,
    max_files_per_post,
    too_many_files_message,
)
from imagetags.models import tag_name_error
from imagetags.services.extractors import get_extractor
from imagetags.services.posts import validate_model_inputs
from imagetags.services.shown import MAX_SHOWN_SUGGESTIONS
from imagetags.services.suggest import (
    ExtractorMismatch,
    MergedSuggestions,
    active_cluster_set,
    suggest,
    suggest_many,
)
from imagetags.services.tagging import max_tags_per_post, parse_tag_input

__all__ = [
    "MAX_SUGGEST_LIMIT",
    "MAX_TOKEN_LENGTH",
    "InvalidRequest",
    "SuggestionRequest",
    "parse_suggestion_request",
    "suggest_for_request",
]

# The most suggestions one answer may show: a page of chips; asking for more is a client bug
# worth reporting. A suggestions token holds at most this many items.
MAX_SUGGEST_LIMIT = MAX_SHOWN_SUGGESTIONS

# A suggestions token of MAX_SHOWN_SUGGESTIONS long names stays far below this.
MAX_TOKEN_LENGTH = 100_000

# The field that carries the images, on every surface.
IMAGE_FIELD = "image"

LIMIT_MESSAGE = f"“limit” must be a whole number from 1 to {MAX_SUGGEST_LIMIT}."
THRESHOLD_MESSAGE = "“threshold” must be a number from 0 to 1."
NO_IMAGE_MESSAGE = "Send at least one image in the field “image”."
NOT_A_FILE_MESSAGE = "Send each image as a file (multipart/form-data), not as text."
TAG_TEXT_MESSAGE = "Send tag names as text."
TOKEN_MESSAGE = f"A suggestions token is text of at most {MAX_TOKEN_LENGTH:,} characters."


def too_many_excluded_message(count: int) -> str:
    return f"At most {max_tags_per_post()} tags can be left out; {count} were sent."


class InvalidRequest(ValueError):
    """The request cannot be answered as sent: ``errors`` maps each field at fault to its
    messages; ``code`` names the first problem (``no_image``, ``bad_limit``, ...) for surfaces
    that answer with one code."""

    def __init__(self, errors: dict[str, list[str]], code: str = "invalid") -> None:
        self.errors = errors
        self.code = code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The first problem, as one sentence."""
        return next((messages[0] for messages in self.errors.values() if messages), "")


@dataclass(frozen=True)
class SuggestionRequest:
    """A valid request: the options of ``suggest()`` (None means the setting's default), the
    uploads (checked for count and size, not decoded yet) and the previous suggestions token."""

    limit: int | None = None
    threshold: float | None = None
    exclude: tuple[str, ...] = ()
    files: tuple[Any, ...] = field(default=(), repr=False)
    previous_token: str = field(default="", repr=False)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``suggest()`` and ``suggest_many()``."""
        return {"limit": self.limit, "threshold": self.threshold, "exclude": list(self.exclude)}


def _values(data: Mapping[str, Any], key: str) -> list[Any]:
    """Every value sent for ``key``: a QueryDict's list, or a plain mapping's value(s)."""
    getlist = getattr(data, "getlist", None)
    if getlist is not None:
        return list(getlist(key))
    if key not in data:
        return []
    value = data[key]
    return list(value) if isinstance(value, list | tuple) else [value]


def _last(data: Mapping[str, Any], key: str) -> Any:
    values = _values(data, key)
    return values[-1] if values else None


def _parse_limit(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        # Seven digits already pass any cap; longer text is not converted at all.
        digits = value.strip()
        number = int(digits) if len(digits) <= 7 else MAX_SUGGEST_LIMIT + 1
    else:
        raise ValueError(LIMIT_MESSAGE)
    if not 1 <= number <= MAX_SUGGEST_LIMIT:
        raise ValueError(LIMIT_MESSAGE)
    return number


def _parse_threshold(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(THRESHOLD_MESSAGE)
    try:
        share = float(value)
    except ValueError:
        raise ValueError(THRESHOLD_MESSAGE) from None
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        raise ValueError(THRESHOLD_MESSAGE)
    return share


def _parse_exclude(values: list[Any]) -> tuple[str, ...]:
    """Tag names typed like tag input (commas separate, double quotes group), each field value
    parsed; normalised, each once, at most ``MAX_TAGS_PER_POST`` (the tags a post can have)."""
    names: dict[str, None] = {}
    for text in values:
        if not isinstance(text, str):
            raise ValueError(TAG_TEXT_MESSAGE)
        names.update(dict.fromkeys(parse_tag_input(text)))
    if len(names) > max_tags_per_post():
        raise ValueError(too_many_excluded_message(len(names)))
    for name in names:
        error = tag_name_error(name)
        if error:
            raise ValueError(error)
    return tuple(names)


def _is_file(upload: Any) -> bool:
    return hasattr(upload, "read") and not isinstance(upload, str | bytes)


def parse_suggestion_request(
    data: Mapping[str, Any], files: Sequence[Any] | None = None
) -> SuggestionRequest:
    """Check a request for suggestions; :class:`InvalidRequest` with every field at fault.

    ``data``: the form fields or query parameters (``limit``, ``threshold``, ``exclude``,
    repeatable, and ``suggestions_token``), a QueryDict or a plain mapping. ``files``: what was
    sent in the field ``image`` (uploads, or text where a client sent text), or None for an
    endpoint that takes no files (suggestions for a stored image). A file over
    ``MAX_UPLOAD_BYTES`` raises ``images.UploadTooLarge`` (a 413 on every surface) once the
    fields are valid. Nothing is decoded here: :func:`suggest_for_request` opens the files.
    """
    errors: dict[str, list[str]] = {}
    codes: list[str] = []

    def refuse(name: str, message: str, code: str) -> None:
        errors.setdefault(name, []).append(message)
        codes.append(code)

    uploads: tuple[Any, ...] = ()
    if files is not None:
        uploads = tuple(files)
        if not uploads:
            refuse(IMAGE_FIELD, NO_IMAGE_MESSAGE, "no_image")
        elif len(uploads) > max_files_per_post():
            refuse(IMAGE_FIELD, too_many_files_message(len(uploads)), "too_many_files")
        elif not all(_is_file(upload) for upload in uploads):
            refuse(IMAGE_FIELD, NOT_A_FILE_MESSAGE, "invalid_image")
    parsed: dict[str, Any] = {}
    for name, parse, code in (
        ("limit", _parse_limit, "bad_limit"),
        ("threshold", _parse_threshold, "bad_threshold"),
    ):
        try:
            parsed[name] = parse(_last(data, name))
        except ValueError as exc:
            refuse(name, str(exc), code)
    try:
        parsed["exclude"] = _parse_exclude(_values(data, "exclude"))
    except ValueError as exc:
        refuse("exclude", str(exc), "bad_exclude")
    token = _last(data, "suggestions_token")
    if token is None:
        token = ""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        refuse("suggestions_token", TOKEN_MESSAGE, "bad_token")
    if errors:
        raise InvalidRequest(errors, codes[0])
    for upload in uploads:
        check_upload_size(upload)
    return SuggestionRequest(files=uploads, previous_token=token, **parsed)


def suggest_for_request(request: SuggestionRequest) -> MergedSuggestions:
    """The suggestions for a request's images, merged when there are several.

    ``suggest.SuggestionUnavailable`` before any file is decoded when the library cannot answer
    (no clusters, or clusters of another extractor); :class:`InvalidRequest` on ``image``, naming
    the file, for a file the upload rules refuse, before any forward pass. Each file is decoded
    once, one at a time, and only its model input is kept (``posts.validate_model_inputs``).
    """
    extractor = get_extractor()
    cluster_set = active_cluster_set()
    if cluster_set.extractor_key != extractor.key:
        raise ExtractorMismatch(cluster_set.extractor_key, extractor.key)
    try:
        inputs = validate_model_inputs(request.files, extractor)
    except InvalidImage as exc:
        raise InvalidRequest({IMAGE_FIELD: [str(exc)]}, "invalid_image") from None
    if len(inputs) == 1:
        # One image answers exactly as suggest() ranks it (a merge could reorder equal scores).
        result = suggest(inputs[0], **request.options())
        return MergedSuggestions(tags=result.tags, per_image=[result])
    return suggest_many(inputs, **request.options())
