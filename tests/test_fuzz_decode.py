"""Fuzzing the one function that turns bytes into a model input, `transforms.preprocess_bytes`.

Hypothesis generates real images with Pillow (every mode it writes, in every format the product accepts,
1 to 100,000 pixels a side at any aspect ratio), then truncates them, flips bits, makes their headers lie
about the size, or replaces them with random bytes. The property, in eval and train mode:

- the result is a uint8 array of the spec's shape, or `ImageDecodeError` with one of its KINDS; never any
  other exception (and an untouched image that Pillow wrote always decodes);
- the call's peak RSS grows by less than MEMORY_BOUND (Linux's VmHWM, reset before each call).

CI runs a short seeded run (`make test`); `make test-all` adds the long run, marked slow.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import resource
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from distcls.images import IMAGE_EXTENSIONS, SIGNATURES, ImageDecodeError
from distcls.transforms import PreprocessSpec, preprocess_bytes

# Largest side each format can write; the product accepts all of them (see test_formats_are_the_accepted_ones).
FORMATS = {"JPEG": 65_500, "PNG": 100_000, "WEBP": 16_383, "BMP": 100_000, "GIF": 65_535, "TIFF": 100_000}
CANDIDATE_MODES = (
    "1",
    "L",
    "P",
    "PA",
    "LA",
    "RGB",
    "RGBA",
    "RGBX",
    "I",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "F",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
)
SAVE_OPTIONS = {
    "JPEG": [{}, {"quality": 5}, {"progressive": True}, {"quality": 95, "subsampling": 0}],
    "PNG": [{}, {"compress_level": 0}, {"bits": 2}],
    "WEBP": [{}, {"lossless": True}, {"quality": 5}],
    "BMP": [{}],
    "GIF": [{}, {"interlace": False}],
    "TIFF": [
        {},
        {"compression": "tiff_deflate"},
        {"compression": "tiff_lzw"},
        {"compression": "packbits"},
        {"compression": "jpeg"},
    ],
}
ANIMATED = ("GIF", "PNG", "WEBP", "TIFF")
FUZZ_MAX_PIXELS = 4_000_000  # the spec's pixel limit here: memory is bounded in proportion to it
MEMORY_BOUND = 256e6  # peak RSS growth of one call: ~16 bytes a pixel at the limit, plus the resize budget
SIDES = st.one_of(st.integers(1, 100_000), st.sampled_from([1, 2, 3, 8, 255, 256, 257, 16_383, 16_384, 65_500, 65_535, 100_000]))


def writable_pairs() -> list[tuple[str, str]]:
    """(mode, format) for every mode Pillow writes in each format, found by writing a 3x2 image."""
    pairs = []
    for mode in CANDIDATE_MODES:
        for fmt in FORMATS:
            with contextlib.suppress(Exception):
                Image.new(mode, (3, 2)).save(io.BytesIO(), format=fmt)
                pairs.append((mode, fmt))
    return pairs


WRITABLE = writable_pairs()


def raw_size(mode: str, width: int, height: int) -> int:
    if mode == "1":
        return (width + 7) // 8 * height
    return width * height * len(Image.new(mode, (1, 1)).tobytes())


@st.composite
def dimensions(draw, max_pixels: int, max_side: int) -> tuple[int, int]:
    """Any aspect ratio with both sides in 1..max_side, at most max_pixels (so that writing stays cheap)."""
    long = min(draw(SIDES), max_side)
    short = draw(st.integers(1, max(1, min(long, max_pixels // long))))
    return (long, short) if draw(st.booleans()) else (short, long)


def make_image(mode: str, size: tuple[int, int], pattern: str, seed: int) -> Image.Image:
    n = raw_size(mode, *size)
    if pattern == "noise":  # for F and I: any float (NaN, inf) or integer (negative, > 16 bits)
        data = np.random.default_rng(seed).bytes(n)
    elif pattern == "flat":
        data = bytes([seed % 256]) * n
    else:
        data = (np.arange(n, dtype=np.int64) * (seed % 7 + 1) % 251).astype(np.uint8).tobytes()
    img = Image.frombytes(mode, size, data)
    if mode in ("P", "PA"):
        img.putpalette(np.random.default_rng(seed).bytes(768))
    return img


def save(img: Image.Image, fmt: str, options: dict, extra: dict) -> bytes:
    """The image written as `fmt`, with the options that the format takes for this mode."""
    for kwargs in ({**options, **extra}, options, {}):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt, **kwargs)
            return buf.getvalue()
        except Exception:
            continue
    raise AssertionError(f"Pillow could not write {img.mode} {img.size} as {fmt}")


@dataclass(frozen=True)
class Sample:
    """One input: its bytes, whether it must decode (an untouched file Pillow wrote), and how it was made,
    which is what a failure report shows (hypothesis prints the blob that reproduces it)."""

    data: bytes
    must_decode: bool
    how: str

    def __repr__(self) -> str:
        return f"Sample({self.how}, {len(self.data)} bytes, starts {self.data[:16]!r})"


@st.composite
def written_images(draw, max_pixels: int) -> tuple[bytes, str]:
    """A real image file (mode, format, size, content, save options, animation, EXIF orientation) and a
    description of it."""
    fmt = draw(st.sampled_from(list(FORMATS)))
    mode = draw(st.sampled_from([m for m, f in WRITABLE if f == fmt]))
    size = draw(dimensions(max_pixels, FORMATS[fmt]))
    event(f"{fmt}, aspect {'>= 100' if max(size) >= 100 * min(size) else '< 100'}")
    pattern = draw(st.sampled_from(["noise", "flat", "ramp"]))
    img = make_image(mode, size, pattern, draw(st.integers(0, 2**32 - 1)))
    extra = {}
    if fmt in ANIMATED and draw(st.booleans()):
        extra = {"save_all": True, "append_images": [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]}
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535]))  # orientation, valid or not
        extra["exif"] = exif.tobytes()
    if mode in ("P", "L") and fmt in ("PNG", "GIF") and draw(st.booleans()):
        img.info["transparency"] = 0
    options = draw(st.sampled_from(SAVE_OPTIONS[fmt]))
    how = f"{fmt} {mode} {size[0]}x{size[1]} {pattern} {options} {sorted(k for k in extra if k != 'append_images')}"
    return save(img, fmt, options, extra), how


def lie_about_size(data: bytes, width: int, height: int) -> bytes:
    """The same file with the size in its header rewritten (checksums kept valid where there are any)."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        out[16:24] = struct.pack(">II", width % 2**31, height % 2**31)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif data.startswith(b"GIF") and len(data) >= 10:
        out[6:10] = struct.pack("<HH", width % 2**16, height % 2**16)
    elif data.startswith(b"BM") and len(data) >= 26:
        out[18:26] = struct.pack("<ii", width % 2**31, height % 2**32 - 2**31)  # negative height: top-down
    elif data.startswith(b"\xff\xd8") and (i := data.find(b"\xff\xc0")) > 0 and len(data) >= i + 9:
        out[i + 5 : i + 9] = struct.pack(">HH", height % 2**16, width % 2**16)
    return bytes(out)


@st.composite
def damaged(draw, data: bytes) -> tuple[bytes, str]:
    """The file as written ("untouched"), or truncated, bit-flipped, lying about its size, overwritten in
    its header or with garbage appended; and what was done."""
    how = draw(st.sampled_from(["untouched", "truncate", "flip", "lie", "overwrite", "append"]))
    anywhere, header = st.integers(0, len(data) - 1), st.integers(0, min(len(data), 64) - 1)
    if how == "truncate":
        cut = draw(st.one_of(header, anywhere))
        return data[:cut], f"truncated to {cut}"
    if how == "flip":
        out = bytearray(data)
        positions = draw(st.lists(st.one_of(header, anywhere), min_size=1, max_size=8))
        for pos in positions:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(out), f"bits flipped at {positions}"
    if how == "lie":
        side = st.one_of(st.integers(0, 2**31 - 1), SIDES)
        width, height = draw(side), draw(side)
        return lie_about_size(data, width, height), f"header says {width}x{height}"
    if how == "overwrite":
        pos, patch = draw(header), draw(st.binary(min_size=1, max_size=8))
        return data[:pos] + patch + data[pos + 8 :], f"{patch!r} over bytes {pos}..{pos + 8}"
    if how == "append":
        tail = draw(st.binary(min_size=1, max_size=64))
        return data + tail, f"{len(tail)} bytes appended"
    return data, how


@st.composite
def inputs(draw, max_pixels: int) -> Sample:
    data, made = draw(written_images(max_pixels))
    data, how = draw(damaged(data))
    return Sample(data, how == "untouched", f"{made}, {how}")


random_bytes = st.one_of(
    st.binary(max_size=4096),
    st.tuples(
        st.sampled_from([magic for magic, _ in SIGNATURES] + [b"RIFF\0\0\0\0WEBPVP8 ", b"BM\0\0\0\0\0\0\0\0"]),
        st.binary(max_size=2048),
    ).map(b"".join),
)
specs = st.builds(
    PreprocessSpec,
    image_size=st.sampled_from([32, 224]),
    max_pixels=st.just(FUZZ_MAX_PIXELS),
    interpolation=st.sampled_from(["bilinear", "bicubic", "nearest"]),
)


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc), so that the next call's allocations show in RSS
    again instead of reusing pages the last call left resident: a replayed failure must fail again."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is refused."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PEAK_RESETS = os.path.exists("/proc/self/status") and reset_peak()


@contextlib.contextmanager
def address_space_cap(extra: int = 4 << 30):
    """A regression that asks for tens of GB fails with MemoryError instead of taking the machine down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = status("VmSize") + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_contract(data: bytes, spec: PreprocessSpec, train: bool, must_decode: bool = False) -> None:
    """Run preprocess_bytes once and check the property (see the module docstring)."""
    start = status("VmRSS") if PEAK_RESETS and reset_peak() else None
    try:
        with warnings.catch_warnings(), address_space_cap():
            warnings.simplefilter("ignore")  # Pillow's and numpy's warnings about odd files are not failures
            out = preprocess_bytes(data, spec, train=train)
    except ImageDecodeError as exc:
        assert exc.kind in ImageDecodeError.KINDS, exc
        event(f"refused: {exc.kind}")
        assert not must_decode, f"an image Pillow wrote was refused: {exc}"
    else:
        size = spec.resize_size if train else spec.image_size
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, size, size), out.shape
        event("decoded")
    if start is not None:
        grown = status("VmHWM") - start
        assert grown < MEMORY_BOUND, f"one call grew peak RSS by {grown / 1e6:.0f} MB"


def test_formats_are_the_accepted_ones():
    """The fuzzed formats are exactly those IMAGE_EXTENSIONS name, and each writes several modes."""
    accepted = {Image.registered_extensions()[ext] for ext in IMAGE_EXTENSIONS}
    assert accepted == set(FORMATS)
    for fmt in FORMATS:
        assert sum(f == fmt for _, f in WRITABLE) >= 3, (fmt, WRITABLE)
    assert {"1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK", "YCbCr"} <= {m for m, _ in WRITABLE}


CI = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
LONG = settings(CI, max_examples=5_000, derandomize=False)


@CI
@given(sample=inputs(max_pixels=100_000), spec=specs, train=st.booleans())
def test_generated_images_decode_or_refuse(sample, spec, train):
    check_contract(sample.data, spec, train, must_decode=sample.must_decode)


@CI
@given(data=random_bytes, spec=specs, train=st.booleans())
def test_random_bytes_are_refused_with_a_kind(data, spec, train):
    check_contract(data, spec, train)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 minutes on 2 busy cores
@LONG
@given(sample=inputs(max_pixels=2_000_000), spec=specs, train=st.booleans())
def test_generated_images_decode_or_refuse_long(sample, spec, train):
    check_contract(sample.data, spec, train, must_decode=sample.must_decode)


@pytest.mark.slow
@LONG
@given(data=random_bytes, spec=specs, train=st.booleans())
def test_random_bytes_are_refused_with_a_kind_long(data, spec, train):
    check_contract(data, spec, train)


@pytest.mark.skipif(not PEAK_RESETS, reason="needs Linux's resettable VmHWM to measure one call's peak")
def test_the_memory_check_sees_a_real_allocation():
    """The in-process measurement is not blind: a 64 MB allocation inside the measured window shows."""
    start = status("VmRSS") if reset_peak() else 0
    block = np.ones(64_000_000, dtype=np.uint8)
    assert status("VmHWM") - start > 60e6
    del block
