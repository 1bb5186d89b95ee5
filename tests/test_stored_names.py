"""Stored file names take the extension of the format read from the bytes, on every path; and
``fix_image_names`` renames the files stored before that."""

from __future__ import annotations

import json
import mimetypes
from io import BytesIO, StringIO
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import DatabaseError, transaction
from django.urls import reverse
from PIL import Image

from imagetags.images import EXTENSIONS, InvalidImage, extension_matches
from imagetags.models import FeatureStatus, Post, StockImage, safe_upload_name
from imagetags.services.library import import_manifest
from imagetags.services.pending_uploads import PendingUpload
from imagetags.services.posts import create_post

from .conftest import image_bytes

UPLOAD_URL = reverse("imagetags:upload")
# Client names that a web server would serve as a page, a script, or with no type at all.
HOSTILE_NAMES = ["evil.html", "x.svg", "a.js", "page.htm", "noext", ".htaccess", "a.php.png"]


def png(name: str, **kwargs) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, image_bytes(fmt="PNG", **kwargs), content_type="text/html")


def media_files(media_root: Path) -> list[Path]:
    return [p for p in media_root.rglob("*") if p.is_file()] if media_root.exists() else []


def assert_served_as_image(client, image: StockImage, content_type: str = "image/png") -> None:
    """The stored name's type, as a web server (here Django's static serve) guesses it."""
    assert mimetypes.guess_type(image.image.name)[0] == content_type
    response = client.get(image.image.url)
    assert response.status_code == 200
    assert response["Content-Type"] == content_type


# -- the name itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_name", "stored"),
    [
        ("evil.html", "evil.png"),
        ("x.svg", "x.png"),
        ("a.js", "a.png"),
        ("noext", "noext.png"),
        (".htaccess", "htaccess.png"),
        # A second extension inside the stem would be run by some Apache set-ups.
        ("a.php.png", "a_php.png"),
        ("../../etc/passwd.html", "passwd.png"),
        ("..", "image.png"),
        ("", "image.png"),
    ],
)
def test_safe_upload_name_keeps_the_stem_and_takes_the_given_extension(client_name, stored):
    assert safe_upload_name(client_name, "png") == stored


def test_extensions_cover_every_default_format():
    from imagetags.conf import DEFAULTS

    assert set(DEFAULTS["ALLOWED_FORMATS"]) <= set(EXTENSIONS)
    assert extension_matches("a/b/photo.JPEG", "MPO") and extension_matches("x.tiff", "TIFF")
    assert not extension_matches("evil.html", "PNG") and not extension_matches("noext", "PNG")


# -- every path ------------------------------------------------------------------------------


@pytest.mark.parametrize("client_name", HOSTILE_NAMES)
def test_upload_form_stores_the_detected_extension(admin_client, media_root, client_name):
    response = admin_client.post(
        UPLOAD_URL, {"images": [png(client_name)], "tags": "x", "step": "save"}
    )
    assert response.status_code == 302, response.content.decode()[:500]
    image = StockImage.objects.get()
    assert image.image.name.endswith(".png")
    assert [p.suffix for p in media_files(media_root)] == [".png"]
    assert_served_as_image(admin_client, image)


@pytest.mark.parametrize("client_name", HOSTILE_NAMES)
def test_api_stores_the_detected_extension(admin_client, media_root, client_name):
    response = admin_client.post(
        reverse("imagetags_api:post-list"), {"images": [png(client_name)], "tags": "x"}
    )
    assert response.status_code == 201, response.content
    image = StockImage.objects.get()
    assert image.image.name.endswith(".png")
    assert json.loads(response.content)["images"][0]["url"].endswith(".png")
    assert_served_as_image(admin_client, image)


# The admin's form already refuses names without an image extension (Django's ImageField
# validator), but it takes any image under any image extension, and a second extension inside.
ADMIN_NAMES = [("photo.jpg", "photo.png"), ("a.php.png", "a_php.png"), ("x.gif", "x.png")]


@pytest.mark.parametrize(("client_name", "stored"), ADMIN_NAMES)
def test_admin_stock_image_form_stores_the_detected_extension(
    admin_client, media_root, client_name, stored
):
    post = Post.objects.create()
    response = admin_client.post(
        reverse("admin:imagetags_stockimage_add"),
        {
            "post": post.pk,
            "image": png(client_name),
            "created_0": "2026-01-01",
            "created_1": "12:00:00",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    image = StockImage.objects.get()
    assert image.image.name.endswith(f"/{stored}")
    assert_served_as_image(admin_client, image)


def three_frame_gif(name: str = "anim.gif") -> SimpleUploadedFile:
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    buffer = BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return SimpleUploadedFile(name, buffer.getvalue(), content_type="image/gif")


# Django's own image check opens anything Pillow opens (up to Pillow's ceiling of ~179M pixels);
# the admin must refuse what every other path refuses, with the same sentence.
@pytest.mark.parametrize(
    ("rules", "upload", "message"),
    [
        ({"MAX_PIXELS": 100}, lambda: png("big.png"), "the limit is 100 pixels"),
        ({"ALLOWED_FORMATS": ["JPEG"]}, lambda: png("p.png"), "PNG images are not accepted"),
        ({"MAX_FRAMES": 2}, three_frame_gif, "frames"),
    ],
    ids=["pixels", "format", "frames"],
)
def test_admin_stock_image_form_applies_the_upload_rules(
    admin_client, media_root, settings, rules, upload, message
):
    settings.IMAGETAGS = rules
    post = Post.objects.create()
    response = admin_client.post(
        reverse("admin:imagetags_stockimage_add"),
        {
            "post": post.pk,
            "image": upload(),
            "created_0": "2026-01-01",
            "created_1": "12:00:00",
        },
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["image"]
    assert any(message in error for error in errors), errors
    assert not StockImage.objects.exists()
    assert media_files(media_root) == []


@pytest.mark.parametrize(("client_name", "stored"), ADMIN_NAMES)
def test_admin_post_form_inline_stores_the_detected_extension(
    admin_client, media_root, client_name, stored
):
    data = {
        "title": "Inline",
        "created_0": "2026-01-01",
        "created_1": "12:00:00",
        "images-TOTAL_FORMS": "1",
        "images-INITIAL_FORMS": "0",
        "images-0-image": png(client_name),
        "post_tags-TOTAL_FORMS": "0",
        "post_tags-INITIAL_FORMS": "0",
    }
    response = admin_client.post(reverse("admin:imagetags_post_add"), data)
    assert response.status_code == 302, response.context["errors"]
    image = StockImage.objects.get(post__title="Inline")
    assert image.image.name.endswith(f"/{stored}")
    assert_served_as_image(admin_client, image)


def test_import_library_stores_the_detected_extension(db, tmp_path, media_root, client):
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "evil.html").write_bytes(image_bytes(fmt="PNG"))
    (folder / "photo.svg").write_bytes(image_bytes(fmt="GIF", color=(1, 2, 3)))
    manifest = folder / "manifest.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"path": name, "tags": ["x"], "post": None, "owner": None})
            for name in ("evil.html", "photo.svg")
        )
        + "\n"
    )
    summary = import_manifest(manifest)
    assert summary.imported == 2, summary.rejected
    names = sorted(StockImage.objects.values_list("image", flat=True))
    assert [Path(n).name for n in names] == ["evil.png", "photo.gif"]
    assert_served_as_image(client, StockImage.objects.get(image=names[0]))
    assert_served_as_image(client, StockImage.objects.get(image=names[1]), "image/gif")


@pytest.mark.parametrize("client_name", HOSTILE_NAMES)
def test_pending_uploads_store_the_detected_extension(db, media_root, client_name):
    pending = PendingUpload.store([png(client_name)])
    [(stored, _original)] = pending.files
    assert stored.endswith(".png") and default_storage.exists(stored)
    assert mimetypes.guess_type(stored)[0] == "image/png"
    # The person's own name is still shown; the post's image gets the detected extension too.
    post = create_post(files=pending.open(), typed_tags=["x"])
    assert post.images.get().image.name.endswith(".png")


def test_pending_upload_of_an_undetectable_file_stores_nothing(db, media_root):
    junk = SimpleUploadedFile("x.png", b"<script>alert(1)</script>", content_type="image/png")
    with pytest.raises(InvalidImage, match="could not be recognised"):
        PendingUpload.store([png("ok.png"), junk])
    assert media_files(media_root) == []


@pytest.mark.parametrize(
    ("fmt", "extension", "content_type"),
    [
        ("JPEG", "jpg", "image/jpeg"),
        ("PNG", "png", "image/png"),
        ("GIF", "gif", "image/gif"),
        ("WEBP", "webp", "image/webp"),
        ("BMP", "bmp", "image/bmp"),
        ("TIFF", "tif", "image/tiff"),
    ],
)
def test_every_format_gets_its_own_extension(db, media_root, client, fmt, extension, content_type):
    upload = SimpleUploadedFile("evil.html", image_bytes(fmt=fmt), content_type="text/html")
    post = create_post(files=[upload], typed_tags=["x"])
    image = post.images.get()
    assert image.image.name.endswith(f"/evil.{extension}")
    assert_served_as_image(client, image, content_type)


def test_saving_through_the_field_file_is_named_the_same_way(db, media_root):
    # Not only the assign-and-save paths: FieldFile.save(name, content) too.
    image = StockImage(post=Post.objects.create())
    image.image.save("script.js", ContentFile(image_bytes(fmt="PNG")), save=True)
    assert StockImage.objects.get().image.name.endswith("/script.png")


def test_a_file_of_no_detectable_format_is_never_stored(db, media_root):
    post = Post.objects.create()
    with pytest.raises(InvalidImage, match="could not be recognised"), transaction.atomic():
        StockImage.objects.create(post=post, image=ContentFile(b"<svg onload=x>", name="a.png"))
    with pytest.raises(InvalidImage, match="could not be recognised"), transaction.atomic():
        StockImage(post=post).image.save("a.png", ContentFile(b"\x00" * 64))
    assert not StockImage.objects.exists() and media_files(media_root) == []


# -- fix_image_names -------------------------------------------------------------------------


@pytest.fixture
def old_rows(make_post):
    """Rows as stored before names were checked: a PNG kept as evil.html, a GIF as a.js, a
    JPEG named right, and a row whose file is gone. Their vectors are ready."""

    def stored_as(name: str, data: bytes) -> StockImage:
        image = make_post().images.get()
        path = default_storage.save(f"imagetags/old/{name}", ContentFile(data))
        default_storage.delete(image.image.name)
        StockImage.objects.filter(pk=image.pk).update(
            image=path, feature_status=FeatureStatus.READY, extractor_key="k", vector=b"1234"
        )
        return StockImage.objects.get(pk=image.pk)

    rows = {
        "html": stored_as("evil.html", image_bytes(fmt="PNG")),
        "js": stored_as("a.b.js", image_bytes(fmt="GIF")),
        "right": stored_as("fine.jpeg", image_bytes(fmt="JPEG")),
        "missing": stored_as("gone.html", image_bytes(fmt="PNG")),
    }
    default_storage.delete(rows["missing"].image.name)
    return rows


def names(rows: dict[str, StockImage]) -> dict[str, str]:
    return {key: StockImage.objects.get(pk=row.pk).image.name for key, row in rows.items()}


def test_fix_image_names_dry_run_changes_nothing(old_rows, media_root):
    before, files = names(old_rows), sorted(media_files(media_root))
    out = StringIO()
    call_command("fix_image_names", "--dry-run", stdout=out)
    assert names(old_rows) == before and sorted(media_files(media_root)) == files
    text = out.getvalue()
    assert "Checked 4 images: 2 would rename, 1 already named right, 1 left alone" in text
    assert "imagetags/old/evil.html -> imagetags/old/evil.png" in text
    assert "missing from storage" in text and "nothing was changed" in text


def test_fix_image_names_renames_then_a_second_run_renames_nothing(
    old_rows, media_root, client, django_capture_on_commit_callbacks
):
    old_html = media_root / old_rows["html"].image.name
    content = old_html.read_bytes()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("fix_image_names", stdout=StringIO())
    after = names(old_rows)
    assert after["html"] == "imagetags/old/evil.png"
    assert after["js"] == "imagetags/old/a_b.gif"
    assert after["right"] == old_rows["right"].image.name  # ".jpeg" names a JPEG: left alone
    assert after["missing"] == old_rows["missing"].image.name
    assert (media_root / after["html"]).read_bytes() == content and not old_html.exists()
    assert not (media_root / old_rows["js"].image.name).exists()
    # The bytes did not change, so neither do the vectors.
    html = StockImage.objects.get(pk=old_rows["html"].pk)
    assert html.feature_status == FeatureStatus.READY and bytes(html.vector) == b"1234"
    assert_served_as_image(client, html)

    files = sorted(media_files(media_root))
    out = StringIO()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("fix_image_names", stdout=out)
    assert "0 renamed, 3 already named right, 1 left alone, 0 failed" in out.getvalue()
    assert names(old_rows) == after and sorted(media_files(media_root)) == files


def test_fix_image_names_keeps_the_old_file_until_the_row_is_committed(
    old_rows, media_root, django_capture_on_commit_callbacks
):
    old_html = media_root / old_rows["html"].image.name
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        call_command("fix_image_names", stdout=StringIO())
    # The rows point at the copies, and every old file is still there until commit.
    assert old_html.exists() and (media_root / names(old_rows)["html"]).exists()
    assert len(callbacks) == 2


def test_fix_image_names_failed_row_update_keeps_the_old_file(old_rows, media_root, monkeypatch):
    from django.db.models.query import QuerySet

    def failing_update(self, **kwargs):
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(QuerySet, "update", failing_update)
    before, files = names(old_rows), sorted(media_files(media_root))
    out = StringIO()
    with pytest.raises(CommandError, match="2 files could not be renamed"):
        call_command("fix_image_names", stdout=out)
    monkeypatch.undo()
    assert "the row could not be updated (disk I/O error)" in out.getvalue()
    # Every row still points at its old file, which exists; no copy is left behind.
    assert names(old_rows) == before and sorted(media_files(media_root)) == files
    for name in before.values():
        assert name == old_rows["missing"].image.name or (media_root / name).exists()
