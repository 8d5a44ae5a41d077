"""Safe decoding of real image files: modes, EXIF, 16-bit, animation, and every kind of bad input."""

import numpy as np
import pytest
from PIL import Image

from distcls.images import ImageDecodeError, decode_image, decode_to_array
from tests.conftest import encode


def test_every_good_image_becomes_uint8_rgb(good_images):
    for name, data in good_images.items():
        arr = decode_to_array(data)
        assert arr.dtype == np.uint8, name
        assert arr.ndim == 3 and arr.shape[2] == 3, (name, arr.shape)
        assert arr.std() > 5, f"{name} decoded to a flat image"


def test_exif_orientation_is_applied(good_images, photo):
    arr = decode_to_array(good_images["exif_rotated.jpg"])
    h, w = photo.shape[:2]
    assert arr.shape[:2] == (w, h)  # orientation 6 = rotate 90 degrees to display


def test_sixteen_bit_png_is_scaled_not_clipped(good_images, photo):
    arr = decode_to_array(good_images["sixteen.png"])
    grey = np.asarray(Image.fromarray(photo).convert("L"), dtype=np.int16)
    assert np.abs(arr[..., 0].astype(np.int16) - grey).max() <= 1


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    arr = decode_to_array(encode(img, "PNG"))
    assert (arr == 255).all()


def test_cmyk_jpeg_colours_survive(good_images, photo):
    arr = decode_to_array(good_images["cmyk.jpg"]).astype(np.int16)
    assert np.abs(arr.mean(axis=(0, 1)) - photo.mean(axis=(0, 1))).max() < 12


def test_animated_gif_uses_first_frame(good_images):
    arr = decode_to_array(good_images["anim.gif"])
    assert arr.shape == (48, 64, 3)
    # The second frame is grey; the first keeps the cat's colour.
    assert np.abs(arr[..., 0].astype(int) - arr[..., 2].astype(int)).mean() > 3


def test_jpeg_draft_decodes_smaller_but_not_below_request(good_images):
    full = decode_image(good_images["rgb.jpg"])
    small = decode_image(good_images["rgb.jpg"], draft_size=(120, 120))
    assert small.size[0] < full.size[0]
    assert min(small.size) >= 120


@pytest.mark.parametrize("name", ["corrupt.jpg", "truncated.jpg", "empty.png", "notes.png", "bomb.png", "bomb.jpg"])
def test_bad_input_raises_with_kind(bad_images, name):
    data, kind = bad_images[name]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.kind == kind, str(info.value)
    assert str(info.value).startswith(kind + ": ")
    # Bombs are refused from the header: tests/test_hostile_images.py bounds their memory in a subprocess.


def test_pixel_limit_is_configurable(good_images):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(good_images["rgb.jpg"], max_pixels=1000)
    assert info.value.kind == "too_large"
    assert "exceeds the limit of 1000" in str(info.value)


def test_sixteen_bit_byte_orders_and_32_bit_grey_give_the_same_levels(photo):
    """16-bit grey in either byte order (PNG I;16, big-endian TIFF I;16B) and 32-bit grey TIFF (I) become
    sample >> 8, without widening; 32-bit data that only holds 8-bit values keeps them."""
    grey = np.asarray(Image.fromarray(photo).convert("L"), dtype=np.uint16)
    arr16 = grey * 257 + 3  # high byte == grey
    h, w = arr16.shape
    files = {
        "png I;16": encode(Image.fromarray(arr16), "PNG"),
        "tiff I;16B": encode(Image.frombytes("I;16B", (w, h), arr16.astype(">u2").tobytes()), "TIFF"),
        "tiff I;16": encode(Image.frombytes("I;16", (w, h), arr16.astype("<u2").tobytes()), "TIFF"),
        "tiff I 16-bit data": encode(Image.fromarray(arr16.astype(np.int32), "I"), "TIFF"),
    }
    for name, data in files.items():
        arr = decode_to_array(data)
        np.testing.assert_array_equal(arr[..., 0], grey, err_msg=name)
        assert (arr[..., 0] == arr[..., 2]).all(), name
    eight_bit = decode_to_array(encode(Image.fromarray(grey.astype(np.int32), "I"), "TIFF"))
    np.testing.assert_array_equal(eight_bit[..., 0], grey)
    clipped = decode_to_array(encode(Image.fromarray(np.array([[-7, 70_000, 512]], dtype=np.int32), "I"), "TIFF"))
    assert clipped[0, :, 0].tolist() == [0, 255, 2]
