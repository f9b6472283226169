"""Images users give the scripts (--init-img, --reference-image, --cond, inpaint's image and mask)
are read as a viewer shows them (ldm.image_io.read_user_image): in every bit depth PIL opens (a
16-bit PNG, a depth map or scan, was clipped at 255 by convert("RGB"/"L") and read as white, a
float image as black), and upright by their EXIF orientation (phone photos came in sideways)."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from ldm.image_io import read_user_image, to_8bit
from ldm.modules import adapter_conditions, consistency_image

GREY = 128  # 8-bit value of the test images below; 16-bit: 128 * 257


@pytest.mark.parametrize("mode, values", [
    ("I;16", GREY * 257), ("I", GREY * 257), ("I", GREY), ("F", GREY / 255), ("F", float(GREY)),
])
def test_deep_and_float_greyscale_becomes_8_bit_by_scaling(mode, values):
    image = Image.new(mode, (4, 3), values)
    converted = to_8bit(image)
    assert converted.mode == "L" and converted.size == (4, 3)
    assert (np.asarray(converted) == GREY).all()


def test_a_16_bit_gradient_keeps_its_range_and_8_bit_images_are_untouched():
    ramp = Image.fromarray(np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(2, 0))
    assert ramp.mode == "I;16" and (np.asarray(to_8bit(ramp))[0] == np.arange(256)).all()
    for mode in ("RGB", "RGBA", "L", "P"):
        image = Image.new(mode, (2, 2))
        assert to_8bit(image) is image


def test_a_photo_stored_sideways_is_read_upright(tmp_path):
    photo = Image.new("RGB", (40, 20), "red")
    photo.paste((0, 0, 255), (0, 0, 10, 20))  # blue at the left of the stored pixels
    exif = photo.getexif()
    exif[0x0112] = 6  # EXIF Orientation: turn 90 degrees clockwise to show
    photo.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    upright = read_user_image(tmp_path / "portrait.jpg")
    assert upright.size == (20, 40) and upright.getexif().get(0x0112) is None
    top, bottom = upright.getpixel((10, 2)), upright.getpixel((10, 37))
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]  # the left edge came to the top


@pytest.fixture
def grey_16_bit_png(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.full((64, 64), GREY * 257, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_every_reader_of_user_images_reads_a_16_bit_png_as_its_grey(grey_16_bit_png, tmp_path):
    grey = GREY / 127.5 - 1  # in [-1, 1]
    init = load_script("img2img").load_img(grey_16_bit_png, 8)
    reference = consistency_image.read_image(argparse.ArgumentParser(), grey_16_bit_png, 32, 32)
    inpaint = load_script("inpaint").make_batch(grey_16_bit_png, grey_16_bit_png, "cpu")
    for pixels in (init, reference, inpaint["image"]):
        torch.testing.assert_close(pixels, torch.full_like(pixels, grey), atol=1e-6, rtol=0)
    assert (inpaint["mask"] == 1).all()  # 128/255 is above inpaint's 0.5 threshold
    depth = adapter_conditions.grey_map(adapter_conditions.read_image(grey_16_bit_png))
    assert np.allclose(depth, GREY / 255)


def test_an_image_too_large_to_open_safely_is_a_value_error(tmp_path, monkeypatch):
    # above twice PIL's MAX_IMAGE_PIXELS (179 megapixels: a 200 MP phone photo) PIL refuses with
    # DecompressionBombError, which is no OSError: every reader's one-line handler missed it
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"exceeds limit of 200 pixels.*\(shrink the image\)"):
        read_user_image(tmp_path / "big.png")
