"""Opening untrusted files: orientation, modes, animations, and every way a file is refused."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagetags.images import (
    ImageInfo,
    InvalidImage,
    file_sha256,
    open_image,
    to_model_input,
    to_rgb,
)
from tests.conftest import image_bytes

WHITE = (255, 255, 255)


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _open(data: bytes, **kwargs) -> tuple[Image.Image, ImageInfo]:
    return open_image(io.BytesIO(data), **kwargs)


def _refusal(data: bytes, **kwargs) -> str:
    with pytest.raises(InvalidImage) as info:
        _open(data, **kwargs)
    return str(info.value)


def _upright() -> Image.Image:
    """64×48, four flat quadrants of different colours: every flip or turn changes it."""
    image = Image.new("RGB", (64, 48))
    colours = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 30)]
    for i, colour in enumerate(colours):
        x, y = (i % 2) * 32, (i // 2) * 24
        image.paste(colour, (x, y, x + 32, y + 24))
    return image


# How a camera stores a picture for each EXIF orientation (the TIFF/EXIF spec, tag 274): the
# stored pixels are the upright picture with this transform applied; viewers undo it.
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # displayed after turning 90° clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # displayed after turning 90° anticlockwise
}


def _with_orientation(upright: Image.Image, orientation: int) -> bytes:
    transform = STORED_AS[orientation]
    stored = upright.transpose(transform) if transform is not None else upright.copy()
    exif = Image.Exif()
    exif[274] = orientation
    return _save(stored, "JPEG", quality=95, exif=exif)


# -- orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_picture(orientation: int):
    upright = _upright()
    expected = to_model_input(_open(_save(upright, "JPEG", quality=95))[0], 32).astype(int)
    image, info = _open(_with_orientation(upright, orientation))
    actual = to_model_input(image, 32).astype(int)
    assert np.abs(actual - expected).mean() < 4, orientation
    assert (info.width, info.height) == (64, 48)  # the size as displayed
    if orientation != 1:
        # The check can fail: the stored pixels alone are a different picture.
        with Image.open(io.BytesIO(_with_orientation(upright, orientation))) as raw:
            stored = to_model_input(raw.convert("RGB"), 32).astype(int)
        assert np.abs(stored - expected).mean() > 30


# -- modes --------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    image, info = _open(_save(Image.new("CMYK", (20, 10), (255, 0, 0, 0)), "JPEG", quality=95))
    assert image.mode == "RGB" and info.format == "JPEG"
    r, g, b = image.getpixel((10, 5))
    assert r < 30 and g > 225 and b > 225  # full cyan ink


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.arange(40, dtype=np.uint16).reshape(4, 10) * 1000).astype(np.uint16)
    image, _ = _open(_save(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[-1, -1].tolist() == [255, 255, 255]
    # Mid-grey stays mid-grey; clipping to 8 bits would turn everything above 255 white.
    assert 100 < pixels[2, 0, 0] < 160


def test_palette_without_transparency():
    palette = Image.new("RGB", (10, 10), (30, 90, 200)).convert("P", palette=Image.Palette.ADAPTIVE)
    image, info = _open(_save(palette, "GIF"))
    assert image.mode == "RGB" and info.format == "GIF"
    assert np.abs(np.array(image.getpixel((5, 5))) - (30, 90, 200)).max() <= 8


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.paste(1, (5, 0, 10, 10))  # right half red, left half index 0 = transparent
    image, _ = _open(_save(palette, "PNG", transparency=0))
    assert image.getpixel((2, 5)) == WHITE
    assert image.getpixel((7, 5)) == (200, 0, 0)


def test_rgba_is_composited_onto_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (5, 0, 10, 10))
    rgba.paste((255, 0, 0, 128), (0, 0, 5, 5))
    image, _ = _open(_save(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 8)) == WHITE  # transparent black must not turn black
    assert image.getpixel((7, 5)) == (0, 0, 255)
    r, g, b = image.getpixel((2, 2))  # half-transparent red over white: pink
    assert r == 255 and 120 < g < 135 and 120 < b < 135


def test_la_and_l_become_gray_rgb():
    la = Image.new("LA", (10, 10), (60, 255))
    la.paste((0, 0), (0, 0, 5, 10))
    image, _ = _open(_save(la, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE and image.getpixel((7, 2)) == (60, 60, 60)
    image, _ = _open(_save(Image.new("L", (10, 10), 90), "PNG"))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (90, 90, 90)


def test_to_rgb_and_to_model_input_accept_any_mode():
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == WHITE
    array = to_model_input(Image.new("L", (50, 20), 128), 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert np.all(array == 128)


# -- animations ---------------------------------------------------------------------------------


def _animated_gif(size=(20, 10), colours=((250, 0, 0), (0, 250, 0), (0, 0, 250))) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def test_animated_gif_first_frame_and_frame_count():
    image, info = _open(_animated_gif())
    assert info == ImageInfo(format="GIF", width=20, height=10, frames=3)
    r, g, b = image.getpixel((5, 5))
    assert r > 240 and g < 10 and b < 10


def test_animation_frames_count_against_the_pixel_limit():
    data = _animated_gif()
    message = _refusal(data, max_pixels=20 * 10 * 2)
    assert "3 frames" in message and "400" in message
    assert _open(data, max_pixels=20 * 10 * 3)[1].frames == 3


# -- refusals ----------------------------------------------------------------------------------


def test_empty_file():
    assert "empty" in _refusal(b"")


def test_text_named_jpg(tmp_path: Path):
    path = tmp_path / "holiday.jpg"
    path.write_text("These are my holiday notes, not a picture.\n")
    with pytest.raises(InvalidImage, match="text, not an image"):
        open_image(path)


def test_html_page():
    assert "HTML" in _refusal(b"<!DOCTYPE html><html><body>hi</body></html>")


def test_truncated_jpeg():
    data = image_bytes(size=(300, 200), pattern="noise")
    message = _refusal(data[: len(data) // 2])
    assert "truncated" in message


def test_truncated_header():
    data = image_bytes(size=(300, 200), pattern="noise")
    assert "truncated or corrupt" in _refusal(data[:40])


@pytest.mark.parametrize(
    "svg",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">'
        b"<script>alert(1)</script></svg>",
        b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n<!-- logo -->\n'
        b"<svg><script>alert(1)</script></svg>",
    ],
)
def test_svg_is_refused_by_name(svg: bytes):
    assert "SVG" in _refusal(svg)


def test_png_header_followed_by_html():
    data = b"\x89PNG\r\n\x1a\n<html><script>alert(document.cookie)</script></html>"
    message = _refusal(data)
    assert "PNG" in message and "disguised" in message


def test_pixel_limit_is_checked_before_decoding():
    # Header of a 4000×3000 JPEG with almost no pixel data: decoding it would fail as truncated,
    # so a pixel-limit message proves the header alone was judged.
    data = _save(Image.new("RGB", (4000, 3000), (9, 9, 9)), "JPEG")[:2000]
    message = _refusal(data, max_pixels=1_000_000)
    assert "4000×3000" in message and "1,000,000" in message
    assert "truncated" in _refusal(data, max_pixels=20_000_000)


def test_pillow_decompression_bomb_is_refused():
    # 10,000 × 10,000 one-bit pixels compress to ~12 KB; Pillow's own ceiling refuses it even
    # when the site's limit would allow it, before any pixel is decoded.
    data = _save(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(data) < 50_000
    message = _refusal(data, max_pixels=10**10)
    assert "too many pixels" in message and "100000000" in message


def test_size_limit(tmp_path: Path):
    data = image_bytes(size=(64, 64), pattern="noise")
    assert "limit" in _refusal(data, max_bytes=100) and "100 bytes" in _refusal(data, max_bytes=100)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(InvalidImage, match=f"{len(data):,} bytes"):
        open_image(path, max_bytes=100)
    assert open_image(path, max_bytes=len(data))[1].format == "JPEG"


def test_format_not_allowed(settings):
    data = image_bytes(fmt="PNG")
    settings.IMAGETAGS = {**settings.IMAGETAGS, "ALLOWED_FORMATS": ["JPEG"]}
    message = _refusal(data)
    assert "PNG images are not accepted" in message and "JPEG" in message


def test_phone_jpeg_with_multi_picture_data_is_a_jpeg():
    # Pillow names JPEGs carrying an MPF extension (most phones) "MPO".
    main, preview = Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (40, 30))
    data = _save(main, "MPO", save_all=True, append_images=[preview])
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.format == "MPO"
    image, info = _open(data, max_pixels=40 * 30)
    assert info.format == "JPEG" and info.frames == 1  # the preview is never decoded
    assert image.getpixel((20, 15))[0] > 180


def test_django_file_and_upload_are_read_from_the_start(make_upload):
    upload = make_upload("a.jpg", size=(30, 20))
    upload.read(10)
    image, info = open_image(upload)
    assert (info.width, info.height) == (30, 20)
    assert upload.tell() == 0


# -- hashing ------------------------------------------------------------------------------------


def test_file_sha256_leaves_position_at_start(tmp_path: Path):
    data = image_bytes(pattern="noise")
    expected = hashlib.sha256(data).hexdigest()
    buffer = io.BytesIO(data)
    buffer.read(17)
    assert file_sha256(buffer, chunk_size=100) == expected
    assert buffer.tell() == 0
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    assert file_sha256(path) == file_sha256(str(path)) == expected


# -- decoding for the model ---------------------------------------------------------------------


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth photo-like picture (gradients and a disc) of any size."""
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    pixels = np.stack(
        [200 * x + 0 * y + 40 * disc, 180 * y + 0 * x, 120 + 100 * disc + 0 * x * y], axis=-1
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def test_draft_decodes_a_big_jpeg_small_but_never_below_the_model_input():
    data = _save(_photo((2000, 1500)), "JPEG", quality=90)
    full, full_info = _open(data)
    small, small_info = _open(data, draft_size=224)
    assert full.size == (2000, 1500)
    # 1/4 scale: 1/8 would make the short side 188, below the model's 224.
    assert small.size == (500, 375)
    assert small_info == full_info  # the file's own size is reported either way
    # The model input from the draft is the same picture as from the full decode.
    expected = to_model_input(full, 64).astype(int)
    assert np.abs(to_model_input(small, 64).astype(int) - expected).mean() < 3


def test_draft_keeps_the_upright_picture_and_its_displayed_size():
    upright = _photo((1600, 1200))
    stored = upright.transpose(STORED_AS[6])
    exif = Image.Exif()
    exif[274] = 6
    image, info = _open(_save(stored, "JPEG", quality=90, exif=exif), draft_size=224)
    assert (info.width, info.height) == (1600, 1200)
    assert image.size == (400, 300)
    expected = to_model_input(upright, 64).astype(int)
    assert np.abs(to_model_input(image, 64).astype(int) - expected).mean() < 3


def test_draft_still_refuses_a_truncated_jpeg():
    data = _save(_photo((1600, 1200)), "JPEG", quality=90)
    assert "truncated" in _refusal(data[: len(data) // 2], draft_size=224)


def test_draft_leaves_small_jpegs_and_reduces_other_formats_by_a_whole_factor():
    small = _save(_photo((400, 300)), "JPEG", quality=90)
    assert _open(small, draft_size=224)[0].size == (400, 300)  # half would be below 224
    png = _save(_photo((1600, 1200)), "PNG")
    # 1/2: 1/3 would make the short side 400, below twice the 224 (images.REDUCE_MARGIN).
    assert _open(png, draft_size=224)[0].size == (800, 600)
    assert _open(png)[0].size == (1600, 1200)  # without a draft size, the whole picture


# -- memory inside MAX_PIXELS -----------------------------------------------------------------


def test_a_huge_gif_is_reduced_right_after_decoding():
    # 30 KB of GIF, 6300 × 6300 pixels: 119 MB as RGB if kept at full size.
    data = _save(Image.new("P", (6300, 6300), 3), "GIF")
    image, info = _open(data, draft_size=224)
    assert (info.width, info.height) == (6300, 6300)  # the file's own size is still reported
    assert image.size == (450, 450)  # 1/14: at least 2 × 224, at most 4 × 224
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "picture",
    [
        Image.new("L", (2000, 1500), 90),
        Image.new("RGBA", (2000, 1500), (200, 0, 0, 128)),  # half-transparent: onto white
        Image.new("RGB", (2000, 1500), (10, 200, 30)).convert("P"),
        Image.new("I;16", (2000, 1500), 40000),
    ],
    ids=["gray", "rgba", "palette", "16-bit"],
)
def test_reduction_keeps_the_picture_of_every_mode(picture):
    data = _save(picture, "PNG")
    full, _ = _open(data)
    reduced, info = _open(data, draft_size=224)
    assert reduced.size == (667, 500) and (info.width, info.height) == (2000, 1500)
    difference = to_model_input(full, 64).astype(int) - to_model_input(reduced, 64).astype(int)
    assert np.abs(difference).max() <= 2


def test_reported_size_of_a_near_square_picture_survives_the_reduction():
    # Reduced 14 times, both sides round to 450: the size must still be the file's own.
    image, info = _open(_save(Image.new("RGB", (6300, 6290)), "PNG"), draft_size=224)
    assert image.size == (450, 450) and (info.width, info.height) == (6300, 6290)


def _many_frames_gif(frames: int) -> bytes:
    pictures = [Image.new("P", (2, 2), i % 2) for i in range(frames)]
    return _save(pictures[0], "GIF", save_all=True, append_images=pictures[1:], optimize=False)


def _count_gif_seeks(monkeypatch) -> list[int]:
    from PIL import GifImagePlugin

    seeks: list[int] = []
    real_seek = GifImagePlugin.GifImageFile._seek

    def counting_seek(self, frame, *args, **kwargs):
        seeks.append(frame)
        return real_seek(self, frame, *args, **kwargs)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", counting_seek)
    return seeks


def test_more_frames_than_max_frames_are_refused_counting_only_that_far(monkeypatch):
    data = _many_frames_gif(3000)
    assert Image.open(io.BytesIO(data)).n_frames == 3000
    seeks = _count_gif_seeks(monkeypatch)
    message = _refusal(data)  # the default cap, 1000
    assert message == "The image has more than 1,000 frames; the limit is 1,000."
    # Pillow's n_frames would read all 3000 frame headers; the cap stops after 1001 (and a
    # rewind or two), whatever the file holds.
    assert 1000 < len(seeks) < 1010


def test_max_frames_is_a_setting(settings, monkeypatch):
    settings.IMAGETAGS = {**getattr(settings, "IMAGETAGS", {}), "MAX_FRAMES": 10}
    seeks = _count_gif_seeks(monkeypatch)
    assert "more than 10 frames; the limit is 10" in _refusal(_many_frames_gif(50))
    assert len(seeks) < 15
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_FRAMES": 50}
    assert _open(_many_frames_gif(50))[1].frames == 50


def test_frames_over_the_pixel_cap_stop_counting_there(monkeypatch):
    # 100 × 100 × 3000 frames: the pixel cap (40,000 here) allows 4 frames, so counting stops
    # at 5 (and one more header, to tell "exactly 5" from "at least 5").
    frames = [Image.new("P", (100, 100), i % 2) for i in range(3000)]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], optimize=False)
    seeks = _count_gif_seeks(monkeypatch)
    message = _refusal(data, max_pixels=40_000)
    assert message == (
        "The image is 100×100 pixels × at least 5 frames; the limit is 40,000 pixels."
    )
    assert len(seeks) < 10


def test_multi_page_tiff_frames_are_capped(settings):
    settings.IMAGETAGS = {**getattr(settings, "IMAGETAGS", {}), "MAX_FRAMES": 3}
    pages = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    data = _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert "more than 3 frames; the limit is 3" in _refusal(data)
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_FRAMES": 5}
    image, info = _open(data)
    assert info.frames == 5 and image.getpixel((0, 0)) == (0, 0, 0)  # the first page
