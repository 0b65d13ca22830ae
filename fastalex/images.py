"""Image files from outside: the header check every reader of untrusted images calls first, the
full-decode check of a JPEG, and the conversion `pack` applies (transcode, downscale, upright).

Imports numpy, simplejpeg and Pillow; never torch or DALI (pack, verify and predict share it).

- `check_image_header(data)` reads only the header (JPEG's SOF marker through libjpeg-turbo, the
  others through Pillow's lazy open, WebP's canvas size here) and rejects an image whose width x
  height is over ``max_pixels`` before a single pixel is decoded (docs/data.md: why).
- `decode_image(data)` decodes one frame (the first of a GIF, an animated WebP or a multi-page TIFF)
  to 8-bit RGB or L: alpha composited on `ALPHA_BACKGROUND`, palettes and 16-bit samples converted,
  the EXIF orientation applied, optionally downscaled (Lanczos) so the longer side is ``max_side``.
- `prepare_image(data, ...)` is what pack stores: a JPEG that needs none of that is kept
  byte-identical (after a full decode proves it whole); anything else is re-encoded as a JPEG.
  A JPEG whose EXIF orientation is not "upright" is re-encoded upright, because decoders disagree
  on that tag (DALI applies it, libjpeg-turbo and Pillow do not) and the loaders must see one image.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from fastalex.config import PackConfig

JPEG_MAGIC = b"\xff\xd8\xff"
SIGNATURES = (  # leading bytes -> format, as each format's specification fixes them
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
PIL_FORMATS = ("PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # Pillow plugins allowed to parse a file
ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}  # ISO-BMFF ftyp
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as a web page shows them
EXIF_ORIENTATION = 0x0112  # EXIF/TIFF tag 274
EXIF_APP1 = b"Exif\x00\x00"  # the APP1 segment holding EXIF starts so (EXIF 2.32, 4.5.4)
JPEG_HEADER_BYTES = 1 << 17  # APP segments are at most 64 KiB each; EXIF comes first or second
TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright (PIL.ImageOps)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DRAFT_GAP = 2  # a JPEG is decoded DCT-downscaled to at least 2x the target, then Lanczos-resized
MAX_BYTES_PER_PIXEL = 8  # the largest legitimate file: uncompressed 16-bit RGBA (TIFF)
MAX_METADATA_BYTES = 16 << 20  # room for EXIF, ICC and XMP on top of the pixels


class Rejected(Exception):
    """An input file that will not be used, with the reason."""


@dataclass(frozen=True)
class StoredImage:
    """The JPEG bytes pack stores for one input file, and what was done to get them."""

    jpeg: bytes
    height: int
    width: int
    transcoded: bool = False  # the input was not a JPEG
    resized: bool = False  # the input's longer side was over max_side
    reoriented: bool = False  # the input carried an EXIF orientation other than upright


def max_file_bytes(max_pixels: int) -> int:
    """The largest file worth reading for an image of at most `max_pixels`."""
    return max_pixels * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES


def sniff_format(data: bytes) -> str | None:
    """The format the leading bytes announce ("JPEG", "PNG", ...), or None."""
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    for magic, kind in SIGNATURES:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    if data[4:8] == b"ftyp":
        return ISO_BRANDS.get(data[8:12], "ISO-BMFF")
    return None


def check_image_header(
    data: bytes, max_pixels: int = PackConfig.max_pixels
) -> tuple[int, int, str]:
    """(height, width, format) from the header alone; Rejected when the data is empty, is not an
    image this reads (JPEG, PNG, WebP, BMP, TIFF, GIF, PPM), has an unreadable header, or claims
    more than `max_pixels` pixels. Decodes no pixel."""
    if not data:
        raise Rejected("empty file")
    kind = sniff_format(data)
    if kind is None:
        raise Rejected("not an image (no JPEG, PNG, WebP, BMP, TIFF, GIF or PPM signature)")
    if kind not in ("JPEG", *PIL_FORMATS):
        raise Rejected(f"{kind} images are not read; convert them to JPEG or PNG")
    size = None
    if kind == "JPEG":
        try:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            size = height, width, "JPEG"
        except ValueError:
            pass  # libjpeg-turbo's header reader refuses a few JPEGs that Pillow reads
    elif kind == "WEBP":
        canvas = _webp_canvas(data)  # Pillow's WebP decoder allocates the canvas on open
        if canvas is None:
            raise Rejected("unreadable WebP header")
        size = canvas[0], canvas[1], "WEBP"
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    if size is None or kind == "WEBP":
        size = _pil_header(data, ("JPEG",) if kind == "JPEG" else PIL_FORMATS)
    height, width, found = size
    _check_pixels(height, width, max_pixels)
    return height, width, "JPEG" if found == "MPO" else found


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise Rejected(f"header gives an empty image ({width}x{height})")
    if height * width > max_pixels:
        raise Rejected(
            f"header claims {width}x{height} pixels ({height * width / 1e6:.0f} Mpx), over the "
            f"limit of {max_pixels} (max_pixels); not decoded"
        )


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a WebP's first chunk (RFC 9649, sections 2.5-2.7)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[28:30], "little") & 0x3FFF,
            int.from_bytes(data[26:28], "little") & 0x3FFF,
        )
    return None


@contextmanager
def _pixel_limit_checked():
    """Pillow's own bomb limit off: the caller has already checked the header against its own."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _pil_header(data: bytes, formats: tuple[str, ...]) -> tuple[int, int, str]:
    try:
        with _pixel_limit_checked(), Image.open(io.BytesIO(data), formats=formats) as image:
            return image.size[1], image.size[0], image.format
    except Exception as e:  # Pillow raises many types for bad data
        raise Rejected(f"unreadable header ({e})") from None


def check_jpeg(data: bytes) -> tuple[int, int]:
    """(height, width) of a JPEG that decodes completely; raise Rejected with the reason otherwise.

    simplejpeg (libjpeg-turbo, strict: warnings are errors) decides first; what it refuses gets a
    second, full decode by Pillow, which accepts recoverable oddities but raises on truncation.
    Call `check_image_header` first on untrusted data: this decodes whatever size the header says.
    """
    if not data:
        raise Rejected("empty file")
    if not data.startswith(JPEG_MAGIC):
        kind = sniff_format(data)
        raise Rejected(f"not a JPEG ({kind} data)" if kind else "not a JPEG (no SOI marker)")
    try:
        return simplejpeg.decode_jpeg(data, colorspace="rgb").shape[:2]
    except ValueError as first:
        try:
            with _pixel_limit_checked(), Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.format not in ("JPEG", "MPO") or image.convert("RGB").size[0] < 1:
                    raise Rejected("not a JPEG")
                return image.size[::-1]
        except Rejected:
            raise
        except Exception as second:  # Pillow raises many types for bad data
            raise Rejected(f"does not decode ({first}; {second})") from None


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (1 = upright, also when it has no EXIF), from its header."""
    if EXIF_APP1 not in data[:JPEG_HEADER_BYTES]:
        return 1
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            return _orientation(image)
    except Exception:  # an unreadable EXIF block: the pixels decide, upright as stored
        return 1


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF
        return 1
    return value if value in TRANSPOSE else 1


def fit_px(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled, aspect kept, so the longer side is at most `max_side` (0 = as is)."""
    longer = max(height, width)
    if not max_side or longer <= max_side:
        return height, width
    scale = max_side / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(
    data: bytes, max_pixels: int = PackConfig.max_pixels, max_side: int = 0
) -> Image.Image:
    """The first frame of an image file as a loaded 8-bit "RGB" or "L" Pillow image, upright
    (EXIF orientation applied), downscaled with Lanczos so its longer side is at most `max_side`
    (0 = full size). The header is checked first (`check_image_header`); Rejected if it fails or
    the pixels do not decode."""
    return _decode(data, max_pixels, max_side)[0]


def _decode(data: bytes, max_pixels: int, max_side: int) -> tuple[Image.Image, str, int, bool]:
    """(image, input format, EXIF orientation applied, whether it was downscaled)."""
    height, width, kind = check_image_header(data, max_pixels)
    target = fit_px(height, width, max_side)
    try:
        with (
            _pixel_limit_checked(),
            Image.open(
                io.BytesIO(data), formats=("JPEG",) if kind == "JPEG" else PIL_FORMATS
            ) as image,
        ):
            if kind == "JPEG" and target != (height, width):
                # libjpeg's DCT scaling (1/2, 1/4, 1/8) while decoding: a fraction of the memory
                # and time of a full decode, and never below DRAFT_GAP x the target.
                image.draft(None, (target[1] * DRAFT_GAP, target[0] * DRAFT_GAP))
            image.load()
            orientation = _orientation(image)
            pixels = to_8bit(image)
    except Rejected:
        raise
    except Exception as e:  # Pillow raises many types for bad data
        raise Rejected(f"does not decode ({e})") from None
    if pixels.size != (target[1], target[0]):
        pixels = pixels.resize((target[1], target[0]), Image.Resampling.LANCZOS)
    if orientation != 1:
        pixels = pixels.transpose(TRANSPOSE[orientation])
    return pixels, kind, orientation, target != (height, width)


def to_8bit(image: Image.Image) -> Image.Image:
    """An "RGB" or "L" copy of a loaded image: alpha composited on ALPHA_BACKGROUND, palette
    expanded, 16-bit and 32-bit samples scaled to 8 bits, CMYK and the rest converted to RGB."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image.copy()
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257  # 16-bit samples: 65535 -> 255
        elif mode == "F" and values.max(initial=0) <= 1:
            values = values * 255  # floats in 0..1
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La"):
        flat = Image.new("L", image.size, ALPHA_BACKGROUND[0])
        flat.paste(image.getchannel("L"), mask=image.convert("LA").getchannel("A"))
        return flat
    if "A" in image.mode or image.mode == "RGBa":
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes of an "RGB" or "L" image (Pillow's default 4:2:0 chroma for RGB)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def prepare_image(
    data: bytes,
    max_side: int = PackConfig.max_side,
    jpeg_quality: int = PackConfig.jpeg_quality,
    transcode: bool = PackConfig.transcode,
    max_pixels: int = PackConfig.max_pixels,
) -> StoredImage:
    """The JPEG to store for one input file; Rejected with the reason when it cannot be used.

    A whole JPEG, upright and within `max_side`, is returned byte-identical; other JPEGs are
    re-encoded at `jpeg_quality`, and so are other formats when `transcode` (rejected otherwise).
    """
    if not transcode and not data.startswith(JPEG_MAGIC):
        check_jpeg(data)  # raises the reason: empty, or not a JPEG (and what it is)
    height, width, kind = check_image_header(data, max_pixels)
    if (
        kind == "JPEG"
        and fit_px(height, width, max_side) == (height, width)
        and jpeg_orientation(data) == 1
    ):
        height, width = check_jpeg(data)
        return StoredImage(data, height, width)
    image, kind, orientation, resized = _decode(data, max_pixels, max_side)
    return StoredImage(
        encode_jpeg(image, jpeg_quality),
        image.size[1],
        image.size[0],
        transcoded=kind != "JPEG",
        resized=resized,
        reoriented=orientation != 1,
    )
