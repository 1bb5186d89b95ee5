"""Data model: a library of posts with images and tags, and versioned clusterings of it.

A *post* groups images that share one set of tags (a gallery, an article, a product). Tag
frequencies count posts, not images, so one 9-image post cannot outvote nine 1-image posts.

A *ClusterSet* is one clustering of the library's feature vectors. Rebuilds write a new set in
status ``building`` and switch it to ``active`` in one transaction; readers only ever look at the
active set, so they never see a half-built one, and older sets are kept (``retired``) for rollback.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q
from django.db.models.fields.files import ImageFieldFile
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext_lazy as _

TAG_NAME_MAX_LENGTH = 100
_WHITESPACE = re.compile(r"\s+")


def normalize_tag_name(name: str) -> str:
    """Trim, lowercase and collapse inner whitespace: ``"  Cuba   Libre "`` -> ``"cuba libre"``."""
    return _WHITESPACE.sub(" ", str(name)).strip().lower()


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
        self.name = normalize_tag_name(self.name)
        if not self.slug:
            self.slug = self._unique_slug()
        super().save(*args, **kwargs)

    def _unique_slug(self) -> str:
        # Different names can share a slug ("c++" and "c"): suffix until free.
        base = slugify(self.name, allow_unicode=True)[:TAG_NAME_MAX_LENGTH] or "tag"
        slug, n = base, 1
        while Tag.objects.filter(slug=slug).exclude(pk=self.pk).exists():
            n += 1
            slug = f"{base}-{n}"
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
        from imagetags.services.images import stored_extension

        super().save(safe_upload_name(name, stored_extension(content)), content, save)


class StoredImageField(models.ImageField):
    attr_class = StoredImageFieldFile

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
            from imagetags.services.images import file_sha256

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
    """One batch of files the upload form keeps between its two steps (``forms.PendingUpload``).

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
