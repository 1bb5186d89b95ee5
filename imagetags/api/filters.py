"""Bounds on what a query string can ask of the database: ids, search text, pages.

Every number that reaches a query is checked against :data:`MAX_ID` first: the primary keys are
64-bit (``BigAutoField``), so a larger number names no row, and SQLite raises ``OverflowError``
for it instead of finding nothing. Search text is bounded in length and in terms (each term is
one ``LIKE`` condition; a thousand of them overflow SQLite's expression tree).
"""

from __future__ import annotations

import re
from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.filters import SearchFilter
from rest_framework.request import Request

from imagetags.models import TAG_NAME_MAX_LENGTH

# The largest value of a 64-bit signed primary key (SQLite's INTEGER, PostgreSQL's bigint).
MAX_ID = 2**63 - 1

# Search text: as long as a tag name, at most this many terms (separated by spaces or commas).
MAX_SEARCH_LENGTH = TAG_NAME_MAX_LENGTH
MAX_SEARCH_TERMS = 10
_TERM = r"[^\s,\u0000]+"
# The rule itself, published as the parameter's schema pattern: the server accepts exactly what
# the schema describes, so a client (or a fuzzer) can tell a valid search from the schema.
SEARCH_PATTERN = rf"^[\s,]*({_TERM}([\s,]+{_TERM}){{0,{MAX_SEARCH_TERMS - 1}}})?[\s,]*$"
_SEARCH_RE = re.compile(SEARCH_PATTERN)


def object_id(value: Any) -> int:
    """The integer id in a URL, or 404 (JSON) for anything that cannot be a row's id."""
    text = str(value)
    if not text.isascii() or not text.isdigit() or int(text) > MAX_ID:
        raise NotFound(_("No such object: the id must be a whole number from 0 to 2**63 - 1."))
    return int(text)


def check_search(value: str) -> str:
    """``value`` when it is a search the API accepts; else a 400 on ``search`` saying why."""
    if "\x00" in value:
        problem = _("Search text cannot contain NUL characters.")
    elif len(value) > MAX_SEARCH_LENGTH:
        problem = _("Search text is %(length)d characters long; at most %(limit)d are allowed.") % {
            "length": len(value),
            "limit": MAX_SEARCH_LENGTH,
        }
    elif not _SEARCH_RE.match(value):
        problem = _("At most %(limit)d search terms (separated by spaces or commas).") % {
            "limit": MAX_SEARCH_TERMS
        }
    else:
        return value
    raise ValidationError({"search": [problem]})


class BoundedSearchFilter(SearchFilter):
    """DRF's search with :func:`check_search`'s bounds, which the schema also states."""

    def get_search_terms(self, request: Request) -> list[str]:
        check_search(request.query_params.get(self.search_param, ""))
        return super().get_search_terms(request)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.search_param:
                parameter["schema"] = {
                    "type": "string",
                    "maxLength": MAX_SEARCH_LENGTH,
                    "pattern": SEARCH_PATTERN,
                }
                parameter["description"] = (
                    f"Tags whose name contains every term: at most {MAX_SEARCH_TERMS} terms "
                    f"(spaces or commas separate them) and {MAX_SEARCH_LENGTH} characters."
                )
        return parameters
