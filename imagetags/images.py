"""Opening untrusted image files safely and normalising them for the model.

Every way an image enters the app (upload form, API, admin, ``import_library``, ``suggest_tags``)
goes through :func:`open_image`, so every path rejects the same bad input with the same message.

Pure rules over a file's bytes (Pillow, NumPy and the settings; no models, no database), so it
sits in the data layer, under ``models.py``, whose image field names and checks files with it.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from django.core.exceptions import RequestDataTooBig
from PIL import ExifTags, GifImagePlugin, Image, ImageOps, UnidentifiedImageError

from imagetags.conf import imagetags_settings


class InvalidImage(ValueError):
    """The file is not an image we accept. The message says why, in words a person can act on."""


@dataclass(frozen=True)
class ImageInfo:
    """Facts about an opened file: format (MPO reported as JPEG), upright size, frame count."""

    format: str
    width: int
    height: int
    frames: int


ImageSource = str | os.PathLike | IO[bytes] | Any  # path, open file, Django File


# --- Upload limits: the one place that reads them. The streaming guards (imagetags.uploads), the
# suggestion request validator and the posts service all ask here, so the numbers and the words
# are the same on every surface.


class UploadTooLarge(RequestDataTooBig):
    """A body or a file over the upload limits; the message says which limit. A
    ``RequestDataTooBig``, so every surface answers it as Django's own body limit: a 413."""


def max_upload_bytes() -> int:
    """The most bytes one uploaded file may have (``MAX_UPLOAD_BYTES``)."""
    return imagetags_settings.MAX_UPLOAD_BYTES


def max_files_per_post() -> int:
    """The most images one request (one post) may carry (``MAX_FILES_PER_POST``)."""
    return imagetags_settings.MAX_FILES_PER_POST


def file_too_large_message(name: str) -> str:
    return f"{name or 'A file'} is larger than the limit of {max_upload_bytes():,} bytes."


def too_many_files_message(count: int) -> str:
    return f"At most {max_files_per_post()} images per post; {count} were sent."


def check_upload_size(upload: Any) -> None:
    """Raise :class:`UploadTooLarge` for a parsed upload over :func:`max_upload_bytes`.

    From the size Django already knows, before a byte is decoded. The streaming handler
    normally stops such a file earlier; this catches bodies parsed before the view ran (a
    site's middleware reading ``request.POST``).
    """
    if (getattr(upload, "size", 0) or 0) > max_upload_bytes():
        raise UploadTooLarge(file_too_large_message(getattr(upload, "name", "")))


# The extension a file is stored under, by the format read from its bytes (Pillow's name; MPO is
# a JPEG). Web servers choose the Content-Type from the extension, so it must never be the
# client's: a PNG named "evil.html" would be served as a page, scripts and all.
EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}
# Other spellings that name the same format (a stored "photo.jpeg" is not renamed).
_EXTENSION_ALIASES: dict[str, tuple[str, ...]] = {"JPEG": ("jpeg", "jpe"), "TIFF": ("tiff",)}


def detect_format(source: ImageSource) -> str:
    """The format of a file as Pillow reads it from the header (``"PNG"``, ``"MPO"``, …).

    Only the header is read, no pixel is decoded, and a file object is left at its start.
    Raises :class:`InvalidImage` when the bytes match no image format Pillow knows.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as fh:
            return detect_format(fh)
    if hasattr(source, "open") and getattr(source, "closed", False):
        source.open("rb")
    source.seek(0)
    try:
        with warnings.catch_warnings():
            # A header claiming a huge size is still a header: the format is what is asked.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                fmt = (image.format or "").upper()
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"The image has too many pixels to open safely ({exc}).") from None
    except (OSError, SyntaxError, ValueError):
        fmt = ""
    finally:
        source.seek(0)
    if not fmt:
        raise InvalidImage(
            "The file's format could not be recognised from its contents, so it is not stored."
        )
    return fmt


def extension_for_format(fmt: str) -> str:
    """The stored file-name extension of a Pillow format (no dot).

    Formats outside :data:`EXTENSIONS` (a site may allow more in ``ALLOWED_FORMATS``) take the
    first extension Pillow registers for them, which names the same image type.
    """
    fmt = fmt.upper()
    if fmt in EXTENSIONS:
        return EXTENSIONS[fmt]
    registered = sorted(ext for ext, name in Image.registered_extensions().items() if name == fmt)
    if not registered:
        raise InvalidImage(f"{fmt} images have no known file-name extension, so are not stored.")
    return registered[0].lstrip(".").lower()


def stored_extension(source: ImageSource) -> str:
    """The extension (no dot) a file must be stored under: its detected format's, never the
    client's. Raises :class:`InvalidImage` when the format cannot be detected."""
    return extension_for_format(detect_format(source))


def extension_matches(name: str, fmt: str) -> bool:
    """Whether a stored file name's extension names the format ``fmt`` (case-insensitively)."""
    _stem, dot, suffix = name.rpartition("/")[-1].rpartition(".")
    fmt = _FORMAT_ALIASES.get(fmt.upper(), fmt.upper())
    accepted = (extension_for_format(fmt), *_EXTENSION_ALIASES.get(fmt, ()))
    return bool(dot) and suffix.lower() in accepted


def file_sha256(source: ImageSource, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, leaving a file object's position at the start.

    A Django file that was closed is opened for reading and closed again, so hashing on save
    leaks no file handle.
    """
    digest = hashlib.sha256()
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(chunk_size), b""):
                digest.update(block)
        return digest.hexdigest()
    opened_here = hasattr(source, "open") and getattr(source, "closed", True)
    if opened_here:
        source.open("rb")
    try:
        source.seek(0)
        for block in iter(lambda: source.read(chunk_size), b""):
            digest.update(block)
        source.seek(0)
    finally:
        if opened_here:
            source.close()
    return digest.hexdigest()


def _read_limited(source: ImageSource, max_bytes: int) -> bytes:
    if isinstance(source, str | os.PathLike):
        size = os.path.getsize(source)
        if size > max_bytes:
            raise InvalidImage(f"File is {size:,} bytes; the limit is {max_bytes:,} bytes.")
        with open(source, "rb") as fh:
            return fh.read()
    if hasattr(source, "open") and getattr(source, "closed", False):
        source.open("rb")
    if hasattr(source, "seek"):
        source.seek(0)
    data = source.read(max_bytes + 1)
    if hasattr(source, "seek"):
        source.seek(0)
    if len(data) > max_bytes:
        raise InvalidImage(f"File is larger than the limit of {max_bytes:,} bytes.")
    return data


def open_image(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    draft_size: int | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """Open, check and decode an image; returns an upright RGB image and facts about the file.

    - format must be one of ``ALLOWED_FORMATS`` (decided from the bytes, never the file name);
    - width × height (× frames for animations) must stay within ``MAX_PIXELS``, checked from the
      header before any pixel is decoded, so decompression bombs are refused cheaply; an
      animation may have at most ``MAX_FRAMES`` frames, and frames are counted only that far;
    - truncated or corrupt files are refused, not silently padded;
    - the first frame is used, EXIF orientation is applied, and every mode (CMYK, 16-bit,
      palette, alpha, grayscale) becomes 8-bit RGB; transparency is composited onto white.

    ``draft_size``: for a caller that only needs a ``draft_size`` × ``draft_size`` model input, a
    JPEG is decoded at 1/2, 1/4 or 1/8 scale (in the DCT domain, so the whole file is still
    read and checked) as long as both sides stay at least ``draft_size``: a 12-megapixel phone
    photo then decodes as 504 × 378 pixels, several times faster. Other formats are decoded in
    full and at once reduced by a whole factor (box averaging, ``Image.reduce``) keeping both
    sides at least twice ``draft_size`` (``REDUCE_MARGIN``), so a 6300 × 6300 GIF becomes
    450 × 450 instead of staying 119 MB of RGB. The returned image is that size;
    ``ImageInfo`` still reports the file's own.
    """
    max_bytes = max_upload_bytes() if max_bytes is None else max_bytes
    max_pixels = imagetags_settings.MAX_PIXELS if max_pixels is None else max_pixels
    data = _read_limited(source, max_bytes)
    if not data:
        raise InvalidImage("The file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own ceiling (Image.MAX_IMAGE_PIXELS), checked from the header like ours.
        raise InvalidImage(f"The image has too many pixels to open safely ({exc}).") from None
    except UnidentifiedImageError:
        raise InvalidImage(_not_an_image_message(data)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(
            f"The image could not be read: it is truncated or corrupt ({exc})."
        ) from None

    pillow_format = (image.format or "").upper()
    # Pillow calls JPEGs with a Multi-Picture extension (most phone and camera photos) "MPO";
    # they are JPEG files and must be accepted as such.
    fmt = _FORMAT_ALIASES.get(pillow_format, pillow_format)
    allowed = [f.upper() for f in imagetags_settings.ALLOWED_FORMATS]
    if fmt not in allowed:
        raise InvalidImage(
            f"{fmt or 'This'} images are not accepted; allowed: {', '.join(allowed)}."
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage("The image has no pixels.")
    if width * height > max_pixels:
        raise InvalidImage(
            f"The image is {width}×{height} pixels; the limit is {max_pixels:,} pixels."
        )
    max_frames = imagetags_settings.MAX_FRAMES
    # An MPO's extra pictures (previews, depth maps) are never decoded, unlike animation frames,
    # so they must not push a phone photo over the pixel limit.
    if pillow_format == "MPO":
        frames, counted_all = 1, True
    else:
        # Counting further than either limit allows could only confirm a refusal.
        budget = min(max_frames, max_pixels // (width * height))
        frames, counted_all = _count_frames(image, budget)
    if frames > max_frames:
        raise InvalidImage(
            f"The image has more than {max_frames:,} frames; the limit is {max_frames:,}."
        )
    if width * height * frames > max_pixels:
        raise InvalidImage(
            f"The image is {width}×{height} pixels × {'' if counted_all else 'at least '}"
            f"{frames} frames; the limit is {max_pixels:,} pixels."
        )
    # Pillow raises on truncated data unless a site sets ImageFile.LOAD_TRUNCATED_IMAGES.
    try:
        image.seek(0)
        if draft_size and fmt == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"The image data is truncated or corrupt ({exc}).") from None
    # Report the size as displayed: a portrait phone photo is stored landscape + EXIF rotation.
    # Read from the tag itself (the one exif_transpose obeys): after a draft or a reduction a
    # near-square picture may have equal sides, so comparing orientations cannot tell.
    if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
        width, height = height, width
    # In place: without an orientation tag, exif_transpose would otherwise copy the picture.
    upright = ImageOps.exif_transpose(image, in_place=True) or image
    # JPEGs are reduced by their draft alone, so their vectors stay those already stored.
    reduce = bool(draft_size) and fmt != "JPEG"
    if reduce and upright.mode in _REDUCIBLE_MODES:
        # Before the RGB conversion, so a grayscale picture is never tripled at full size.
        upright = _reduce_to(upright, draft_size)
    rgb = to_rgb(upright)
    if reduce:
        rgb = _reduce_to(rgb, draft_size)  # palette and 16-bit pictures, reducible only as RGB
    return rgb, ImageInfo(format=fmt, width=width, height=height, frames=frames)


# EXIF orientations that turn the picture by a quarter (width and height swap).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Modes Image.reduce averages correctly (alpha is premultiplied); palette indices cannot be.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})


# Sides a reduced picture keeps, in multiples of the draft size. Measured with MobileNetV2 on
# 30 feedme-dev photos enlarged 4× and 9× (cosine to the vector of the full picture): keeping
# 1× gives 0.992 (min 0.983), 2× gives 0.997 (min 0.996), as close as a JPEG draft does
# (0.997), 3× 0.998. Two: the reduced picture stays under 4× the model input per side.
REDUCE_MARGIN = 2


def _reduce_to(image: Image.Image, draft_size: int) -> Image.Image:
    """Shrink by the largest whole factor that keeps both sides at least ``REDUCE_MARGIN`` ×
    ``draft_size``; the image itself when no factor of 2 or more fits."""
    factor = min(image.size) // (REDUCE_MARGIN * draft_size)
    return image.reduce(factor) if factor >= 2 else image


def _count_frames(image: Image.Image, limit: int) -> tuple[int, bool]:
    """The number of frames, counted at most to ``limit + 1``; and whether that is all of them.

    Pillow's ``n_frames`` on a GIF or a multi-page TIFF seeks through every frame (1.4 million
    frames in a 37-byte-per-frame GIF take seconds); here counting stops once the count could
    only confirm a refusal. Formats that state their frame count in the header (APNG, WebP)
    are asked directly.
    """
    if getattr(image, "_n_frames", 0) is not None:
        return int(getattr(image, "n_frames", 1) or 1), True
    if isinstance(image, GifImagePlugin.GifImageFile):
        # What n_frames itself does: read each frame's header and skip its data. The public
        # seek() would decode every frame on the way.
        def step(frame: int) -> None:
            image._seek(frame, False)
    else:
        step = image.seek  # TIFF: reads the next directory, decodes nothing
    count = 1
    try:
        while count <= limit:
            step(count)
            count += 1
        step(count)  # one header more tells whether the count stopped at the last frame
        counted_all = False
    except EOFError:
        counted_all = True
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"The image data is truncated or corrupt ({exc}).") from None
    finally:
        image.seek(0)
    return count, counted_all


_FORMAT_ALIASES = {"MPO": "JPEG"}

# Leading bytes of the formats we accept, to tell a damaged or disguised image from a non-image.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _not_an_image_message(data: bytes) -> str:
    head = data[:4096]
    if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        head = head[3:]
    text = head.lstrip().lower()
    if text.startswith(b"<") and b"<svg" in text:
        # Also behind an XML declaration, DOCTYPE or comment; SVG can carry scripts.
        return "SVG files are not accepted: upload a JPEG, PNG, GIF or WebP image."
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return (
                f"The file starts like a {name} image but the rest is not valid {name} data: "
                "it is damaged, or another kind of file disguised as an image."
            )
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return (
            "The file starts like a WEBP image but the rest is not valid WEBP data: "
            "it is damaged, or another kind of file disguised as an image."
        )
    if text.startswith((b"<!doctype html", b"<html")):
        return "The file is an HTML page, not an image."
    if b"\x00" not in head:
        try:
            # Incremental: a multi-byte character cut at the 4 KB boundary is not an error.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            pass
        else:
            return "The file is text, not an image: upload a JPEG, PNG, GIF or WebP image."
    return "The file is not an image (its contents match no supported image format)."


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, with transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((array - lo) * scale).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 array of an RGB image, resized with bilinear filtering."""
    if image.mode != "RGB":
        image = to_rgb(image)
    if image.size != (size, size):
        # reducing_gap: draft-level pre-shrink for big photos, much faster at equal quality.
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
