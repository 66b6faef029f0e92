"""The bad-image corpus: unusual but valid encodings decode to the right RGB image; bombs are refused unread."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import cv2
import numpy as np
import pytest

from operators import images
from operators.images import MAX_PIXELS, ImageDecodeError, declared_size, decode_image


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
    deep = (rgb.astype(np.uint16) * 257)[..., ::-1]  # BGR, 16 bits per channel
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
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # the sensor's pixels, 90° counter-clockwise
    data = with_exif_orientation(encode(stored[..., ::-1], ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100), 6)
    out = decode_image(data)  # orientation 6: rotate 90° clockwise to view
    ref = decode_image(encode(upright[..., ::-1], ".jpg", cv2.IMWRITE_JPEG_QUALITY, 100))
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - ref).mean() < 3 and np.abs(out.astype(int) - np.rot90(ref, 2)).mean() > 30


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width × height, with a few bytes of compressed data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding():
    data = bomb_png(100_000, 100_000)
    assert declared_size(data) == (100_000, 100_000)
    t = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="declared size 100000x100000"):
        decode_image(data)
    assert time.perf_counter() - t < 0.1


def test_declared_size_of_every_decoded_format():
    img = scene(30, 70)
    for ext in (".jpg", ".png", ".webp", ".tiff", ".bmp", ".ppm"):
        assert declared_size(encode(img, ext)) == (70, 30), ext
    assert declared_size(encode(img, ".gif")) is None and declared_size(b"\xff\xd8\x00") is None
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


# Bombs in every decoded format: headers declaring 12000 x 12000 = 144M pixels (over MAX_PIXELS) on a few bytes
# of data. Each is refused from its header, with its size and the limit named, before OpenCV sees it.


def no_imdecode(monkeypatch) -> None:
    def refuse(*_):
        raise AssertionError("cv2.imdecode called on a refused image")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)


def patched_jpeg(width: int, height: int, fill: bool = False) -> bytes:
    """A small baseline JPEG whose SOF0 declares width x height; ``fill``: one 0xFF fill byte before the SOF
    marker (``FF FF C0``, which JPEG allows and libjpeg skips)."""
    data = encode(scene(), ".jpg")
    i = data.index(b"\xff\xc0")
    data = data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]
    return data[:i] + b"\xff" + data[i:] if fill else data


def patched_tiff(width: int, height: int) -> bytes:
    """A small TIFF whose first IFD's ImageWidth (256) and ImageLength (257) declare width x height."""
    data = bytearray(encode(scene(), ".tiff"))
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    for k in range(struct.unpack(order + "H", data[ifd : ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        tag = struct.unpack(order + "H", data[e : e + 2])[0]
        if tag in (256, 257):  # rewritten as one LONG
            data[e + 2 : e + 12] = struct.pack(order + "HII", 4, 1, width if tag == 256 else height)
    return bytes(data)


def tiled_tiff(width: int, height: int, tile_w: int, tile_h: int) -> bytes:
    """A little-endian 8-bit RGB deflate TIFF of width x height in one tile of tile_w x tile_h (black, its data
    cut at 64 x 48 pixels: a few bytes)."""
    tile = zlib.compress(bytes(3 * min(tile_w * tile_h, 64 * 48)))
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 2),
        (277, 3, 3),
        (284, 3, 1),
        (322, 4, tile_w),
        (323, 4, tile_h),
        (324, 4, 8 + 2 + 12 * 11 + 4),
        (325, 4, len(tile)),
    ]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", v, 0) if kind == 3 else struct.pack("<I", v))
        for tag, kind, v in tags
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + tile


# A genuine 12000 x 12000 single-colour lossless WebP (38 bytes), written once by Pillow 13:
# Image.new("RGB", (12000, 12000), (120, 130, 140)).save(…, "WEBP", lossless=True, quality=0, method=0).
# Before the header check covered WebP, OpenCV decoded it (0.43 GB of pixels) and it was indexed as ok.
WEBP_BOMB = (
    b"RIFF\x1e\x00\x00\x00WEBPVP8L\x11\x00\x00\x00/\xdf\xee\xb7\x0b\x07P\xc1\xe2\x95\xb1\xff\x81\x88\xe8\x7f\x00\x00"
)


def patched_webp(width: int, height: int, kind: str) -> bytes:
    """A small WebP declaring a width x height canvas: lossy (``VP8 `` frame header), lossless (``VP8L``
    header) or extended (a ``VP8X`` canvas around a small lossless image)."""
    lossy = encode(scene(), ".webp", cv2.IMWRITE_WEBP_QUALITY, 90)
    lossless = encode(scene(), ".webp", cv2.IMWRITE_WEBP_QUALITY, 101)
    assert lossy[12:16] == b"VP8 " and lossless[12:16] == b"VP8L"
    if kind == "VP8 ":
        return lossy[:26] + struct.pack("<HH", width, height) + lossy[30:]
    bits = struct.unpack("<I", lossless[21:25])[0] & ~((1 << 28) - 1) | (width - 1) | (height - 1) << 14
    if kind == "VP8L":
        return lossless[:21] + struct.pack("<I", bits) + lossless[25:]
    body = (
        b"WEBP"
        + b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00" * 4
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
        + lossless[12:]
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


BOMBS = {
    "webp-genuine": lambda: WEBP_BOMB,
    "webp-vp8": lambda: patched_webp(12000, 12000, "VP8 "),
    "webp-vp8l": lambda: patched_webp(12000, 12000, "VP8L"),
    "webp-vp8x": lambda: patched_webp(12000, 12000, "VP8X"),
    "tiff": lambda: patched_tiff(12000, 12000),
    "jpeg-fill-byte": lambda: patched_jpeg(12000, 12000, fill=True),
    "jpeg": lambda: patched_jpeg(12000, 12000),
    "png": lambda: bomb_png(12000, 12000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_in_every_format_are_refused_from_their_header(name, monkeypatch):
    data = BOMBS[name]()
    assert len(data) < 3000
    no_imdecode(monkeypatch)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning from Pillow
        with pytest.raises(ImageDecodeError, match=f"declared size 12000x12000\\b.* exceeds {MAX_PIXELS} pixels"):
            decode_image(data)
    assert time.perf_counter() - t < 0.1
    assert declared_size(data) == (12000, 12000)


def test_header_sizes_within_the_budget_are_decoded():
    """The bombs' headers are read right: the same headers declaring 64 x 48 decode (the patched WebPs' first
    bytes stay the encoder's)."""
    assert decode_image(patched_jpeg(64, 48, fill=True)).shape == (48, 64, 3)
    assert decode_image(patched_tiff(64, 48)).shape == (48, 64, 3)
    assert decode_image(patched_webp(64, 48, "VP8L")).shape == (48, 64, 3)
    assert decode_image(tiled_tiff(64, 48, 64, 48)).shape == (48, 64, 3)


def test_a_tiff_tile_over_the_budget_is_refused(monkeypatch):
    """A tile is decoded whole into a buffer of its own size, whatever the image's."""
    no_imdecode(monkeypatch)
    with pytest.raises(ImageDecodeError, match=f"declared tile size 12000x12000 of a 64x48 TIFF exceeds {MAX_PIXELS}"):
        decode_image(tiled_tiff(64, 48, 12000, 12000))


def ico(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "ICO", sizes=[(32, 32)])
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, make, reason",
    [
        ("gif", lambda: encode(scene(), ".gif"), "unsupported image format GIF"),
        ("jpeg2000", lambda: encode(scene(), ".jp2"), "unsupported image format JPEG2000"),
        ("ico", lambda: ico(scene()), "unsupported image format ICO"),
        ("garbage", lambda: b"not an image" * 10, "unsupported image format: not recognised"),
        ("png-cut-in-its-header", lambda: encode(scene(), ".png")[:20], "unreadable PNG header"),
        ("webp-without-a-frame-header", lambda: WEBP_BOMB[:20] + b"\x00" * 18, "unreadable WEBP header"),
    ],
)
def test_other_formats_and_unreadable_headers_are_refused_unread(kind, make, reason, monkeypatch):
    """GIF (a frame may declare its own size apart from the screen's), JPEG 2000 (the JP2 box and the codestream
    each declare a size), ICO and anything else not in FORMATS are refused, though OpenCV decodes some."""
    data = make()
    no_imdecode(monkeypatch)
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


@pytest.mark.parametrize(
    "ext, params",
    [
        (".jpg", ()),
        (".png", ()),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),
        (".tiff", ()),
        (".bmp", ()),
        (".ppm", ()),
        (".pgm", ()),
        (".pbm", ()),
    ],
)
def test_every_decoded_format_gives_what_opencv_decodes(ext, params):
    """Small images in each format decode to OpenCV's own pixels (unchanged by the header check); the lossless
    ones to the image itself."""
    img = scene()
    if ext in (".pgm", ".pbm"):
        img = np.repeat(img[..., :1] if ext == ".pgm" else (img[..., 2:] > 127) * np.uint8(255), 3, -1)
    data = encode(np.ascontiguousarray(img[..., ::-1]) if ext not in (".pgm", ".pbm") else img[..., 0], ext, *params)
    out = decode_image(data)
    assert np.array_equal(
        out, cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    )
    if ext not in (".jpg",) and params != (cv2.IMWRITE_WEBP_QUALITY, 80):
        assert np.array_equal(out, img), ext
