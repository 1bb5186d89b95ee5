"""Data model: a library of posts with images and tags, and versioned clusterings of it.

A *post* groups images that share one set of tags (a gallery, an article, a product). Tag
frequencies count posts, not images, so one 9-image post cannot outvote nine 1-image posts.

A *ClusterSet* is one clustering of the library's feature vectors. Rebuilds write a new set in
status ``building`` and switch it to ``active`` in one transaction; readers only ever look at the
active set, so they never see a half-built one, and older sets are kept (``retired``) for rollback.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.db.models.fields.files import ImageFieldFile
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext_lazy as _

from imagetags.images import InvalidImage, file_sha256, open_image, stored_extension

TAG_NAME_MAX_LENGTH = 100
_WHITESPACE = re.compile(r"\s+")

# Characters that only hide text and carry no meaning in a name: stripped, so that "food" and
# "food\u200b" are one tag. Soft hyphen, Mongolian vowel separator, zero-width space, word
# joiner, invisible math operators, byte-order mark (zero-width no-break space).
_HIDDEN = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u2060\u2061\u2062\u2063\u2064\ufeff"))
# Zero-width non-joiner and joiner do carry meaning: Persian and Indic scripts need them inside
# words (Persian "می\u200cخواهم", Devanagari half forms), and emoji sequences are glued with ZWJ
# ("👩\u200d💻"). Between two visible characters they stay; anywhere else (at the ends, next to a
# space or to another invisible character) they can only hide text, so they are stripped.
JOINERS = frozenset("\u200c\u200d")
# Unicode categories refused in tag names: control (Cc), format (Cf: bidi overrides such as
# U+202E, LRM/RLM, the "tag characters" U+E0000 block), private use (Co) and surrogates (Cs).
# They are invisible or render differently per font, so two names that look the same could be
# two tags, and a bidi override makes the admin show text in another order than it is stored.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs"})
# Categories a joiner may stand next to: anything visible (letters, marks such as a virama or
# an emoji's variation selector, digits, symbols, punctuation), not spaces or refused characters.
_NOT_VISIBLE = REFUSED_CATEGORIES | {"Zs", "Zl", "Zp"}


def _visible(ch: str) -> bool:
    return not ch.isspace() and unicodedata.category(ch) not in _NOT_VISIBLE


def _strip_loose_joiners(text: str) -> str:
    if not JOINERS.intersection(text):
        return text
    kept = []
    for i, ch in enumerate(text):
        if ch in JOINERS and not (
            0 < i < len(text) - 1 and _visible(text[i - 1]) and _visible(text[i + 1])
        ):
            continue
        kept.append(ch)
    return "".join(kept)


def normalize_tag_name(name: str) -> str:
    """The form a tag name is stored in: NFKC, hidden characters stripped, inner whitespace
    collapsed, trimmed, lowercase: ``"  Cuba\u00a0  Libre\u200b "`` -> ``"cuba libre"``.

    Characters that are refused rather than stripped (see :func:`tag_name_error`) are kept, so
    the error can name them. Normalising a normalised name changes nothing.
    """
    text = unicodedata.normalize("NFKC", str(name)).translate(_HIDDEN)
    text = _WHITESPACE.sub(" ", _strip_loose_joiners(text)).strip().lower()
    # Lowercasing can leave a string that NFKC would write differently; normalise once more.
    return unicodedata.normalize("NFKC", text)


def _describe(ch: str) -> str:
    code = f"U+{ord(ch):04X}"
    name = unicodedata.name(ch, "")
    if name:
        return f"{code} {name}"
    category = unicodedata.category(ch)
    kind = {"Cc": "a control character", "Co": "a private-use character", "Cs": "a surrogate"}
    return f"{code} ({kind.get(category, 'an invisible character')})"


def tag_name_error(name: str) -> str | None:
    """Why a *normalised* name cannot be a tag name, or ``None`` when it can.

    Any visible text is allowed (it is always shown escaped); empty and invisible names, names
    over ``TAG_NAME_MAX_LENGTH`` and names with characters of ``REFUSED_CATEGORIES`` are not.
    """
    if not name:
        return "A tag name cannot be empty or invisible."
    if len(name) > TAG_NAME_MAX_LENGTH:
        return (
            f"Tag names are at most {TAG_NAME_MAX_LENGTH} characters; "
            f"{name[:20]!r}… has {len(name)}."
        )
    for ch in name:
        if ch not in JOINERS and unicodedata.category(ch) in REFUSED_CATEGORIES:
            # repr() escapes the character, so a bidi override cannot reorder the message.
            return f"Tag name {name!r} contains {_describe(ch)}, which is not allowed in tags."
    return None


class InvalidTagName(ValueError):
    """A tag name that cannot be stored; the message says why."""


class Tag(models.Model):
    name = models.CharField(_("name"), max_length=TAG_NAME_MAX_LENGTH, unique=True)
    slug = models.SlugField(_("slug"), max_length=TAG_NAME_MAX_LENGTH + 10, unique=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("tag")
        verbose_name_plural = _("tags")

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        # The last line of defence: every path checks names before, but nothing may store one
        # that the checks would refuse (Tag.objects.create included).
        self.name = normalize_tag_name(self.name)
        error = tag_name_error(self.name)
        if error:
            raise InvalidTagName(error)
        if self.slug:
            super().save(*args, **kwargs)
            return
        self.slug = self._unique_slug()
        try:
            # A savepoint, so that losing a race keeps the caller's transaction usable.
            with transaction.atomic():
                super().save(*args, **kwargs)
        except IntegrityError:
            # Another request stored a different name with the same slug between the check
            # and the insert ("c" and "c++" at once). The same name is the caller's race to
            # settle (get_or_create does); a slug collision is ours: the name's own suffix.
            if Tag.objects.filter(name=self.name).exclude(pk=self.pk).exists():
                self.slug = ""
                raise
            self.slug = self._unique_slug(skip_plain=True)
            super().save(*args, **kwargs)

    def clean(self) -> None:
        # Normalised here too, so that ModelForm's uniqueness check sees the stored name.
        self.name = normalize_tag_name(self.name)
        error = tag_name_error(self.name)
        if error:
            raise ValidationError({"name": error})

    def _unique_slug(self, *, skip_plain: bool = False) -> str:
        # Different names can share a slug ("c++" and "c"; every punctuation-only name is
        # "tag"). On a collision the suffix comes from the name itself, so it is free at once
        # (two queries, whatever the number of tags sharing the base); counting only happens
        # when two names share both the base and the hash.
        base = slugify(self.name, allow_unicode=True)[:TAG_NAME_MAX_LENGTH] or "tag"
        taken = Tag.objects.exclude(pk=self.pk).filter
        if not skip_plain and not taken(slug=base).exists():
            return base
        digest = hashlib.sha256(self.name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        slug = f"{base}-{digest}"
        n = 1
        while taken(slug=slug).exists():
            n += 1
            slug = f"{base[: TAG_NAME_MAX_LENGTH - 6]}-{digest}-{n}"
        return slug


class TagSource(models.TextChoices):
    TYPED = "typed", _("typed by a user")
    SUGGESTED = "suggested", _("accepted suggestion")
    AUTO = "auto", _("auto-applied")
    IMPORTED = "imported", _("imported")


class Post(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("owner"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="imagetags_posts",
    )
    # Who uploaded an imported post in its source system ("flickr:123"); lets evaluation and
    # ranking count one vote per uploader without creating site users for them.
    external_owner = models.CharField(_("external owner"), max_length=200, blank=True)
    # The manifest's post key for imported posts, so a second import finds the same post.
    import_key = models.CharField(_("import key"), max_length=300, blank=True, db_index=True)
    title = models.CharField(_("title"), max_length=200, blank=True)
    created = models.DateTimeField(_("created"), default=timezone.now, db_index=True)
    tags = models.ManyToManyField(Tag, through="PostTag", related_name="posts", blank=True)

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name = _("post")
        verbose_name_plural = _("posts")

    def __str__(self) -> str:
        return self.title or f"Post {self.pk}"


class PostTagQuerySet(models.QuerySet):
    def counted(self) -> PostTagQuerySet:
        """The tags that count as a post's tags for suggestions: sources in
        ``COUNTED_TAG_SOURCES`` (auto-applied tags are not, so suggestions never feed on
        themselves). The one place that reads the setting."""
        from imagetags.conf import imagetags_settings

        return self.filter(source__in=list(imagetags_settings.COUNTED_TAG_SOURCES))


class PostTag(models.Model):
    post = models.ForeignKey(Post, on_delete=models.CASCADE, related_name="post_tags")
    tag = models.ForeignKey(Tag, on_delete=models.CASCADE, related_name="post_tags")
    source = models.CharField(
        _("source"), max_length=16, choices=TagSource.choices, default=TagSource.TYPED
    )
    added_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(_("created"), default=timezone.now)

    objects = PostTagQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["post", "tag"], name="imagetags_posttag_unique"),
        ]
        verbose_name = _("post tag")
        verbose_name_plural = _("post tags")

    def __str__(self) -> str:
        return f"{self.tag} on {self.post} ({self.source})"


class FeatureStatus(models.TextChoices):
    PENDING = "pending", _("pending")
    READY = "ready", _("ready")
    FAILED = "failed", _("failed")
    # No longer written: staleness is derived from the key (migration 0005 turned old rows back
    # into ready). Kept so the field's choices, and old fixtures, stay valid.
    STALE = "stale", _("stale (extractor changed)")


# Longest stored base name, in UTF-8 bytes: file systems refuse names over 255 bytes, and the
# storage may still add a suffix to make a name unique.
UPLOAD_NAME_MAX_BYTES = 120


def stock_image_upload_to(instance: StockImage, filename: str) -> str:
    """Where a StockImage file goes: the ``UPLOAD_TO`` folder and the base name that
    :class:`StoredImageFieldFile` made (:func:`safe_upload_name`, extension from the bytes)."""
    from imagetags.conf import imagetags_settings

    return timezone.now().strftime(imagetags_settings.UPLOAD_TO) + filename


def safe_upload_name(filename: str, extension: str) -> str:
    """The base name a file is stored under: the client's name, made safe, with ``extension``.

    ``extension`` is that of the format read from the file's bytes; the client's own extension
    is dropped, because web servers pick the Content-Type from it (a PNG named ``evil.html``
    would be served as a page). Only the last path component counts: ``"../x.jpg"`` or
    ``"/etc/x.jpg"`` must not pick the folder. NUL bytes and leading dots go, dots inside the
    stem become ``_`` (``x.php.png`` runs as PHP on some Apache set-ups), and long names are
    shortened.
    """
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].replace("\x00", "")
    name = name.strip().lstrip(".").strip()
    stem, dot, _client_extension = name.rpartition(".")
    if not dot:
        stem = name
    stem = stem.replace(".", "_").strip()
    budget = UPLOAD_NAME_MAX_BYTES - len(extension.encode()) - 1
    stem = stem.encode()[:budget].decode("utf-8", "ignore").strip()
    return f"{stem or 'image'}.{extension}"


class StoredImageFieldFile(ImageFieldFile):
    """A StockImage file, named on save with the extension of the format detected from its
    bytes. Every way a file is saved (assigning it and saving the row, as forms, the API and
    the admin do, or ``row.image.save(name, content)``) comes through here, so no path can
    store a client's extension; a file whose format cannot be detected raises
    ``images.InvalidImage`` before anything is written."""

    def save(self, name: str, content: Any, save: bool = True) -> None:
        super().save(safe_upload_name(name, stored_extension(content)), content, save)


class UploadRulesImageFormField(forms.ImageField):
    """The form field of a StockImage file (the admin's forms, a site's ModelForms): the upload
    rules of every other path (``images.open_image``: ALLOWED_FORMATS, MAX_UPLOAD_BYTES,
    MAX_PIXELS, MAX_FRAMES, truncated files), on top of Django's own image check, which lets
    through anything Pillow opens, up to Pillow's own, much higher, pixel ceiling."""

    def to_python(self, data: Any) -> Any:
        upload = super().to_python(data)
        if upload is None:
            return None
        try:
            open_image(upload)
        except InvalidImage as exc:
            raise ValidationError(str(exc), code="invalid_image") from None
        finally:
            if hasattr(upload, "seek"):
                upload.seek(0)
        return upload


class StoredImageField(models.ImageField):
    attr_class = StoredImageFieldFile

    def formfield(self, **kwargs: Any) -> Any:
        return super().formfield(**{"form_class": UploadRulesImageFormField, **kwargs})

    def deconstruct(self) -> tuple[str, str, list[Any], dict[str, Any]]:
        # The column and its options are a plain ImageField's; only the naming on save
        # differs, which migrations need not know about.
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.ImageField", args, kwargs


class StockImage(models.Model):
    post = models.ForeignKey(Post, on_delete=models.CASCADE, related_name="images")
    image = StoredImageField(
        _("image"),
        upload_to=stock_image_upload_to,
        width_field="width",
        height_field="height",
        max_length=500,
    )
    sha256 = models.CharField(_("SHA-256"), max_length=64, db_index=True, editable=False)
    width = models.PositiveIntegerField(_("width"), null=True, editable=False)
    height = models.PositiveIntegerField(_("height"), null=True, editable=False)
    created = models.DateTimeField(_("created"), default=timezone.now, db_index=True)

    feature_status = models.CharField(
        _("feature status"),
        max_length=16,
        choices=FeatureStatus.choices,
        default=FeatureStatus.PENDING,
        db_index=True,
        editable=False,
    )
    feature_error = models.TextField(_("feature error"), blank=True, editable=False)
    feature_attempts = models.PositiveSmallIntegerField(
        _("feature attempts"), default=0, editable=False
    )
    # L2-normalised float32 vector (see services.vectors), valid only for `extractor_key`.
    vector = models.BinaryField(_("feature vector"), null=True, editable=False)
    extractor_key = models.CharField(
        _("extractor key"), max_length=300, blank=True, db_index=True, editable=False
    )
    features_updated = models.DateTimeField(_("features updated"), null=True, editable=False)

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name = _("stock image")
        verbose_name_plural = _("stock images")
        indexes = [models.Index(fields=["feature_status", "extractor_key"])]

    def __str__(self) -> str:
        return self.image.name.rsplit("/", 1)[-1] if self.image else f"Image {self.pk}"

    def save(self, *args, **kwargs) -> None:
        # Cheap derived columns only: the checksum of a new file and resetting its features.
        # The features themselves are computed by a background task (signal_handlers.py).
        changed = self.file_changed
        if changed and self.image:
            self.sha256 = file_sha256(self.image)
            self.feature_status = FeatureStatus.PENDING
            self.feature_error = ""
            self.feature_attempts = 0
            self.vector = None
            self.extractor_key = ""
            self.features_updated = None
            update_fields = kwargs.get("update_fields")
            if update_fields is not None:
                kwargs["update_fields"] = set(update_fields) | {
                    "sha256",
                    "feature_status",
                    "feature_error",
                    "feature_attempts",
                    "vector",
                    "extractor_key",
                    "features_updated",
                    "width",
                    "height",
                }
        super().save(*args, **kwargs)
        self._loaded_image_name = str(self.image)

    @classmethod
    def from_db(cls, db, field_names, values):
        instance = super().from_db(db, field_names, values)
        # Remember the stored file so save() can tell a new file from an unchanged one.
        instance._loaded_image_name = instance.__dict__.get("image")
        return instance

    @property
    def file_changed(self) -> bool:
        return self.pk is None or str(self.image) != str(getattr(self, "_loaded_image_name", ""))


class ClusterSetStatus(models.TextChoices):
    BUILDING = "building", _("building")
    ACTIVE = "active", _("active")
    RETIRED = "retired", _("retired")
    FAILED = "failed", _("failed")


class ClusterSetQuerySet(models.QuerySet):
    def active(self) -> ClusterSet | None:
        return self.filter(status=ClusterSetStatus.ACTIVE).first()


class ClusterSet(models.Model):
    """One clustering of the library: its parameters, quality figures and lifecycle status."""

    status = models.CharField(
        _("status"),
        max_length=16,
        choices=ClusterSetStatus.choices,
        default=ClusterSetStatus.BUILDING,
        db_index=True,
    )
    extractor_key = models.CharField(_("extractor key"), max_length=300)
    algorithm = models.CharField(_("algorithm"), max_length=32)
    k = models.PositiveIntegerField(_("K"))
    dim = models.PositiveIntegerField(_("dimensions"))
    params = models.JSONField(_("parameters"), default=dict, blank=True)
    n_images = models.PositiveIntegerField(_("images"), default=0)
    n_posts = models.PositiveIntegerField(_("posts"), default=0)
    iterations = models.PositiveIntegerField(_("iterations"), null=True, blank=True)
    inertia = models.FloatField(_("inertia"), null=True, blank=True)
    duration_seconds = models.FloatField(_("duration (s)"), null=True, blank=True)
    warm_started_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error = models.TextField(_("error"), blank=True)
    # Where a building set has got to (0..1 and a sentence), for the admin's progress display;
    # `heartbeat` is touched as the rebuild advances, so a killed one can be told from a slow one.
    progress = models.FloatField(_("progress"), default=0.0)
    progress_message = models.CharField(_("progress message"), max_length=300, blank=True)
    heartbeat = models.DateTimeField(_("heartbeat"), null=True, blank=True)
    created = models.DateTimeField(_("created"), default=timezone.now)
    activated = models.DateTimeField(_("activated"), null=True, blank=True)
    # The library-wide tag shares voting subtracts, computed by the worker (services.priors):
    # {"n_images": members they were computed over, "shares": {vote_by: {tag: share}}}.
    priors = models.JSONField(_("tag shares"), default=dict, blank=True, editable=False)

    objects = ClusterSetQuerySet.as_manager()

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name = _("cluster set")
        verbose_name_plural = _("cluster sets")
        constraints = [
            # At most one active set, enforced by the database (a partial unique index).
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status="active"),
                name="imagetags_one_active_clusterset",
            ),
        ]

    def __str__(self) -> str:
        return f"Cluster set {self.pk} ({self.status}, K={self.k})"

    def report_progress(self, fraction: float, message: str) -> None:
        """Record how far a rebuild has got (written at once, outside any open transaction)."""
        self.progress, self.progress_message = max(0.0, min(1.0, fraction)), message[:300]
        self.heartbeat = timezone.now()
        ClusterSet.objects.filter(pk=self.pk).update(
            progress=self.progress, progress_message=self.progress_message, heartbeat=self.heartbeat
        )

    def activate(self) -> None:
        """Make this set the one suggestions use; retire the previously active one, atomically."""
        with transaction.atomic():
            ClusterSet.objects.select_for_update().filter(status=ClusterSetStatus.ACTIVE).exclude(
                pk=self.pk
            ).update(status=ClusterSetStatus.RETIRED)
            self.status = ClusterSetStatus.ACTIVE
            self.activated = timezone.now()
            self.save(update_fields=["status", "activated"])


class Cluster(models.Model):
    cluster_set = models.ForeignKey(ClusterSet, on_delete=models.CASCADE, related_name="clusters")
    index = models.PositiveIntegerField(_("index"))
    centroid = models.BinaryField(_("centroid"))  # L2-normalised float32, see services.vectors
    size = models.PositiveIntegerField(_("images"), default=0)
    post_count = models.PositiveIntegerField(_("posts"), default=0)

    class Meta:
        ordering = ["cluster_set", "index"]
        verbose_name = _("cluster")
        verbose_name_plural = _("clusters")
        constraints = [
            models.UniqueConstraint(
                fields=["cluster_set", "index"], name="imagetags_cluster_unique_index"
            ),
        ]

    def __str__(self) -> str:
        return f"Cluster {self.index} of set {self.cluster_set_id}"


class ClusterMembership(models.Model):
    """Which cluster of a set an image belongs to. One row per (set, image)."""

    cluster_set = models.ForeignKey(ClusterSet, on_delete=models.CASCADE, related_name="+")
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="memberships")
    image = models.ForeignKey(
        StockImage, on_delete=models.CASCADE, related_name="cluster_memberships"
    )
    similarity = models.FloatField(_("similarity to centre"))

    class Meta:
        verbose_name = _("cluster membership")
        verbose_name_plural = _("cluster memberships")
        constraints = [
            models.UniqueConstraint(
                fields=["cluster_set", "image"], name="imagetags_membership_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.image_id} in {self.cluster}"


class TagFrequency(models.Model):
    """How many posts of a cluster carry a tag (each post counted once, however many images)."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="tag_frequencies")
    tag = models.ForeignKey(Tag, on_delete=models.CASCADE, related_name="frequencies")
    post_count = models.PositiveIntegerField(_("posts"))

    class Meta:
        ordering = ["cluster", "-post_count", "tag__name"]
        verbose_name = _("tag frequency")
        verbose_name_plural = _("tag frequencies")
        constraints = [
            models.UniqueConstraint(fields=["cluster", "tag"], name="imagetags_tagfreq_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.tag} × {self.post_count} in {self.cluster}"


class FeedbackChannel(models.TextChoices):
    WIDGET = "widget", _("upload widget")
    FORM = "form", _("form without JavaScript")
    API = "api", _("REST API")


class SuggestionFeedback(models.Model):
    """One suggested tag shown to a person, and whether they took it.

    The acceptance rate per tag and overall is the recommender's real-world precision; the admin
    shows it and ``evaluate_suggestions --from-feedback`` reports it.
    """

    post = models.ForeignKey(
        Post, null=True, blank=True, on_delete=models.SET_NULL, related_name="suggestion_feedback"
    )
    tag = models.ForeignKey(Tag, on_delete=models.CASCADE, related_name="suggestion_feedback")
    accepted = models.BooleanField(_("accepted"))
    score = models.FloatField(_("score"), null=True, blank=True)
    rank = models.PositiveSmallIntegerField(_("rank"), null=True, blank=True)
    cluster_set = models.ForeignKey(
        ClusterSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    method = models.CharField(_("method"), max_length=32, blank=True)
    channel = models.CharField(_("channel"), max_length=16, choices=FeedbackChannel.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(_("created"), default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created", "-pk"]
        verbose_name = _("suggestion feedback")
        verbose_name_plural = _("suggestion feedback")
        indexes = [models.Index(fields=["tag", "accepted"])]

    def __str__(self) -> str:
        return f"{self.tag} {'accepted' if self.accepted else 'rejected'} ({self.channel})"


class RebuildLock(models.Model):
    """Who is rebuilding the clusters right now, on databases without advisory locks (SQLite).

    The row exists only while a rebuild runs; its primary key makes taking it atomic. A rebuild
    that was killed leaves its row behind, and the next one takes it over once the owner is
    known to be dead (see ``services/locks.py``). PostgreSQL uses an advisory lock instead, which
    the server itself releases when the owner's connection goes away.

    On every database, a row named ``rebuild_queued`` is the one place of a rebuild queued by the
    admin's button, so that repeated clicks queue one task (``locks.reserve_queued_rebuild``).
    """

    name = models.CharField(_("name"), max_length=64, primary_key=True)
    # "<host>:<pid>:<token>", so that a dead owner on this host can be recognised at once.
    owner = models.CharField(_("owner"), max_length=200)
    acquired = models.DateTimeField(_("acquired"), default=timezone.now)
    # The set being built, whose heartbeat tells a slow rebuild from a dead one.
    cluster_set = models.ForeignKey(
        ClusterSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        verbose_name = _("rebuild lock")
        verbose_name_plural = _("rebuild locks")

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner}"


class PendingUploadBatch(models.Model):
    """One batch of files the upload form keeps between its two steps
    (``services.pending_uploads.PendingUpload``).

    The files live in storage; this row says whose they are (for the per-user bound,
    ``MAX_PENDING_UPLOADS_PER_USER``) and whether a post was made from them: ``claimed`` is set
    in the post's own transaction by a conditional update, so a token makes at most one post
    however often it is submitted at once. Rows go when their batch expires.
    """

    batch = models.CharField(_("batch"), max_length=32, unique=True)
    # "u:<user pk>", "s:<hash of a random key in the session>", or "" (not bound to anyone).
    owner = models.CharField(_("owner"), max_length=80, db_index=True, blank=True)
    names = models.JSONField(_("stored names"), default=list)
    created = models.DateTimeField(_("created"), default=timezone.now, db_index=True)
    claimed = models.DateTimeField(_("claimed"), null=True, blank=True)

    class Meta:
        verbose_name = _("pending upload")
        verbose_name_plural = _("pending uploads")

    def __str__(self) -> str:
        return f"pending upload {self.batch} ({len(self.names)} files)"
