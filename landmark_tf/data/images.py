"""Validate one source image and re-encode it as a 3-channel baseline JPEG.

Pure Pillow, no TensorFlow, so the same function serves the local converter, an Apache Beam
pipeline and tests. Every image is decoded fully (truncation is an error, never grey fill) and
re-encoded, even when it already is a small RGB JPEG: the output then depends only on the pixels
and the settings, carries no EXIF/ICC/progressive oddities, and is deterministic.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, ImageFile, UnidentifiedImageError

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
# landmark-tfrecords' defaults (--max_image_side, --jpeg_quality): the canonical form of a photo.
DEFAULT_MAX_SIDE = 800
DEFAULT_QUALITY = 90
_WHITE = (255, 255, 255)
# A JPEG is first decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) while it stays at least
# this many times the target size; the final antialiased resample then looks like a full-size one.
# Bilinear (Pillow's, antialiased when shrinking): ~20% faster than bicubic on 800x600 -> 512,
# and the model input is resized bilinearly anyway.
_RESAMPLE = Image.Resampling.BILINEAR
_REDUCING_GAP = 2.0


class SkipImage(Exception):
    """The input cannot become a training image. `reason` is `category: detail`; categories are
    empty, not_an_image, corrupt, too_large (and missing, unreadable from the reader)."""

    def __init__(self, category: str, detail: str = ""):
        self.category = category
        self.reason = f"{category}: {detail}" if detail else category
        super().__init__(self.reason)


def convert(raw: bytes, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """Decodes `raw` fully, applies EXIF orientation, makes it RGB, resizes, encodes JPEG.

    Args:
      raw: the file's bytes (any format Pillow reads; the extension is irrelevant).
      max_side: the longer side is scaled down to this many pixels, keeping the aspect ratio;
        smaller images are not enlarged; 0 keeps the size.
      quality: JPEG quality 1..100.

    Returns:
      (jpeg_bytes, height, width) of the encoded 3-channel baseline JPEG.

    Raises:
      SkipImage: empty, not an image, truncated/corrupt, or a decompression bomb.
    """
    if not raw:
        raise SkipImage("empty", "0 bytes")
    with _strict_decoding():
        image, size = _decode(raw, max_side)
    orientation = _orientation(image)
    image = _to_rgb(image)
    if image.size != size:
        image = image.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    if orientation in _ORIENTATION:
        image = image.transpose(_ORIENTATION[orientation])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue(), image.height, image.width


def canonical_jpeg(raw: bytes) -> bytes:
    """The one canonical form of a photo for training and serving: `convert` with the
    converter's defaults (EXIF orientation applied, longer side at most 800 px, RGB, JPEG q90).

    Training records hold exactly these bytes, so landmark-embed --csv, which passes original
    files through here and decodes the result as the input pipeline does, gives the model the
    same pixels as --records of the same photo. Raises SkipImage as `convert`.
    """
    return convert(raw, DEFAULT_MAX_SIDE, DEFAULT_QUALITY)[0]


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) after scaling the longer side down to `max_side`, aspect kept."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated files must fail, whatever another library set the Pillow global to."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode(raw: bytes, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """The fully loaded image (maybe DCT-downscaled) and its final (width, height)."""
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise SkipImage("not_an_image", "format not recognised") from None
    except Image.DecompressionBombError as e:
        raise SkipImage("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipImage("corrupt", str(e) or type(e).__name__) from None
    size = target_size(image.width, image.height, max_side)
    try:
        if size != image.size:
            image.draft(None, (int(size[0] * _REDUCING_GAP), int(size[1] * _REDUCING_GAP)))
        image.load()
    except Image.DecompressionBombError as e:
        raise SkipImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on broken data
        raise SkipImage("corrupt", str(e) or type(e).__name__) from None
    return image, size


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels wrong
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from grayscale, palette, CMYK, 16-bit and alpha images (alpha over white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit samples: keep the top 8 bits instead of clipping everything above 255 to white.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
