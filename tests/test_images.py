"""Per-image conversion of the shard stage: every awkward input is converted or rejected with a reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.fetch import noai_directive
from pipelines.images import ImageSettings, Rejected, _resize, process, target_size
from shard_inputs import BAD_FILES, MAX_PIXELS, UNUSUAL_FILES, bomb_png, encode, exif_rotated_jpeg, jpeg, photo

SETTINGS = ImageSettings(image_size=64, resize_mode="keep_ratio", quality=95, min_size=16, max_pixels=MAX_PIXELS)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    im.load()
    return im


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_inputs_are_rejected_with_their_reason(name):
    make, reason = BAD_FILES[name]
    with pytest.raises(Rejected) as err:
        process(make(), SETTINGS)
    assert err.value.reason == reason
    assert str(err.value).startswith(reason)


@pytest.mark.parametrize("name", sorted(UNUSUAL_FILES))
def test_unusual_inputs_become_rgb_jpegs(name):
    out = process(UNUSUAL_FILES[name](), SETTINGS)
    im = decode(out.data)
    assert im.mode == "RGB"
    assert im.size == out.size


def test_transparency_is_composited_over_white():
    for name in ("alpha.png", "palette.png"):
        im = np.asarray(decode(process(UNUSUAL_FILES[name](), SETTINGS).data), np.int32)
        left, right = im[:, 4:24].mean(axis=(0, 1)), im[:, 40:60].mean(axis=(0, 1))
        assert (left > 240).all(), (name, left)  # transparent -> white, not black
        assert right.max() - right.min() > 100, (name, right)  # the opaque colour survives


def test_16_bit_is_scaled_not_clipped():
    im = np.asarray(decode(process(UNUSUAL_FILES["grey16.png"](), SETTINGS).data), np.int32)
    assert im[:, 4:24].mean() > 245
    assert abs(im[:, 40:60].mean() - 128) < 6  # clipping would give 255


def test_exif_rotation_comes_out_upright():
    out = process(exif_rotated_jpeg(), SETTINGS)
    im = np.asarray(decode(out.data), np.int32)
    assert out.original_size == (90, 60)
    assert out.size == (60, 90)  # portrait once upright
    top, bottom = im[:20].mean(axis=(0, 1)), im[-20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top  # red band on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_animated_gif_keeps_the_first_frame():
    im = np.asarray(decode(process(UNUSUAL_FILES["animated.gif"](), SETTINGS).data), np.int32)
    r, g, b = im.mean(axis=(0, 1))
    assert r > 200 and b < 60


def test_cmyk_keeps_its_colours():
    from shard_inputs import cmyk_jpeg

    expected = np.asarray(Image.open(io.BytesIO(cmyk_jpeg())).convert("RGB"), np.float32)
    got = np.asarray(decode(process(cmyk_jpeg(), SETTINGS).data), np.float32)
    assert np.abs(got - expected).mean() < 6


def test_truncated_jpeg_within_size_is_rejected_too():
    """The keep-the-original path still decodes the whole stream (at 1/8 scale) before keeping it."""
    data = jpeg(9, (60, 40), quality=95)
    with pytest.raises(Rejected) as err:
        process(data[: len(data) * 2 // 3], SETTINGS)
    assert err.value.reason == "undecodable"


def test_rotated_png_is_resized_upright():
    stored = photo(8, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = process(encode(stored, "PNG", exif=exif.tobytes()), SETTINGS)
    assert out.size == (64, 96)


def test_rgb_jpeg_within_size_keeps_its_bytes():
    data = jpeg(1, (60, 40), quality=80)
    out = process(data, SETTINGS)
    assert out.kept_original and out.data == data and out.size == (60, 40)


def test_large_jpeg_is_downscaled_with_good_quality():
    """Draft-mode decoding plus the antialiased bicubic resize must stay close to a full-resolution Lanczos resize."""
    src = photo(5, (640, 480))
    data = encode(src, "JPEG", quality=95)
    out = process(data, ImageSettings(image_size=64))
    assert not out.kept_original
    assert out.size == (85, 64)  # shorter side to image_size, aspect kept
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(out.size, Image.LANCZOS), np.float64)
    got = np.asarray(decode(out.data), np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean((got - reference) ** 2))
    assert psnr > 30, psnr


@pytest.mark.parametrize("size,out,box", [
    ((500, 375), (341, 256), None),  # the common web case: less than 2x, no DCT scaling helps (bilinear)
    ((640, 430), (96, 64), None),  # a large factor (area)
    ((300, 200), (64, 64), (50, 0, 250, 200)),  # center_crop's box
])
def test_resize_stays_close_to_pillows_bicubic(size, out, box):
    """OpenCV's resize stands in for Pillow's antialiased bicubic: the same picture, over 40 dB PSNR."""
    im = photo(7, size)
    got = np.asarray(_resize(np.asarray(im), out, box), np.float64)
    want = np.asarray(im.resize(out, Image.BICUBIC, box=box), np.float64)
    assert got.shape == want.shape == (out[1], out[0], 3)
    psnr = 10 * np.log10(255 ** 2 / np.mean((got - want) ** 2))
    assert psnr > 40, psnr


@pytest.mark.parametrize("mode,size,expected", [
    ("keep_ratio", (300, 200), (96, 64)),
    ("keep_ratio", (200, 300), (64, 96)),
    ("keep_ratio", (50, 40), None),  # never upscaled
    ("center_crop", (300, 200), (64, 64)),
    ("center_crop", (50, 40), (40, 40)),
    ("none", (300, 200), None),
])
def test_target_sizes(mode, size, expected):
    settings = ImageSettings(image_size=64, resize_mode=mode)
    assert target_size(size, settings) == expected


def test_center_crop_output_is_square():
    out = process(jpeg(2, (300, 200)), ImageSettings(image_size=64, resize_mode="center_crop"))
    assert out.size == (64, 64) and decode(out.data).size == (64, 64)


def test_resize_mode_none_keeps_the_size_but_converts():
    out = process(UNUSUAL_FILES["alpha.png"](), ImageSettings(image_size=16, resize_mode="none"))
    assert out.size == (64, 48) and not out.kept_original


@pytest.mark.parametrize("header,expected", [
    (None, False), ("", False), ("noindex", False), ("noai", True), ("noimageai", True),
    ("noindex, NoAI", True), ("otherbot: noai", False), ("vitscale: noimageai", True),
])
def test_noai_header(header, expected):
    assert noai_directive(header) is expected


def test_a_small_png_that_decodes_huge_is_refused_by_the_memory_budget():
    """9400x9400 RGBA in 343 KB: under max_pixels, but 337 MiB decoded (over 1 GiB while converted)."""
    data = bomb_png()
    assert len(data) < 1 << 20 and 9400 * 9400 <= ImageSettings().max_pixels
    with pytest.raises(Rejected) as err:
        process(data, ImageSettings())
    assert err.value.reason == "too_large" and "337 MiB, over max_decoded_mb 256" in str(err.value)


def test_the_budget_counts_bands_bit_depth_and_the_draft_size():
    """What counts is what Pillow would decode: 16-bit greys take twice the bytes of 8-bit ones, and a
    JPEG decoded at a DCT scale only takes that scale's pixels."""
    small = ImageSettings(image_size=64, max_decoded_mb=6)
    grey8 = encode(Image.new("L", (2048, 2048), 128), "PNG")  # 4 MiB decoded
    grey16 = encode(Image.fromarray(np.full((2048, 2048), 30000, np.uint16)), "PNG")  # 8 MiB
    assert process(grey8, small).size == (64, 64)
    with pytest.raises(Rejected, match="too_large: 2048x2048 I;16 decodes to 8 MiB"):
        process(grey16, small)
    big = photo(3, (2048, 1536))  # 9 MiB as RGB
    with pytest.raises(Rejected, match="too_large"):
        process(encode(big, "PNG"), small)
    assert process(encode(big, "JPEG", quality=90), small).size == (85, 64)  # decoded at 1/8 scale


@pytest.mark.parametrize("size,settings", [
    ((500, 350), ImageSettings(image_size=256)),  # under 2x: full decode, bilinear
    ((640, 480), ImageSettings(image_size=64)),  # DCT scale 1/4, then area
    ((1200, 900), ImageSettings(image_size=100)),  # 1/8
    ((1001, 751), ImageSettings(image_size=300)),  # 1/2 of odd sides: 501x376, rounded up as libjpeg does
    ((300, 200), ImageSettings(image_size=64, resize_mode="center_crop")),
    ((60, 40), ImageSettings(image_size=64)),  # within size: the original bytes, checked at 1/8
    ((400, 300), ImageSettings(image_size=128, quality=75)),  # another quality: the same tables
])
def test_fast_path_gives_the_pillow_paths_bytes(size, settings):
    """The fast path (simplejpeg's decode, OpenCV's resize and encode) is the Pillow path's output byte
    for byte: all wrap libjpeg-turbo with the same defaults and the same DCT scale."""
    from pipelines.images import _turbo_jpeg, _pillow_path

    data = jpeg(11, size, quality=92)
    out = target_size(size, settings)
    fast = _turbo_jpeg(data, size, out, settings)
    slow = _pillow_path(Image.open(io.BytesIO(data)), data, settings, 1, out)
    assert fast is not None and fast == slow
    assert process(data, settings) == fast


def test_a_jpeg_libjpeg_reports_damaged_gets_pillows_reason():
    """A cut-off stream: the fast path gives no image, and the Pillow path then says why."""
    from pipelines.images import _turbo_jpeg

    data = jpeg(12, (500, 350), quality=95)
    cut = data[: len(data) * 3 // 4]
    assert _turbo_jpeg(cut, (500, 350), (366, 256), ImageSettings(image_size=256)) is None
    with pytest.raises(Rejected) as err:
        process(cut, ImageSettings(image_size=256))
    assert err.value.reason == "undecodable"
    assert "truncated" in str(err.value)
