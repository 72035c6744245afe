"""images.convert: validation, EXIF orientation, colour modes, resizing, determinism."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from landmark_tf.data import images


def _encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def test_rgb_jpeg_round_trip_keeps_size_and_is_deterministic():
    raw = _encode(_noise(30, 40))
    out, h, w = images.convert(raw, max_side=64, quality=90)
    assert (h, w) == (30, 40)
    decoded = _decode(out)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    assert images.convert(raw, 64, 90) == (out, h, w)
    assert len(images.convert(raw, 64, 20)[0]) < len(out)  # quality is applied


@pytest.mark.parametrize(
    ("size", "max_side", "expected_hw"),
    [((400, 200), 100, (50, 100)), ((200, 400), 100, (100, 50)), ((333, 97), 0, (97, 333)),
     ((1600, 1200), 200, (150, 200))],  # the last one decodes at 1/4 scale first (draft)
)
def test_resize_keeps_aspect(size, max_side, expected_hw):
    raw = _encode(_noise(size[1], size[0]))
    out, h, w = images.convert(raw, max_side=max_side, quality=85)
    assert (h, w) == expected_hw
    assert _decode(out).size == (w, h)


def test_exif_orientation_is_applied():
    # Red left half, blue right half; orientation 6 means "rotate 90 degrees clockwise to view".
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = _encode(Image.fromarray(array), exif=exif.tobytes(), quality=95)
    out, h, w = images.convert(raw, max_side=0, quality=95)
    assert (h, w) == (40, 20)
    pixels = np.asarray(_decode(out)).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # red is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # blue at the bottom


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(Image.new("L", (16, 12), 128)),  # grayscale JPEG
        lambda: _encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0))),  # CMYK JPEG
        lambda: _encode(_noise(12, 16), "PNG"),  # PNG bytes behind a .jpg name
        lambda: _encode(Image.new("P", (16, 12), 3), "GIF"),
        lambda: _encode(Image.new("I;16", (16, 12), 40000), "PNG"),
    ],
    ids=["gray", "cmyk", "png", "gif", "png16"],
)
def test_other_modes_become_three_channel_jpeg(make):
    out, h, w = images.convert(make(), max_side=100, quality=90)
    decoded = _decode(out)
    assert decoded.mode == "RGB" and (h, w) == (12, 16)


def test_cmyk_colour_and_16_bit_levels_survive():
    red = _decode(images.convert(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0))), 0, 95)[0])
    r, g, b = np.asarray(red)[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60
    grey = _decode(images.convert(_encode(Image.new("I;16", (8, 8), 40000), "PNG"), 0, 95)[0])
    assert abs(int(np.asarray(grey)[4, 4, 0]) - 40000 // 256) <= 3  # not clipped to white


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    out, _, _ = images.convert(_encode(rgba, "PNG"), max_side=0, quality=95)
    assert np.asarray(_decode(out)).min() > 240


@pytest.mark.parametrize(
    ("raw", "category"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not_an_image"),
        (_encode(_noise(64, 64))[:-300], "corrupt"),
        (_encode(_noise(64, 64))[:400], "corrupt"),
        (_encode(_noise(64, 64), "PNG")[:-50], "corrupt"),
    ],
    ids=["empty", "text", "truncated-tail", "truncated-head", "truncated-png"],
)
def test_bad_input_raises_skip_with_reason(raw, category):
    with pytest.raises(images.SkipImage) as e:
        images.convert(raw, max_side=32, quality=90)
    assert e.value.category == category
    assert e.value.reason.startswith(category)


def test_truncated_fails_even_when_pillow_global_allows_it(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(images.SkipImage):
        images.convert(_encode(_noise(64, 64))[:-300], max_side=0, quality=90)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_target_size():
    assert images.target_size(800, 600, 512) == (512, 384)
    assert images.target_size(10, 5000, 100) == (1, 100)  # never a zero side
    assert images.target_size(300, 200, 512) == (300, 200)  # no upscaling
