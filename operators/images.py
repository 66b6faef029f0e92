"""Image decoding, resizing and cropping (numpy/OpenCV, RGB uint8 HxWx3)."""
from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image."""


MAX_PIXELS = 1 << 27  # 134M pixels: far above any photograph, far below what would exhaust a worker's memory


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a PNG or JPEG header declares, read without decoding; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):  # walk the JPEG segments up to the frame header (SOF0-15, not DHT/JPG/DAC)
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image as JPEG bytes (OpenCV's default quality, 95)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {rgb.shape} as JPEG")
    return data.tobytes()


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG/… bytes to an RGB uint8 array: EXIF orientation applied (OpenCV), grey, 16-bit, CMYK
    and alpha images converted to 8-bit RGB. A header declaring more than ``max_pixels`` (a decompression
    bomb) is refused before anything is decoded."""
    if not data:
        raise ImageDecodeError("empty file")
    size = declared_size(data)
    if size and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(f"declared size {size[0]}x{size[1]} exceeds {max_pixels} pixels (not decoded)")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ImageDecodeError("cannot decode image")
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
