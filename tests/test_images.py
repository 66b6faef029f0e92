"""The bad-image corpus: unusual but valid encodings decode to the right RGB image; bombs are refused unread."""
from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from operators.images import ImageDecodeError, declared_size, decode_image


def scene(h: int = 48, w: int = 64) -> np.ndarray:
    """An asymmetric RGB test image (a rotation or channel swap shows)."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // w, yy * 255 // h, ((xx // 8 + yy // 8) % 2) * 255], -1).astype(np.uint8)


def encode(img: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def test_grey_png_becomes_three_equal_channels():
    grey = scene()[..., 0]
    out = decode_image(encode(grey, ".png"))
    assert out.shape == (*grey.shape, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))


def test_16_bit_png_becomes_8_bit():
    rgb = scene()
    deep = (rgb.astype(np.uint16) * 257)[..., ::-1]                   # BGR, 16 bits per channel
    out = decode_image(encode(deep, ".png"))
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)


def test_png_with_alpha_keeps_its_colours():
    rgb = scene()
    bgra = np.dstack([rgb[..., ::-1], np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(rgb.shape[0], 0)])
    out = decode_image(encode(bgra, ".png"))
    assert out.shape == rgb.shape and np.array_equal(out, rgb)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 EXIF segment holding one IFD entry: Orientation (0x0112, SHORT) = ``orientation``."""
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_exif_rotated_jpeg_decodes_upright():
    upright = scene()
    stored = np.ascontiguousarray(np.rot90(upright, 1))               # the sensor's pixels, 90° counter-clockwise
    data = with_exif_orientation(encode(stored[..., ::-1], ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100), 6)
    out = decode_image(data)                                          # orientation 6: rotate 90° clockwise to view
    ref = decode_image(encode(upright[..., ::-1], ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100))
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - ref).mean() < 3 and np.abs(out.astype(int) - np.rot90(ref, 2)).mean() > 30


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width × height, with a few bytes of compressed data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    data = bomb_png(100_000, 100_000)
    assert declared_size(data) == (100_000, 100_000)
    t = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="declared size 100000x100000"):
        decode_image(data)
    assert time.perf_counter() - t < 0.1


def test_declared_size_of_jpeg_and_png_and_others():
    img = scene(30, 70)
    assert declared_size(encode(img, ".jpg")) == (70, 30)
    assert declared_size(encode(img, ".png")) == (70, 30)
    assert declared_size(encode(img, ".bmp")) is None and declared_size(b"\xff\xd8\x00") is None
    assert decode_image(encode(img, ".jpg"), max_pixels=70 * 30).shape == (30, 70, 3)
    with pytest.raises(ImageDecodeError):
        decode_image(encode(img, ".jpg"), max_pixels=70 * 30 - 1)


def test_cmyk_jpeg_decodes_to_its_rgb_colours():
    """``tests/data/cmyk.jpg`` (1.3 KB) was written once by Pillow 13 (``Image.fromarray(rgb).convert("CMYK")
    .save(…, quality=95)``; OpenCV cannot write CMYK) from the pattern below: it decodes to that RGB image."""
    from pathlib import Path

    data = (Path(__file__).parent / "data" / "cmyk.jpg").read_bytes()
    assert data[:2] == b"\xff\xd8" and b"Adobe" in data[:200]  # a JPEG with the Adobe (CMYK) marker
    yy, xx = np.mgrid[:48, :64]
    rgb = np.stack([xx * 255 // 63, yy * 255 // 47, ((xx // 8 + yy // 8) % 2) * 200 + 30], -1)
    img = decode_image(data)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - rgb).mean() < 3
