"""Uploads kept between the two steps of the no-JavaScript upload form.

Without JavaScript the upload form (``imagetags.forms.PostUploadForm``) works in two steps:
*upload → suggestions as checkboxes → save*. Between the steps the files are kept by
:class:`PendingUpload`, in a folder of the default storage (``PENDING_UPLOAD_TO``), named by
random ids; the page carries a signed, timestamped token that lists them. This was chosen over
saving the post first as a "draft" because a draft would be a real Post: it would need a status
column, would appear in galleries, frequencies and the API until finished, and an abandoned draft
would have to be found and deleted. Kept files are invisible to everything else, are deleted when
the post is saved, and expired ones (older than ``PENDING_UPLOAD_MAX_AGE``) are swept at the next
upload. The same mechanism keeps the images when a submission with valid images fails on another
field, so nobody has to choose them again.

Each batch also has a :class:`~imagetags.models.PendingUploadBatch` row: the post's transaction
claims it with a conditional update, so a token makes at most one post however often it is sent
at once; it names its owner (the user, or for anonymous visitors a random key kept in their
session), so a token works only where it was made; and it lets the owner's kept files be bounded
(``MAX_PENDING_UPLOADS_PER_USER``, oldest batches dropped first).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core import signing
from django.core.files import File
from django.core.files.storage import Storage
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from imagetags.conf import imagetags_settings
from imagetags.images import stored_extension
from imagetags.models import PendingUploadBatch, StockImage
from imagetags.services.posts import discard_files_on_error

logger = logging.getLogger(__name__)

__all__ = [
    "PendingUpload",
    "PendingUploadError",
    "purge_expired_pending_uploads",
]


class PendingUploadError(ValueError):
    """A kept upload cannot be used; the message says why and what to do."""


# The salt names the module this code first lived in; changing it would void the tokens of
# pages open while a site upgrades.
_PENDING_SALT = "imagetags.forms.PendingUpload"


def _pending_storage() -> Storage:
    # The storage the post's images will go to, so the files live where they will end up.
    return StockImage._meta.get_field("image").storage


def _extension(upload: Any) -> str:
    # The format's, read from the bytes (never the client's file name), as for StockImage files.
    return stored_extension(upload)


@dataclass(frozen=True)
class PendingUpload:
    """Uploaded files kept between the two steps of the form (see the module docstring).

    ``files`` pairs the stored name with the name the person's file had; ``token`` is what the
    page carries: signed and timestamped, so it cannot be forged, pointed at other files, used
    by another user, or used after ``PENDING_UPLOAD_MAX_AGE``.
    """

    token: str
    files: tuple[tuple[str, str], ...]
    #: The batch's id: its :class:`~imagetags.models.PendingUploadBatch` row.
    batch: str = ""

    @classmethod
    def store(cls, uploads: Sequence[Any], user: Any = None, session: Any = None) -> PendingUpload:
        """Keep already validated uploads; all or nothing.

        The token is bound to ``user``, or for an anonymous visitor to ``session`` (a random key
        kept in it); then the owner's oldest batches beyond ``MAX_PENDING_UPLOADS_PER_USER``
        files are dropped.
        """
        purge_expired_pending_uploads()
        storage = _pending_storage()
        folder = imagetags_settings.PENDING_UPLOAD_TO
        batch = secrets.token_hex(16)
        owner = _owner_key(user, session, create=True)
        kept: list[tuple[str, str]] = []
        with discard_files_on_error(storage) as stored:
            for index, upload in enumerate(uploads):
                name = storage.save(f"{folder}{batch}-{index}.{_extension(upload)}", upload)
                stored.append(name)
                original = (getattr(upload, "name", "") or name).replace("\\", "/").rsplit("/")[-1]
                kept.append((name, original))
            PendingUploadBatch.objects.create(
                batch=batch, owner=owner, names=[name for name, _original in kept]
            )
        if owner:
            _drop_beyond_bound(owner)
        payload = {"u": owner or None, "b": batch, "f": kept}
        token = signing.dumps(payload, salt=_PENDING_SALT, compress=True)
        return cls(token, tuple(kept), batch)

    @classmethod
    def load(cls, token: str, user: Any = None, session: Any = None) -> PendingUpload:
        """The kept upload a token names; :class:`PendingUploadError` if it cannot be used."""
        max_age = imagetags_settings.PENDING_UPLOAD_MAX_AGE
        try:
            payload = signing.loads(token, salt=_PENDING_SALT, max_age=max_age)
        except signing.SignatureExpired:
            raise PendingUploadError(
                _("Your images from the previous step have expired; choose them again.")
            ) from None
        except signing.BadSignature:
            raise PendingUploadError(
                _("The kept images could not be found; choose them again.")
            ) from None
        folder = imagetags_settings.PENDING_UPLOAD_TO
        files = tuple((str(stored), str(original)) for stored, original in payload.get("f", []))
        batch = str(payload.get("b") or "")
        owner = _owner_key(user, session)
        if (
            not batch  # a token of an older version, before batches were recorded
            or not hmac.compare_digest(str(payload.get("u") or ""), owner)
            or not all(stored.startswith(folder) for stored, _original in files)
        ):
            raise PendingUploadError(_("The kept images could not be found; choose them again."))
        storage = _pending_storage()
        record = PendingUploadBatch.objects.filter(batch=batch).first()
        if (
            record is None
            or not files
            or not all(storage.exists(stored) for stored, _original in files)
        ):
            raise PendingUploadError(_GONE)
        if record.claimed is not None:
            raise PendingUploadError(_ALREADY_SAVED)
        return cls(token, files, batch)

    def claim(self) -> None:
        """Take these files for one post: call inside the post's transaction, before it writes.

        A conditional update (``claimed`` still empty) lets exactly one of any number of
        simultaneous submissions through: the others wait for its transaction and then find
        the batch claimed (:class:`PendingUploadError`, "already saved"). If the post's
        transaction rolls back, so does the claim, and the token can be used again.
        """
        taken = PendingUploadBatch.objects.filter(batch=self.batch, claimed__isnull=True).update(
            claimed=timezone.now()
        )
        if not taken:
            gone = not PendingUploadBatch.objects.filter(batch=self.batch).exists()
            raise PendingUploadError(_GONE if gone else _ALREADY_SAVED)

    def open(self) -> list[File]:
        """The kept files, opened, under the names the person's files had; the caller closes
        them. :class:`PendingUploadError` if they are gone since the token was checked."""
        storage = _pending_storage()
        try:
            return [
                File(storage.open(stored, "rb"), name=original) for stored, original in self.files
            ]
        except FileNotFoundError:  # swept as expired, or saved, since the token was checked
            raise PendingUploadError(_GONE) from None

    def previews(self) -> list[dict[str, str]]:
        """Name and URL of each kept file, for thumbnails on the second step."""
        storage = _pending_storage()
        out = []
        for stored, original in self.files:
            try:
                url = storage.url(stored)
            except NotImplementedError:  # a storage without URLs: names only
                url = ""
            out.append({"name": original, "url": url})
        return out

    def discard(self) -> None:
        """Delete the kept files; the batch's row goes too unless a post claimed it (the row
        then says "already saved" to a late resubmission until the batch expires)."""
        PendingUploadBatch.objects.filter(batch=self.batch, claimed__isnull=True).delete()
        _delete_files(name for name, _original in self.files)


_GONE = _(
    "Your images from the previous step are gone (already saved or expired); choose them again."
)
_ALREADY_SAVED = _(
    "These images were already saved as a post (the form was sent more than once); "
    "no second post was made."
)
# The random key that binds an anonymous visitor's kept uploads to their session.
_SESSION_OWNER = "imagetags_pending_owner"


def _owner_key(user: Any, session: Any = None, *, create: bool = False) -> str:
    """Whose kept uploads these are: "u:<pk>" for a user; for an anonymous visitor
    "s:<hash of a random key in their session>" (made when ``create``); "" without a session
    (a form built without one: bound to nobody, as before sessions were used)."""
    if getattr(user, "is_authenticated", False):
        return f"u:{user.pk}"
    if session is None:
        return ""
    secret = session.get(_SESSION_OWNER)
    if not secret:
        if not create:
            return "s:none"  # no key yet: matches no token
        secret = session[_SESSION_OWNER] = secrets.token_urlsafe(24)
    return "s:" + hashlib.sha256(str(secret).encode()).hexdigest()[:32]


def _delete_files(names: Iterable[str]) -> None:
    storage = _pending_storage()
    for name in names:
        try:
            storage.delete(name)
        except OSError:  # a leftover file is swept once it expires
            logger.warning("Could not delete kept upload %s", name, exc_info=True)


def _drop_beyond_bound(owner: str) -> None:
    """Drop ``owner``'s oldest unsaved batches beyond ``MAX_PENDING_UPLOADS_PER_USER`` files.

    Dropping the oldest rather than refusing the newest: a person who abandoned a few second
    steps (the back button, another tab) can still upload, and storage stays bounded either
    way. The newest batch is always kept. Runs after the new batch is committed, so that
    simultaneous uploads of one owner all see each other; each drop is a conditional delete,
    so a batch being saved as a post right now (claimed) is never dropped.
    """
    bound = int(imagetags_settings.MAX_PENDING_UPLOADS_PER_USER)
    batches = PendingUploadBatch.objects.filter(owner=owner, claimed__isnull=True).order_by(
        "-created", "-pk"
    )
    kept = 0
    for index, record in enumerate(batches.values_list("pk", "names")):
        pk, names = record
        kept += len(names)
        if index == 0 or kept <= bound:
            continue
        if PendingUploadBatch.objects.filter(pk=pk, claimed__isnull=True).delete()[0]:
            _delete_files(names)


def purge_expired_pending_uploads() -> int:
    """Delete kept files older than ``PENDING_UPLOAD_MAX_AGE`` (abandoned second steps)."""
    storage = _pending_storage()
    folder = imagetags_settings.PENDING_UPLOAD_TO
    cutoff = timezone.now() - timedelta(seconds=imagetags_settings.PENDING_UPLOAD_MAX_AGE)
    # Their tokens have expired too, so nothing can ask about these batches any more.
    PendingUploadBatch.objects.filter(created__lt=cutoff).delete()
    try:
        _dirs, names = storage.listdir(folder)
    except (FileNotFoundError, NotImplementedError):
        return 0
    removed = 0
    for name in names:
        try:
            if storage.get_modified_time(folder + name) < cutoff:
                storage.delete(folder + name)
                removed += 1
        except (OSError, NotImplementedError):  # raced with another request, or unsupported
            continue
    return removed
