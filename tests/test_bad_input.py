"""Every bad input of issue 6, through every way a file or a tag enters the app.

Each bad file is given to ``open_image``, to ``create_post`` (the form's, API's and admin's
path), to ``import_library`` and to ``suggest_tags``: all four refuse it with the same sentence,
and none leaves a row or a stored file behind. The HTTP status codes of the API for these cases
are tested in tests/test_api.py.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from imagetags.images import InvalidImage, open_image, to_model_input
from imagetags.models import (
    TAG_NAME_MAX_LENGTH,
    FeatureStatus,
    Post,
    PostTag,
    StockImage,
    SuggestionFeedback,
    Tag,
)
from imagetags.services.extractors import get_extractor
from imagetags.services.features import compute_features
from imagetags.services.library import ManifestError, import_manifest
from imagetags.services.posts import ShownSuggestion, TooManyFiles, create_post
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.tagging import InvalidTagName
from tests.conftest import image_bytes

# --- bad files -------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _gif(frames: list[tuple[int, int, int]], size: tuple[int, int] = (20, 20)) -> bytes:
    images = [Image.new("RGB", size, color) for color in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


SVG_WITH_SCRIPT = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>alert(document.cookie)</script><rect width='10' height='10'/></svg>"
)

# (id, bytes, settings overrides, the sentence every entry point must give)
BAD_FILES: list[tuple[str, Callable[[], bytes], dict, str]] = [
    ("text-named-jpg", lambda: b"Dear diary, this is not a photo.\n", {}, "text, not an image"),
    (
        "png-header-then-html",
        lambda: b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>",
        {},
        "starts like a PNG image but the rest is not valid PNG data",
    ),
    ("svg-with-script", lambda: SVG_WITH_SCRIPT, {}, "SVG files are not accepted"),
    (
        "html-page",
        lambda: b"<!DOCTYPE html><html><body>hi</body></html>",
        {},
        "HTML page, not an image",
    ),
    ("zero-bytes", lambda: b"", {}, "The file is empty"),
    (
        "truncated-jpeg",
        lambda: image_bytes(size=(64, 64), pattern="noise")[:600],
        {},
        "truncated or corrupt",
    ),
    (
        "over-the-pixel-cap",
        lambda: image_bytes(size=(60, 50)),
        {"MAX_PIXELS": 2000},
        "60×50 pixels; the limit is 2,000 pixels",
    ),
    (
        "decompression-bomb",
        lambda: _png_claiming(30_000, 30_000),
        {},
        "too many pixels to open safely",
    ),
    (
        "over-the-size-limit",
        lambda: image_bytes(size=(64, 64), pattern="noise"),
        {"MAX_UPLOAD_BYTES": 1000},
        r"limit (is|of) 1,000 bytes",
    ),
    (
        "animation-frames-over-the-pixel-cap",
        lambda: _gif([(255, 0, 0), (0, 255, 0), (0, 0, 255)]),
        {"MAX_PIXELS": 1000},
        "20×20 pixels × 3 frames; the limit is 1,000 pixels",
    ),
    (
        "format-not-allowed",
        lambda: image_bytes(fmt="BMP"),
        {"ALLOWED_FORMATS": ["JPEG", "PNG"]},
        "BMP images are not accepted; allowed: JPEG, PNG",
    ),
]


def _limits(settings, overrides: dict) -> None:
    settings.IMAGETAGS = {**settings.IMAGETAGS, **overrides}


def _stored_files(media_root: Path) -> list[Path]:
    return sorted(p for p in media_root.rglob("*") if p.is_file()) if media_root.exists() else []


def _nothing_saved(media_root: Path) -> None:
    assert not Post.objects.exists()
    assert not StockImage.objects.exists()
    assert not PostTag.objects.exists()
    assert not Tag.objects.exists()
    assert not SuggestionFeedback.objects.exists()
    assert _stored_files(media_root) == []


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file_is_refused_the_same_way_everywhere(
    db, settings, media_root, tmp_path, make_upload, add_post, data, overrides, message
):
    _limits(settings, overrides)
    content = data()

    # 1. The one function every path goes through.
    with pytest.raises(InvalidImage, match=message):
        open_image(io.BytesIO(content))

    # 2. An upload (form, API, admin): a good file beside it is not saved either.
    bad = SimpleUploadedFile("photo.jpg", content, content_type="image/jpeg")
    with pytest.raises(InvalidImage, match=f"^photo.jpg: .*{message}"):
        create_post(
            files=[make_upload("good.jpg", size=(8, 8)), bad],
            typed_tags=["sunset"],
            shown=[ShownSuggestion("sunset", 0.5, 1)],
        )
    _nothing_saved(media_root)

    # 3. A library import: the line is rejected with the same reason, the good one imported.
    library = tmp_path / "library"
    library.mkdir()
    (library / "bad.jpg").write_bytes(content)
    (library / "good.jpg").write_bytes(image_bytes(size=(8, 8)))
    manifest = library / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"path": "good.jpg", "tags": ["ok"], "post": "p"})
        + "\n"
        + json.dumps({"path": "bad.jpg", "tags": ["bad"], "post": "p"})
        + "\n"
    )
    summary = import_manifest(manifest)
    assert summary.imported == 1 and len(summary.rejected) == 1
    assert summary.rejected[0].line == 2
    assert summary.rejected[0].path == "bad.jpg"
    assert pytest.importorskip("re").search(message, summary.rejected[0].reason)
    assert StockImage.objects.count() == 1 and len(_stored_files(media_root)) == 1

    # 4. The command line, with clusters in place: a readable error and a non-zero exit.
    for _ in range(2):
        add_post(["x"], [0, 1])
        add_post(["y"], [2, 3])
    rebuild_clusters(k=2, algorithm="kmeans")
    query = tmp_path / "query.jpg"
    query.write_bytes(content)
    err = StringIO()
    with pytest.raises(CommandError, match="1 of 1 files could not be read"):
        call_command("suggest_tags", str(query), stderr=err)
    assert pytest.importorskip("re").search(message, err.getvalue())


# --- awkward but acceptable files ------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_png_named_jpg_is_accepted_as_a_png(db, media_root):
    data = _save(Image.new("RGB", (30, 20), (10, 200, 10)), "PNG")
    _rgb, info = open_image(io.BytesIO(data))
    assert info.format == "PNG"  # decided from the bytes, never the name

    post = create_post(files=[SimpleUploadedFile("photo.jpg", data, content_type="image/jpeg")])
    image = post.images.get()
    # Stored byte for byte, and identified by its contents wherever it is read again.
    assert Path(image.image.path).read_bytes() == data
    with image.image.open("rb") as fh:
        assert open_image(fh)[1].format == "PNG"
    assert compute_features([image]).ready == 1


def test_animated_gif_uses_the_first_frame_within_the_cap(db, settings, media_root):
    data = _gif([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    _limits(settings, {"MAX_PIXELS": 1200})  # 20 × 20 × 3 frames fits exactly
    rgb, info = open_image(io.BytesIO(data))
    assert info.frames == 3 and rgb.size == (20, 20)
    assert rgb.getpixel((10, 10)) == (255, 0, 0)
    post = create_post(files=[SimpleUploadedFile("anim.gif", data, content_type="image/gif")])
    assert compute_features(post.images.all()).ready == 1


def _upright() -> Image.Image:
    """An asymmetric picture: every rotation and mirror of it is different."""
    image = Image.new("RGB", (64, 40), (240, 240, 240))
    for x in range(0, 20):
        for y in range(0, 10):
            image.putpixel((x, y), (200, 20, 20))
    for x in range(40, 64):
        for y in range(25, 40):
            image.putpixel((x, y), (20, 20, 200))
    return image


# What a camera stores for each EXIF orientation: the inverse of what the viewer applies.
_STORED = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


def _with_orientation(orientation: int, fmt: str) -> bytes:
    stored = _STORED[orientation](_upright())
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    return _save(stored, fmt, exif=exif, **params)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_vector_of_the_upright_image(orientation):
    extractor = get_extractor()
    upright = extractor.embed_batch([_upright()])[0]
    # Lossless: exactly the same pixels, so exactly the same vector.
    rgb, info = open_image(io.BytesIO(_with_orientation(orientation, "PNG")))
    assert (info.width, info.height) == (64, 40)
    np.testing.assert_allclose(extractor.embed_batch([rgb])[0], upright, atol=1e-5)
    # A camera JPEG: the same picture up to compression noise.
    rgb, _info = open_image(io.BytesIO(_with_orientation(orientation, "JPEG")))
    jpeg_vector = extractor.embed_batch([rgb])[0]
    assert float(jpeg_vector @ upright) > 0.99


def _mode_image(mode: str) -> tuple[bytes, str]:
    base = Image.new("RGB", (50, 30), (200, 120, 40))
    if mode == "CMYK":
        return _save(base.convert("CMYK"), "JPEG"), "cmyk.jpg"
    if mode == "I;16":
        array = (np.arange(50 * 30, dtype=np.uint16).reshape(30, 50) * 40).astype(np.uint16)
        return _save(Image.fromarray(array), "PNG"), "gray16.png"
    if mode == "P":
        return _save(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "palette.png"
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(100)
        return _save(rgba, "PNG"), "alpha.png"
    if mode == "LA":
        return _save(base.convert("LA"), "PNG"), "gray-alpha.png"
    if mode == "L":
        return _save(base.convert("L"), "JPEG"), "gray.jpg"
    if mode == "1":
        return _save(base.convert("1"), "TIFF"), "bilevel.tiff"
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA", "L", "1"])
def test_every_mode_becomes_rgb_at_the_model_input(db, media_root, mode):
    data, name = _mode_image(mode)
    assert Image.open(io.BytesIO(data)).mode.startswith(mode[0])
    rgb, _info = open_image(io.BytesIO(data))
    assert rgb.mode == "RGB"
    array = to_model_input(rgb, 224)
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8
    # And the whole way: uploaded, embedded by the task's service, stored.
    post = create_post(files=[SimpleUploadedFile(name, data)])
    assert compute_features(post.images.all()).ready == 1
    assert post.images.get().feature_status == FeatureStatus.READY


# --- missing and too many files --------------------------------------------------------------


def test_no_file_at_all(db, media_root):
    with pytest.raises(InvalidImage, match="Choose at least one image"):
        create_post(files=[], typed_tags=["x"])
    _nothing_saved(media_root)


def test_more_files_than_allowed(db, settings, media_root, make_upload):
    _limits(settings, {"MAX_FILES_PER_POST": 3})
    with pytest.raises(TooManyFiles, match="At most 3 images per post; 4 were sent"):
        create_post(files=[make_upload(f"{i}.jpg") for i in range(4)], typed_tags=["x"])
    _nothing_saved(media_root)
    assert create_post(files=[make_upload(f"{i}.jpg") for i in range(3)]).images.count() == 3


# --- file names ------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../../etc/passwd.jpg",
    "/etc/passwd.jpg",
    "..\\..\\windows\\win.ini.jpg",
    "C:\\Windows\\evil.jpg",
    "a\x00b.jpg",
    "\x00",
    "....//....//x.jpg",
    "..",
    "photo.jpg/..",
    "%2e%2e%2fencoded.jpg",
    "x" * 400 + ".jpg",
    "naïve café 😀.jpg",
    ".htaccess",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_stored_file_names_never_escape_the_upload_folder(db, media_root, name):
    # ContentFile keeps the name as given (an UploadedFile would already strip the folders):
    # this is what a caller of the service could hand in, e.g. from an API client's filename.
    upload = ContentFile(image_bytes(), name=name)
    post = create_post(files=[upload])
    stored = post.images.get()
    path = Path(stored.image.path).resolve()
    upload_folder = (media_root / "imagetags").resolve()
    assert path.is_relative_to(upload_folder), path
    assert path.is_file() and path.read_bytes() == image_bytes()
    assert "\x00" not in stored.image.name and ".." not in Path(stored.image.name).parts
    assert not path.name.startswith(".")  # no hidden files (".htaccess")
    assert len(path.name.encode()) <= 130
    assert _stored_files(media_root) == [path]


# --- tag names -------------------------------------------------------------------------------

BAD_TAGS = [
    ("", "cannot be empty"),
    ("   \t  ", "cannot be empty"),
    ("x" * (TAG_NAME_MAX_LENGTH + 1), f"at most {TAG_NAME_MAX_LENGTH} characters"),
    ("nul\x00byte", r"U\+0000 \(a control character\)"),
    ("bell\x07", r"U\+0007 \(a control character\)"),
]


@pytest.mark.parametrize(
    ("name", "message"), BAD_TAGS, ids=["empty", "blank", "huge", "nul", "control"]
)
def test_bad_tag_names_save_nothing(db, media_root, make_upload, name, message):
    for field in ("typed_tags", "accepted_tags"):
        with pytest.raises(InvalidTagName, match=message):
            create_post(files=[make_upload("a.jpg")], **{field: ["fine", name]})
        _nothing_saved(media_root)


@pytest.mark.parametrize(
    "name",
    [
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "javascript:alert(1)",
        "{{ request.user }}",
        "' OR 1=1 --",
    ],
)
def test_markup_in_tag_names_is_kept_as_text(db, media_root, make_upload, name):
    # Any text is a valid tag; it is stored as typed (normalised) and escaped wherever shown.
    post = create_post(files=[make_upload("a.jpg")], typed_tags=[name])
    assert list(post.tags.values_list("name", flat=True)) == [name.lower()]


def test_manifest_tag_names_are_checked_like_typed_ones(db, tmp_path, media_root):
    library = tmp_path / "lib"
    library.mkdir()
    (library / "a.jpg").write_bytes(image_bytes())
    lines = [{"path": "a.jpg", "tags": ["ok", bad]} for bad, _message in BAD_TAGS[:3]]
    (library / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = import_manifest(library / "m.jsonl")
    assert summary.imported == 0 and len(summary.rejected) == 3
    # The same sentences as typed input (tagging.clean_tag_name), numbered by position.
    assert [r.reason for r in summary.rejected] == [
        "tag #2: A tag name cannot be empty or invisible.",
        "tag #2: A tag name cannot be empty or invisible.",
        f"tag #2: Tag names are at most {TAG_NAME_MAX_LENGTH} characters; "
        f"{'x' * 20!r}… has {TAG_NAME_MAX_LENGTH + 1}.",
    ]
    _nothing_saved(media_root)


# --- manifests -------------------------------------------------------------------------------


def _manifest_lines(library: Path, outside: Path) -> list[tuple[bytes, str]]:
    """(raw line, expected reason) for every kind of bad manifest line."""
    (library / "sub").mkdir()
    (library / "link.jpg").symlink_to(outside)
    line = lambda **data: json.dumps(data).encode()  # noqa: E731
    return [
        (line(path="../outside.jpg", tags=["x"]), "the path leads outside the manifest's folder"),
        (line(path="sub/../../outside.jpg"), "the path leads outside the manifest's folder"),
        (line(path="link.jpg"), "the path leads outside the manifest's folder"),
        (line(path=str(outside)), "the path is absolute"),
        (line(path="C:\\photos\\a.jpg"), "the path is absolute"),
        (line(path="a\x00.jpg"), "the path contains a NUL byte"),
        (line(path=""), "the path is empty"),
        (line(path="sub"), "the path is not a regular file"),
        (line(path="missing.jpg"), "the file does not exist"),
        (line(path="good.jpg", tags=["x"], caption="hi"), "unknown key(s) 'caption'"),
        (line(tags=["x"]), '"path" is missing'),
        (line(path=["good.jpg"]), '"path" must be a string'),
        (line(path="good.jpg", tags="x, y"), '"tags" must be a list of strings'),
        (line(path="good.jpg", tags=[1]), "tag #1 is not a string"),
        (line(path="good.jpg", post=""), '"post" is empty; use null instead'),
        (line(path="good.jpg", post=7), '"post" must be a string or null'),
        (line(path="good.jpg", owner="o" * 201), '"owner" is longer than 200 characters'),
        (b'{"path": "good.jpg", "tags": ["x"]', "the line is not valid JSON"),
        (b"not json at all", "the line is not valid JSON"),
        (b'["good.jpg", ["x"]]', "the line is not a JSON object"),
        (b'{"path": "good\xff.jpg"}', "the line is not valid UTF-8"),
    ]


def test_bad_manifest_lines_are_rejected_with_reasons_and_save_nothing(db, tmp_path, media_root):
    library = tmp_path / "library"
    library.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes(color=(1, 2, 3)))
    (library / "good.jpg").write_bytes(image_bytes())
    cases = _manifest_lines(library, outside)
    manifest = library / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(raw for raw, _reason in cases) + b"\n")

    summary = import_manifest(manifest)
    assert summary.imported == 0
    reasons = {rejection.line: rejection.reason for rejection in summary.rejected}
    assert sorted(reasons) == list(range(1, len(cases) + 1))
    for number, (_raw, expected) in enumerate(cases, start=1):
        assert expected in reasons[number], (number, reasons[number])
    _nothing_saved(media_root)

    # The command says the same, and a dry run agrees.
    out = StringIO()
    call_command("import_library", str(manifest), "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["imported"] == 0 and report["rejected"] == len(cases)
    assert import_manifest(manifest, dry_run=True).rejected == summary.rejected
    _nothing_saved(media_root)


def test_unusable_manifest_is_a_clear_command_error(db, tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        call_command("import_library", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ManifestError, match="is a folder"):
        import_manifest(tmp_path)


# --- the same through the REST API -----------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    ["../../../etc/cron.d/evil.jpg", "/etc/passwd.jpg", "..\\..\\evil.jpg", "..", ".htaccess"],
)
def test_api_uploads_with_hostile_file_names_stay_in_the_upload_folder(
    db, media_root, django_user_model, filename
):
    from django.urls import reverse
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(django_user_model.objects.create_user("uploader"))
    boundary = "imagetags-boundary"
    # Written by hand: test clients would clean the name before it reaches the server.
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="images"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image_bytes()
        + f"\r\n--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="tags"\r\n\r\nsunset\r\n'
        + f"--{boundary}--\r\n".encode()
    )
    response = client.generic(
        "POST",
        reverse("imagetags_api:post-list"),
        body,
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    if filename == "..":
        # Django's multipart parser drops a file part whose name cleans to nothing.
        assert response.status_code == 400
        assert response.json() == {"images": ["This field is required."]}
        _nothing_saved(media_root)
        return
    assert response.status_code == 201, response.content
    stored = [Path(image.image.path).resolve() for image in StockImage.objects.all()]
    assert len(stored) == 1
    assert stored[0].is_relative_to((media_root / "imagetags").resolve())
    assert not stored[0].name.startswith(".")
    assert _stored_files(media_root) == stored
