"""Importing a library of tagged images from a JSON Lines manifest.

One line per image::

    {"path": "images/0001.jpg", "tags": ["ramen", "noodles"], "post": "p17", "owner": "flickr:42"}

- ``path`` is relative to the manifest's folder and must stay inside it (after resolving symlinks).
- Images with the same non-null ``post`` form one post whose tags are the union of their lines'
  tags; ``post: null`` (or no ``post``) makes the image a post of its own.
- ``owner`` is the uploader in the source system, stored as ``Post.external_owner``.

:func:`parse_manifest` checks every line without touching the database or decoding images, and is
shared with ``evaluation.py``, so the offline evaluation reads exactly what an import would.
:func:`import_manifest` saves each post with its images and tags in one transaction.

Re-running an import is safe: an image whose SHA-256 is already in the library is skipped, and a
keyed post is found again by ``Post.import_key = "<namespace>:<post>"``, where the namespace
defaults to ``"<manifest folder name>/<manifest file name>"`` (``"feedme-dev/manifest.jsonl"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from django.core.files import File
from django.db import DatabaseError, transaction

from imagetags.images import InvalidImage, file_sha256, open_image
from imagetags.models import InvalidTagName, Post, StockImage, TagSource
from imagetags.services.pipeline_state import feature_tasks_suspended
from imagetags.services.tagging import add_tags, clean_tag_name, max_tags_per_post

if TYPE_CHECKING:
    from imagetags.services.features import FeatureRunSummary

logger = logging.getLogger(__name__)

MANIFEST_KEYS = frozenset({"path", "tags", "post", "owner"})
# Post.import_key holds "<namespace>:<post>" in 300 characters.
POST_KEY_MAX_LENGTH = 200
NAMESPACE_MAX_LENGTH = 99
OWNER_MAX_LENGTH = 200  # Post.external_owner

# Called with (items handled so far, total items): manifest lines while importing, images while
# computing features.
Progress = Callable[[int, int], None]

# What embeds the imported images: ``imagetags.tasks.run_feature_pipeline`` (the command passes
# it in, as a service must not import the pipeline layer above it), called as
# ``pipeline(image_ids, batch_size=..., progress=...)``.
FeaturePipeline = Callable[..., "FeatureRunSummary"]


class ManifestError(Exception):
    """The manifest as a whole cannot be used (missing, unreadable). The message says what to do."""


@dataclass
class ManifestEntry:
    """One line of a manifest, checked. ``errors`` is empty when the line can be imported."""

    line: int  # 1-based line number in the manifest
    path: str  # as written in the manifest ("" when missing or not a string)
    file: Path | None = None  # resolved absolute path inside the manifest's folder, if valid
    tags: tuple[str, ...] = ()  # normalised, duplicates removed, first-seen order
    post: str | None = None
    owner: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def post_group(self) -> str:
        """Which post of the manifest this image belongs to (its own when ``post`` is null)."""
        return f"post:{self.post}" if self.post is not None else f"line:{self.line}"


@dataclass(frozen=True)
class Rejection:
    line: int
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" ({self.path})" if self.path else "")
        return f"{where}: {self.reason}"


@dataclass
class ImportSummary:
    """What an import did (or, with ``dry_run``, would do)."""

    manifest: str
    namespace: str
    dry_run: bool = False
    imported: int = 0  # images saved (or that would be saved)
    skipped: int = 0  # images already in the library (same SHA-256), or repeated in the manifest
    posts_created: int = 0
    posts_updated: int = 0  # existing posts (found by import key) that got images or tags
    rejected: list[Rejection] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)  # the saved StockImages
    features: dict[str, Any] | None = None  # the feature pipeline's summary, when one ran

    def as_dict(self, max_rejections: int | None = None) -> dict[str, Any]:
        rejections = self.rejected if max_rejections is None else self.rejected[:max_rejections]
        return {
            "manifest": self.manifest,
            "namespace": self.namespace,
            "dry_run": self.dry_run,
            "imported": self.imported,
            "skipped": self.skipped,
            "rejected": len(self.rejected),
            "posts_created": self.posts_created,
            "posts_updated": self.posts_updated,
            "rejections": [asdict(rejection) for rejection in rejections],
            "features": self.features,
        }


# --- parsing ---------------------------------------------------------------------------------


def parse_manifest(manifest: str | os.PathLike, *, limit: int | None = None) -> list[ManifestEntry]:
    """Read and check every line of a manifest; bad lines come back with ``errors`` set.

    Checks the JSON, the keys and their types, tag names (``tagging.clean_tag_name``, the rules
    of every path) and that ``path`` names an existing
    file inside the manifest's folder. Images are not decoded here (the import and the
    evaluation open them with ``images.open_image``).
    Blank lines are ignored. ``limit`` reads only the first ``limit`` entries.

    Raises :class:`ManifestError` when the manifest itself is missing or unreadable.
    """
    manifest_path = Path(manifest)
    try:
        raw_lines = manifest_path.read_bytes().splitlines()
    except FileNotFoundError:
        raise ManifestError(
            f"The manifest {manifest_path} does not exist. Give the path of a JSON Lines file "
            'with one {"path": ..., "tags": [...], "post": ..., "owner": ...} object per line.'
        ) from None
    except IsADirectoryError:
        raise ManifestError(
            f"{manifest_path} is a folder. Give the manifest file inside it (e.g. "
            f"{manifest_path / 'manifest.jsonl'})."
        ) from None
    except OSError as exc:
        raise ManifestError(
            f"The manifest {manifest_path} could not be read ({exc.strerror or exc}). "
            "Check that the file is readable by this user."
        ) from None
    root = manifest_path.resolve().parent
    entries: list[ManifestEntry] = []
    for number, raw in enumerate(raw_lines, start=1):
        if limit is not None and len(entries) >= limit:
            break
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        if not raw.strip():
            continue
        entries.append(_parse_line(number, raw, root))
    return entries


def _parse_line(number: int, raw: bytes, root: Path) -> ManifestEntry:
    entry = ManifestEntry(line=number, path="")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        entry.errors.append("the line is not valid UTF-8")
        return entry
    except json.JSONDecodeError as exc:
        entry.errors.append(f"the line is not valid JSON ({exc.msg} at column {exc.colno})")
        return entry
    if not isinstance(data, dict):
        entry.errors.append('the line is not a JSON object like {"path": ..., "tags": [...]}')
        return entry
    unknown = sorted(set(data) - MANIFEST_KEYS)
    if unknown:
        entry.errors.append(
            f"unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(MANIFEST_KEYS))}"
        )
    if "path" not in data:
        entry.errors.append('"path" is missing')
    elif not isinstance(data["path"], str):
        entry.errors.append('"path" must be a string')
    else:
        entry.path = data["path"]
        entry.file, error = _resolve_inside(root, entry.path)
        if error:
            entry.errors.append(error)
    entry.tags = _parse_tags(data.get("tags"), entry.errors)
    entry.post = _parse_key(data.get("post"), "post", POST_KEY_MAX_LENGTH, entry.errors)
    entry.owner = _parse_key(data.get("owner"), "owner", OWNER_MAX_LENGTH, entry.errors)
    return entry


def _resolve_inside(root: Path, raw: str) -> tuple[Path | None, str | None]:
    """The file ``raw`` names inside ``root``, or why it may not be used."""
    if not raw:
        return None, "the path is empty"
    if "\x00" in raw:
        return None, "the path contains a NUL byte"
    if os.path.isabs(raw) or PureWindowsPath(raw).anchor:
        return None, "the path is absolute; paths must be relative to the manifest's folder"
    try:
        # resolve() follows symlinks, so a link pointing outside the folder is caught too.
        target = (root / raw).resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
        return None, f"the path could not be resolved ({exc})"
    if not target.is_relative_to(root):
        return None, "the path leads outside the manifest's folder"
    if not target.exists():
        return None, "the file does not exist"
    if not target.is_file():
        return None, "the path is not a regular file"
    return target, None


def _parse_tags(value: Any, errors: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append('"tags" must be a list of strings')
        return ()
    names: dict[str, None] = {}  # an ordered set
    for position, raw in enumerate(value, start=1):
        if not isinstance(raw, str):
            errors.append(f"tag #{position} is not a string")
            continue
        try:
            # The rules of every other path (typed, API, admin, Tag.save).
            names[clean_tag_name(raw)] = None
        except InvalidTagName as exc:
            errors.append(f"tag #{position}: {exc}")
    # MAX_TAGS_PER_POST is checked by the import, per post (the union of its lines), not here:
    # evaluate_suggestions reads manifests too, and a dataset's long posts are data to measure.
    return tuple(names)


def _parse_key(value: Any, key: str, max_length: int, errors: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(f'"{key}" must be a string or null')
        return None
    if not value.strip():
        errors.append(f'"{key}" is empty; use null instead')
        return None
    if len(value) > max_length:
        errors.append(f'"{key}" is longer than {max_length} characters')
        return None
    return value


def group_posts(entries: Iterable[ManifestEntry]) -> dict[str, list[ManifestEntry]]:
    """Entries by post, in the order each post first appears in the manifest."""
    groups: dict[str, list[ManifestEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.post_group, []).append(entry)
    return groups


def post_tags(entries: Iterable[ManifestEntry]) -> tuple[str, ...]:
    """A post's tags: the union of its valid lines' tags, in first-seen order."""
    names: dict[str, None] = {}
    for entry in entries:
        if entry.ok:
            names.update(dict.fromkeys(entry.tags))
    return tuple(names)


def default_namespace(manifest: str | os.PathLike) -> str:
    """``"<folder>/<file>"`` of the manifest: the prefix of its posts' ``Post.import_key``."""
    path = Path(manifest).resolve()
    return f"{path.parent.name}/{path.name}"[-NAMESPACE_MAX_LENGTH:]


# --- importing -------------------------------------------------------------------------------


def import_manifest(
    manifest: str | os.PathLike,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    feature_pipeline: FeaturePipeline | None = None,
    namespace: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    feature_progress: Progress | None = None,
) -> ImportSummary:
    """Import a manifest's images and tags into the library; returns what happened.

    Each post, with its new images and tags (source ``imported``), is saved in one transaction;
    if saving fails, its rows are rolled back, the files already written to storage are deleted,
    its lines are reported as rejected, and the import goes on with the next post.

    ``dry_run`` checks everything (lines, images, what is already present) and writes nothing.
    ``feature_pipeline`` suspends the per-image feature tasks during the import and runs that
    pipeline over the new images afterwards, in batches of ``batch_size``. ``progress(done, total)`` is
    called after each post with manifest lines handled, ``feature_progress(done, total)`` after
    each feature batch. ``limit`` reads only the first ``limit`` manifest entries.
    """
    namespace = namespace if namespace is not None else default_namespace(manifest)
    if not namespace or len(namespace) > NAMESPACE_MAX_LENGTH:
        raise ManifestError(
            f"The import namespace must be 1 to {NAMESPACE_MAX_LENGTH} characters long; "
            "pass a shorter one."
        )
    entries = parse_manifest(manifest, limit=limit)
    summary = ImportSummary(manifest=str(manifest), namespace=namespace, dry_run=dry_run)
    importer = _Importer(summary, dry_run=dry_run)
    # With a feature pipeline the new images are embedded below in batches, so the per-image
    # tasks the post_save signal would enqueue are suspended; otherwise they do the work.
    suspend = feature_tasks_suspended() if feature_pipeline else contextlib.nullcontext()
    done = 0
    with suspend:
        for group in group_posts(entries).values():
            importer.import_post(group)
            done += len(group)
            if progress is not None:
                progress(done, len(entries))
    summary.rejected.sort(key=lambda rejection: rejection.line)
    if feature_pipeline is not None and summary.image_ids and not dry_run:
        total = len(summary.image_ids)
        result = feature_pipeline(
            summary.image_ids,
            batch_size=batch_size,
            progress=(lambda done: feature_progress(done, total)) if feature_progress else None,
        )
        summary.features = result.as_dict()
    return summary


class _Importer:
    """Saves one post at a time, remembering what this run has already seen."""

    def __init__(self, summary: ImportSummary, *, dry_run: bool) -> None:
        self.summary = summary
        self.dry_run = dry_run
        self.seen: set[str] = set()  # checksums this run has imported or found present

    def import_post(self, group: list[ManifestEntry]) -> None:
        key = group[0].post
        import_key = f"{self.summary.namespace}:{key}" if key is not None else ""
        existing = Post.objects.filter(import_key=import_key).first() if import_key else None
        tags = post_tags(group)
        # Checked before any file is read: the lines of a post are rejected together, and an
        # existing post's tags count too (MAX_TAGS_PER_POST, as on every path).
        present = set(existing.tags.values_list("name", flat=True)) if existing else set()
        count = len(present | set(tags))
        if count > max_tags_per_post():
            reason = (
                f"the post would have {count} tags; at most {max_tags_per_post()} per post "
                "(MAX_TAGS_PER_POST)"
            )
            for entry in group:
                self._reject(entry, "; ".join(entry.errors) if not entry.ok else reason)
            return
        new_images: list[tuple[ManifestEntry, str]] = []
        for entry in group:
            if not entry.ok:
                self._reject(entry, "; ".join(entry.errors))
                continue
            try:
                sha256 = file_sha256(entry.file)
            except OSError as exc:
                self._reject(entry, f"the file could not be read ({exc.strerror or exc})")
                continue
            if sha256 in self.seen:
                self.summary.skipped += 1  # byte-identical to an earlier line
                continue
            if StockImage.objects.filter(sha256=sha256).exists():
                self.seen.add(sha256)
                self.summary.skipped += 1
                continue
            try:
                open_image(entry.file)
            except (InvalidImage, OSError) as exc:
                self._reject(entry, str(exc))
                continue
            self.seen.add(sha256)
            new_images.append((entry, sha256))

        if existing is None and not new_images:
            return  # nothing new: do not create an empty post
        if self.dry_run:
            if existing is None:
                self.summary.posts_created += 1
            elif new_images or self._missing_tags(existing, tags):
                self.summary.posts_updated += 1
            self.summary.imported += len(new_images)
            return
        owner = next((entry.owner for entry in group if entry.ok and entry.owner), None)
        self._save(existing, import_key, owner, tags, new_images)

    def _save(
        self,
        existing: Post | None,
        import_key: str,
        owner: str | None,
        tags: tuple[str, ...],
        new_images: list[tuple[ManifestEntry, str]],
    ) -> None:
        storage = StockImage._meta.get_field("image").storage
        stored: list[str] = []  # files written to storage, deleted again if the post rolls back
        image_ids: list[int] = []
        try:
            with transaction.atomic():
                post = existing or Post.objects.create(
                    import_key=import_key, external_owner=owner or ""
                )
                if existing is not None and owner and not existing.external_owner:
                    post.external_owner = owner
                    post.save(update_fields=["external_owner"])
                tags_added = len(add_tags(post, tags, source=TagSource.IMPORTED))
                for entry, _sha256 in new_images:
                    image = StockImage(post=post)
                    with open(entry.file, "rb") as fh:
                        image.image.save(entry.file.name, File(fh), save=False)
                    stored.append(image.image.name)
                    image.save()
                    image_ids.append(image.pk)
        except (DatabaseError, OSError, ValueError) as exc:
            self._discard(stored, storage)
            logger.warning("Import of post %r failed: %s", import_key or "(unkeyed)", exc)
            for entry, sha256 in new_images:
                self.seen.discard(sha256)
                self._reject(entry, f"the post could not be saved ({type(exc).__name__}: {exc})")
            return
        except BaseException:
            self._discard(stored, storage)
            raise
        self.summary.imported += len(image_ids)
        self.summary.image_ids.extend(image_ids)
        if existing is None:
            self.summary.posts_created += 1
        elif image_ids or tags_added:
            self.summary.posts_updated += 1

    @staticmethod
    def _missing_tags(post: Post, tags: tuple[str, ...]) -> bool:
        present = set(post.tags.values_list("name", flat=True))
        return any(name not in present for name in tags)

    @staticmethod
    def _discard(names: list[str], storage: Any) -> None:
        for name in names:
            try:
                storage.delete(name)
            except OSError:  # leave it; a failed clean-up must not hide the original error
                logger.exception("Could not delete %s after a failed import", name)

    def _reject(self, entry: ManifestEntry, reason: str) -> None:
        self.summary.rejected.append(Rejection(line=entry.line, path=entry.path, reason=reason))
