"""Bytes -> RGB image, safely: formats, EXIF orientation, modes, 16-bit, a pixel limit. No Ray.

`decode_image` is the single entry point every job uses. It raises `ImageDecodeError` (with a short
`kind`) for anything it cannot turn into an RGB image, so callers can skip, count or report it.
"""

from __future__ import annotations

import io
import re
import sys
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; larger headers are treated as decompression bombs

# Truncated files must fail, not decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An object that is not a usable image. `kind` is one of KINDS."""

    KINDS = ("empty", "not_image", "corrupt", "truncated", "too_large", "unsupported")

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def out_of_memory() -> ImageDecodeError:
    """The error for an image whose decoding hit MemoryError: the object is refused, the process lives on."""
    return ImageDecodeError(
        "too_large",
        "decoding it needs more memory than this process could get (a decompression bomb, or too little memory per worker)",
    )


# Leading bytes of the formats IMAGE_EXTENSIONS name: tells "a broken image" from "not an image at all".
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes (whatever the file's extension says), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":  # "BM", file size, 4 reserved zero bytes
        return "BMP"
    return next((fmt for magic, fmt in SIGNATURES if data.startswith(magic)), None)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) and check size; the pixels are not decoded yet."""
    if not data:
        raise ImageDecodeError("empty", "the object is 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own (higher) limit fired first; report the size against ours.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageDecodeError(
            "too_large",
            f"the header declares {declared.group(1) if declared else 'too many'} "
            f"pixels, which exceeds the limit of {max_pixels} (a decompression bomb?)",
        ) from None
    except Image.UnidentifiedImageError:
        if (fmt := sniff_format(data)) is not None:  # e.g. a PNG header declaring zero width
            raise ImageDecodeError(
                "corrupt",
                f"starts like a {fmt} but its header is invalid (zero width or height, or a damaged header); re-export the image",
            ) from None
        raise ImageDecodeError("not_image", "not a recognised image format") from None
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"image has size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    return img


# 16-bit grey modes -> the raw mode that unpacks each sample's high byte into L (sample >> 8).
HIGH_BYTE_RAWMODES = {"I;16": "L;16", "I;16L": "L;16", "I;16B": "L;16B", "I;16N": "L;16B" if sys.byteorder == "big" else "L;16"}


def _grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey (16-bit PNG, TIFF) -> 8-bit L, scaled by the data's bit depth (>> 8), not clipped.

    Never widened: a 16-bit image unpacks its high bytes, a 32-bit one goes through a 65536-entry table
    (values clamped to 0..65535 first), so memory stays at about one more copy of the source.
    """
    if img.mode in HIGH_BYTE_RAWMODES:
        return Image.frombytes("L", img.size, img.tobytes(), "raw", HIGH_BYTE_RAWMODES[img.mode])
    if img.mode != "I":
        img = img.convert("I")  # any other integer mode Pillow may add
    shift = 8 if img.getextrema()[1] > 255 else 0  # 8-bit data stored as 32-bit keeps its values
    return img.point([min(v >> shift, 255) for v in range(65536)], "L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """32-bit float -> L, stretched from the image's own min..max, computed in place."""
    arr = np.array(img, dtype=np.float32)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN images: nanmin warns, NaNs become 0
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr -= lo
        arr /= hi - lo or 1.0
        arr *= 255
        return Image.fromarray(arr.astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode.startswith("I"):
        return _grey_to_l(img).convert("RGB")
    if mode == "F":
        return _float_to_l(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer would show it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return img


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes into an RGB PIL image with EXIF orientation applied.

    `draft_size` lets JPEGs decode at a reduced scale (DCT scaling) when the caller will resize down to
    at least that size anyway: several times faster for photos, identical for small images.
    Animated images use their first frame.
    """
    img = open_image(data, max_pixels)
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise out_of_memory() from None
    except OSError as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or "broken data stream" in text or "image file is" in text else "corrupt"
        raise ImageDecodeError(kind, text) from None
    except (SyntaxError, ValueError, IndexError, TypeError, EOFError) as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise ImageDecodeError("unsupported", f"{type(exc).__name__}: {exc}") from None


def decode_to_array(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> uint8 HWC RGB array."""
    return np.asarray(decode_image(data, max_pixels), dtype=np.uint8)
