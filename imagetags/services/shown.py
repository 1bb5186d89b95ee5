"""The signed record of the suggestions a person was shown: what makes feedback trustworthy.

Every suggestion endpoint (the widget's JSON view, the API's two suggestion views, the form's
no-JavaScript second step) returns a *suggestions token* next to the tags: the shown names with
their rank and score, the cluster set that answered and the method that ranked them, signed
with the site's ``SECRET_KEY`` (``django.core.signing``: salted, timestamped, compressed) and
bound to the user who asked. Saving a post hands the token back; only the suggestions inside a
valid token of the same user become feedback rows, so a client can no longer post thousands of
made-up "shown" names into the acceptance rates, and the method and cluster set recorded are
the ones that really answered (not today's setting).

A client may narrow the record (``ShownRecord.narrowed``: the names it still displayed when the
post was saved) but never extend it. The widget asks again as images are added; each request
sends the previous token, and the answer's token covers the new suggestions plus the earlier
ones still under the same cluster set and method (:func:`sign_shown` ``previous``), so the
latest token is all a page has to send.

Limits: at most :data:`MAX_SHOWN_SUGGESTIONS` items per token (the API's largest ``limit``),
valid for ``SUGGESTIONS_TOKEN_MAX_AGE`` seconds. Anonymous users' tokens (``LOGIN_REQUIRED =
False``) are bound to "no user", so they cannot be forged but can be replayed by another
anonymous client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core import signing

from imagetags.conf import imagetags_settings
from imagetags.models import normalize_tag_name

# The most suggestions one answer can show (the API's largest `limit`); a token never holds more.
MAX_SHOWN_SUGGESTIONS = 100

_SALT = "imagetags.services.shown"


class InvalidSuggestionsToken(ValueError):
    """The token cannot be used (tampered, expired, or another user's); the message says so."""


@dataclass(frozen=True)
class ShownSuggestion:
    """A suggestion as it was shown to the person (for feedback records)."""

    name: str
    score: float | None = None
    rank: int | None = None


@dataclass(frozen=True)
class ShownRecord:
    """Suggestions a user was really shown, as read from a valid token (or made by the server)."""

    items: tuple[ShownSuggestion, ...] = ()
    cluster_set_id: int | None = None
    method: str = ""
    token: str = field(default="", compare=False)

    @property
    def names(self) -> list[str]:
        return [item.name for item in self.items]

    def narrowed(self, names: Iterable[str] | None) -> ShownRecord:
        """Only the items among ``names`` (what the client says it still showed); ``None``
        keeps them all. Names outside the record are dropped: a client cannot add any."""
        if names is None:
            return self
        wanted = {normalize_tag_name(name) for name in names}
        return ShownRecord(
            tuple(item for item in self.items if item.name in wanted),
            self.cluster_set_id,
            self.method,
            self.token,
        )


def _user_key(user: Any) -> int | str | None:
    return user.pk if getattr(user, "is_authenticated", False) else None


def sign_shown(
    tags: Sequence[Any],
    *,
    cluster_set_id: int | None,
    method: str,
    user: Any = None,
    previous: str = "",
) -> str:
    """The token for ``tags`` (``SuggestedTag``s, in rank order) shown to ``user``.

    ``previous``: the token of an earlier answer on the same page. Its items that are not among
    ``tags`` are kept after them when it is valid for ``user`` and came from the same cluster set
    and method; otherwise it is ignored (an old or foreign token only loses its own items).
    """
    items = [[tag.name, rank, tag.score] for rank, tag in enumerate(tags, start=1)]
    if previous:
        try:
            earlier = read_token(previous, user)
        except InvalidSuggestionsToken:
            earlier = None
        if earlier and (earlier.cluster_set_id, earlier.method) == (cluster_set_id, method):
            present = {tag.name for tag in tags}
            items += [
                [item.name, item.rank, item.score]
                for item in earlier.items
                if item.name not in present
            ]
    payload = {
        "u": _user_key(user),
        "c": cluster_set_id,
        "m": method,
        "t": items[:MAX_SHOWN_SUGGESTIONS],
    }
    return signing.dumps(payload, salt=_SALT, compress=True)


def read_token(token: str, user: Any = None) -> ShownRecord:
    """The record a token holds; :class:`InvalidSuggestionsToken` if it was tampered with, has
    expired (``SUGGESTIONS_TOKEN_MAX_AGE``) or belongs to another user."""
    max_age = imagetags_settings.SUGGESTIONS_TOKEN_MAX_AGE
    try:
        payload = signing.loads(token, salt=_SALT, max_age=max_age)
    except signing.SignatureExpired:
        raise InvalidSuggestionsToken(
            f"The suggestions token has expired (it is valid for {max_age} seconds); "
            "ask for suggestions again."
        ) from None
    except signing.BadSignature:
        raise InvalidSuggestionsToken(
            "The suggestions token is not valid: send the suggestions_token of a suggestion "
            "response unchanged."
        ) from None
    if not isinstance(payload, dict) or payload.get("u") != _user_key(user):
        raise InvalidSuggestionsToken(
            "The suggestions token was issued to another user; ask for suggestions again."
        )
    items = tuple(
        ShownSuggestion(name=str(name), rank=rank, score=score)
        for name, rank, score in payload.get("t", [])[:MAX_SHOWN_SUGGESTIONS]
    )
    return ShownRecord(items, payload.get("c"), str(payload.get("m") or ""), token)
