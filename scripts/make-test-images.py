#!/usr/bin/env python3
"""Makes the images of the thumbnail tests and benchmark (Pillow + numpy).

    make-test-images.py fixtures DIR   small test images (committed under tests/data/images)
    make-test-images.py corpus DIR     photo-like 1-24 MP JPEGs and PNGs for benches/thumbnail.rs

Both are deterministic (fixed seeds). The corpus is large (a few hundred MB of pixels while it
is made, about 60 MB on disk) and is never committed: the benchmark makes it in a cache folder.
Existing corpus files are kept, so a second run is instant.
"""

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin


# ---------------------------------------------------------------------------------------------
# helpers


def photo(width, height, seed):
    """An RGB image with what makes photos hard to compress and to shrink: smooth gradients,
    hard edges, fine texture and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    r = 128 + 90 * np.sin(x * 3.1 + 0.5) * np.cos(y * 2.3)
    g = 128 + 80 * np.sin((x + y) * 4.0 + 1.0)
    b = 120 + 70 * np.cos(x * 5.0 - y * 4.0)
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[..., 0] = r
    rgb[..., 1] = g
    rgb[..., 2] = b
    texture = 18 * np.sin(np.arange(width, dtype=np.float32) / 2.7)[None, :] * np.sin(
        np.arange(height, dtype=np.float32) / 3.9
    )[:, None]
    rgb += texture[..., None]
    for channel in range(3):
        rgb[..., channel] += rng.standard_normal((height, width), dtype=np.float32) * 5
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    scale = max(width, height)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(scale // 40, scale // 6))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + size, y0 + size * 2 // 3], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + size // 2, y0 + size], fill=colour)
    for _ in range(30):
        points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=max(1, scale // 800))
    return image


def exif_bytes(orientation=1, gps=False):
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    exif[0x0110] = "Model 1"  # Model
    exif[0x0112] = orientation
    if gps:
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 1.0)}
    return exif.tobytes()


def png_chunk(kind, data):
    chunk = kind + data
    return struct.pack(">I", len(data)) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)


def raw_png(width, height, bit_depth, colour_type, rows, extra_chunks=()):
    """Writes a PNG by hand (Pillow cannot write 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra_chunks)
        + png_chunk(b"IDAT", zlib.compress(raw, 6))
        + png_chunk(b"IEND", b"")
    )


def rgb16_png(array16):
    height, width, channels = array16.shape
    colour_type = {3: 2, 4: 6}[channels]
    rows = [array16[y].astype(">u2").tobytes() for y in range(height)]
    return raw_png(width, height, 16, colour_type, rows)


def save_jpeg(image, path, **options):
    image.save(path, "JPEG", **options)


# ---------------------------------------------------------------------------------------------
# fixtures


def quadrants(width, height):
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width // 2 - 1, height // 2 - 1], fill=(255, 0, 0))
    draw.rectangle([width // 2, 0, width - 1, height // 2 - 1], fill=(0, 255, 0))
    draw.rectangle([0, height // 2, width // 2 - 1, height - 1], fill=(0, 0, 255))
    return image


# What must be done to the displayed image to get the stored one, per EXIF orientation.
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def fixtures(out):
    out.mkdir(parents=True, exist_ok=True)

    # EXIF orientations: every file displays as the same 400x240 quadrants once turned upright.
    displayed = quadrants(400, 240)
    for orientation, transpose in STORE.items():
        stored = displayed if transpose is None else displayed.transpose(transpose)
        buffer = io.BytesIO()
        stored.save(buffer, "JPEG", quality=90, exif=exif_bytes(orientation))
        check = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
        assert check.size == displayed.size, (orientation, check.size)
        assert check.getpixel((10, 10))[0] > 200, orientation  # red top-left once upright
        (out / f"orientation-{orientation}.jpg").write_bytes(buffer.getvalue())

    # Metadata that must not reach a thumbnail.
    picture = photo(480, 360, 7)
    save_jpeg(picture, out / "exif-gps.jpg", quality=85, exif=exif_bytes(1, gps=True))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret text")
    info.add_itxt("Description", "secret itxt", lang="en")
    # Transparent in one corner, so the thumbnail is a PNG whose chunks can be checked.
    small = picture.resize((240, 180)).convert("RGBA")
    ImageDraw.Draw(small).rectangle([0, 0, 59, 44], fill=(0, 0, 0, 0))
    small.save(out / "metadata.png", "PNG", pnginfo=info, exif=exif_bytes(1, gps=True))

    # Flat colours through every colour model.
    Image.new("L", (200, 150), 90).save(out / "gray.jpg", "JPEG", quality=90)
    Image.new("RGB", (200, 150), (200, 60, 40)).convert("CMYK").save(out / "cmyk.jpg", "JPEG", quality=90)
    Image.new("L", (200, 150), 90).save(out / "gray.png", "PNG")
    Image.new("I;16", (200, 150), 30000).save(out / "gray16.png", "PNG")
    Image.new("LA", (200, 150), (90, 255)).save(out / "gray-alpha-opaque.png", "PNG")
    flat16 = np.empty((150, 200, 3), dtype=np.uint16)
    flat16[...] = (0.8 * 65535, 0.25 * 65535, 0.1 * 65535)
    (out / "rgb16.png").write_bytes(rgb16_png(flat16))
    Image.new("RGB", (200, 150), (30, 144, 255)).quantize(colors=4).save(out / "palette.png", "PNG")

    # Transparency: a red disc on transparent black (edges must stay red, not darken), the same
    # disc through a palette with tRNS, and an RGBA file that is fully opaque.
    disc = Image.new("RGBA", (800, 600), (0, 0, 0, 0))
    ImageDraw.Draw(disc).ellipse([100, 50, 700, 550], fill=(255, 0, 0, 255))
    disc.save(out / "rgba-disc.png", "PNG")
    disc.convert("RGB").quantize(colors=2).save(out / "palette-trns.png", "PNG", transparency=0)
    Image.new("RGBA", (640, 480), (20, 120, 200, 255)).save(out / "rgba-opaque.png", "PNG")
    rgba16 = np.zeros((120, 160, 4), dtype=np.uint16)
    rgba16[..., 1] = 65535
    rgba16[..., 3] = 32768
    (out / "rgba16-half.png").write_bytes(rgb16_png(rgba16))

    # GIF (two frames; the first is yellow) and WEBP (lossy opaque, lossless with alpha).
    frames = [Image.new("RGB", (300, 200), (250, 200, 0)), Image.new("RGB", (300, 200), (0, 0, 250))]
    frames[0].save(out / "animated.gif", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(out / "animated.webp", "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=90)
    Image.new("RGB", (500, 300), (40, 160, 90)).save(out / "lossy.webp", "WEBP", quality=80)
    disc.resize((400, 300)).save(out / "alpha.webp", "WEBP", lossless=True)

    # Broken bodies behind good headers.
    whole = (out / "exif-gps.jpg").read_bytes()
    (out / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    good = bytearray((out / "gray.png").read_bytes())
    idat = good.index(b"IDAT")
    length = struct.unpack(">I", good[idat - 4 : idat])[0]
    body = bytearray(good[idat + 4 : idat + 4 + length])
    for i in range(2, len(body) - 4):
        body[i] ^= 0x5A  # garble the deflate stream, keep the zlib header
    chunk = b"IDAT" + bytes(body)
    good[idat : idat + 4 + length + 4] = chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    (out / "corrupt.png").write_bytes(bytes(good))
    # A 50 000 x 50 000 header with no image behind it.
    (out / "huge-header.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)) + png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------
# benchmark corpus

# name, (width, height), JPEG options
JPEGS = [
    ("jpeg-1mp-420", (1200, 900), dict(subsampling=2)),
    ("jpeg-3mp-420", (2000, 1500), dict(subsampling=2)),
    ("jpeg-12mp-420", (4000, 3000), dict(subsampling=2)),
    ("jpeg-12mp-444", (4000, 3000), dict(subsampling=0)),
    ("jpeg-12mp-420-progressive", (4000, 3000), dict(subsampling=2, progressive=True)),
    ("jpeg-6mp-444-progressive", (3000, 2000), dict(subsampling=0, progressive=True)),
    ("jpeg-12mp-420-portrait-exif6", (4000, 3000), dict(subsampling=2, exif=exif_bytes(6))),
    ("jpeg-24mp-420", (6000, 4000), dict(subsampling=2)),
]


def corpus(out):
    out.mkdir(parents=True, exist_ok=True)
    for index, (name, size, options) in enumerate(JPEGS):
        path = out / f"{name}.jpg"
        if not path.exists():
            save_jpeg(photo(*size, 100 + index), path, quality=90, **options)
    pngs = {
        "png-rgb-3mp": lambda: photo(2000, 1500, 201),
        "png-rgb-12mp": lambda: photo(4000, 3000, 202),
        "png-rgba-3mp": lambda: rgba(photo(2000, 1500, 203)),
        "png-palette-3mp": lambda: photo(2000, 1500, 204).quantize(colors=256),
        "png-gray-3mp": lambda: photo(2000, 1500, 205).convert("L"),
    }
    for name, make in pngs.items():
        path = out / f"{name}.png"
        if not path.exists():
            make().save(path, "PNG")
    path = out / "png-rgb16-3mp.png"
    if not path.exists():
        pixels = np.asarray(photo(2000, 1500, 206)).astype(np.uint16) * 257
        path.write_bytes(rgb16_png(pixels))


def rgba(image):
    """Cuts soft-edged transparent holes into a photo."""
    width, height = image.size
    alpha = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(alpha)
    draw.ellipse([width // 4, height // 4, width * 3 // 4, height * 3 // 4], fill=0)
    draw.rectangle([0, 0, width // 6, height], fill=128)
    image = image.convert("RGBA")
    image.putalpha(alpha)
    return image


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("fixtures", "corpus"):
        sys.exit(__doc__)
    target = Path(sys.argv[2])
    (fixtures if sys.argv[1] == "fixtures" else corpus)(target)
    print(f"images in {target}")
