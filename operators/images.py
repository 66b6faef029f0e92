"""Image decoding, resizing and cropping (numpy/OpenCV, RGB uint8 HxWx3)."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import (
    BmpImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,  # noqa: F401 - registers WebP's signature check
)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image."""


MAX_PIXELS = 1 << 27  # 134M pixels: far above any photograph, far below what would exhaust a worker's memory

# The formats decoded: each one OpenCV decodes and whose declared size is read (by Pillow, without decoding)
# before it does. Any other bytes - formats Pillow or OpenCV know but not listed here (GIF, AVIF, JPEG 2000,
# HDR, ...) and bytes Pillow does not recognise - are refused before OpenCV sees them.
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "PPM")
_HEADER_READERS = {  # Pillow's image classes: constructing one reads the header only (pixels load lazily)
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "PPM": PpmImagePlugin.PpmImageFile,
}


def _identify(data: bytes) -> str | None:
    """The format whose signature Pillow's plugins recognise in the first bytes (nothing is opened): one of
    FORMATS if any matches, else any other format Pillow knows (to name it), else None."""
    prefix = data[:16]

    def matches(fmt: str) -> bool:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            return accept is not None and bool(accept(prefix))  # a str: this format, support not installed
        except Exception:  # noqa: BLE001 - a signature check failing on odd bytes is no match
            return False

    for fmt in FORMATS:
        if matches(fmt):
            return fmt
    Image.init()  # every plugin, only to name a refused format
    return next((fmt for fmt in Image.ID if matches(fmt)), None)


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """The canvas size a RIFF WebP's first chunk declares (VP8 frame header, VP8L header or VP8X canvas, RFC 9649),
    the size libwebp decodes to. Pillow's WebP reader creates libwebp's decoder - which reserves two canvas-sized
    RGBA buffers - before it reports the size, so the size is read from these fields, as Pillow itself does to
    check its own limit first."""
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _header(data: bytes) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """Format, declared (width, height) and, for a tiled TIFF, declared tile (width, height), read without
    decoding. Multi-image files (TIFF pages, animated WebP/PNG) declare the size of the first image or of the
    canvas, which is what OpenCV decodes. Raises :class:`ImageDecodeError` for bytes that are not one of
    FORMATS or whose header cannot be read."""
    fmt = _identify(data)
    if fmt not in FORMATS:
        detail = f" {fmt}" if fmt else ": not recognised as any"
        raise ImageDecodeError(f"unsupported image format{detail} (decoded: {', '.join(FORMATS)})")
    if fmt == "WEBP":
        size = _webp_canvas(data)
        if size is None:
            raise ImageDecodeError("unreadable WEBP header")
        return fmt, size, None
    try:
        with _HEADER_READERS[fmt](io.BytesIO(data)) as im:
            tile = (im.tag_v2.get(322), im.tag_v2.get(323)) if fmt == "TIFF" else None  # TileWidth, TileLength
            return fmt, im.size, tile if tile and all(isinstance(t, int) for t in tile) else None
    except Exception as e:  # noqa: BLE001 - whatever a broken header makes the reader raise
        raise ImageDecodeError(f"unreadable {fmt} header: {type(e).__name__}: {e}") from None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) the header declares, read without decoding; None for bytes that are not one of
    :data:`FORMATS` or whose header cannot be read."""
    try:
        return _header(data)[1]
    except ImageDecodeError:
        return None


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image as JPEG bytes (OpenCV's default quality, 95)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {rgb.shape} as JPEG")
    return data.tobytes()


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG/WebP/TIFF/BMP/PPM bytes to an RGB uint8 array: EXIF orientation applied (OpenCV), grey,
    16-bit, CMYK and alpha images converted to 8-bit RGB. Other formats are refused, and so is a header
    declaring more than ``max_pixels`` (a decompression bomb, or a TIFF tile that large), before anything is
    decoded."""
    if not data:
        raise ImageDecodeError("empty file")
    fmt, (w, h), tile = _header(data)
    if w * h > max_pixels:
        raise ImageDecodeError(f"declared size {w}x{h} ({fmt}) exceeds {max_pixels} pixels (not decoded)")
    if tile and tile[0] * tile[1] > max_pixels:
        raise ImageDecodeError(
            f"declared tile size {tile[0]}x{tile[1]} of a {w}x{h} {fmt} exceeds {max_pixels} pixels (not decoded)"
        )
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"declared size {w}x{h} ({fmt}) is empty")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ImageDecodeError(f"cannot decode image ({fmt})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class BadBoxError(ValueError):
    """A crop box that selects no part of the image."""


def crop(img: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    """Crop ``box = (x0, y0, x1, y1)`` in pixels (clipped to the image); ``None`` or all-NaN keeps it whole.

    A box with some coordinates missing, x1 ≤ x0 or y1 ≤ y0, or no overlap with the image raises
    :class:`BadBoxError`.
    """
    if box is None or all(np.isnan(v) for v in box):
        return img
    h, w = img.shape[:2]
    if any(np.isnan(v) for v in box):
        raise BadBoxError(f"crop box {tuple(box)} has missing coordinates")
    if not (box[2] > box[0] and box[3] > box[1] and box[0] < w and box[1] < h and box[2] > 0 and box[3] > 0):
        raise BadBoxError(f"crop box {tuple(box)} selects nothing of the {w}x{h} image")
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 1, w)), int(np.clip(np.ceil(box[3]), y0 + 1, h))
    return img[y0:y1, x0:x1]


def center_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float]:
    """The central box covering ``fraction`` of the width and of the height."""
    m = (1.0 - fraction) / 2.0
    return (width * m, height * m, width * (1 - m), height * (1 - m))


def resize_max_side(img: np.ndarray, max_side: int, upscale: bool = False) -> tuple[np.ndarray, float]:
    """Resize so that the longer side is ``max_side`` (only shrinking unless ``upscale``).

    Returns the image and the factor applied (new = old * factor).
    """
    h, w = img.shape[:2]
    factor = max_side / max(h, w)
    if factor >= 1.0 and not upscale:
        return img, 1.0
    return rescale(img, factor), factor


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale by ``factor`` (area interpolation when shrinking, bilinear when enlarging)."""
    if factor == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
