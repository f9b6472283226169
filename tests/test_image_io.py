"""Images users give the scripts (--init-img, --reference-image, --cond, inpaint's image and mask)
are read as a viewer shows them (ldm.image_io.read_user_image): in every bit depth PIL opens (a
16-bit PNG, a depth map or scan, was clipped at 255 by convert("RGB"/"L") and read as white, a
float image as black), upright by their EXIF orientation (phone photos came in sideways), and
where transparent, over white (photos) or black (condition maps, masks), not the colours the
transparent pixels happen to store."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from ldm.image_io import flatten, read_user_image, to_8bit
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
    upright = read_user_image(tmp_path / "portrait.jpg", "white")
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
    depth = adapter_conditions.grey_map(adapter_conditions.read_image(grey_16_bit_png, "depth"))
    assert np.allclose(depth, GREY / 255)


def test_an_image_too_large_to_open_safely_is_a_value_error(tmp_path, monkeypatch):
    # above twice PIL's MAX_IMAGE_PIXELS (179 megapixels: a 200 MP phone photo) PIL refuses with
    # DecompressionBombError, which is no OSError: every reader's one-line handler missed it
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"exceeds limit of 200 pixels.*\(shrink the image\)"):
        read_user_image(tmp_path / "big.png", "white")


@pytest.fixture
def cut_out_png(tmp_path):
    """A product photo cut out onto transparency: the left half an opaque red object, the right
    half transparent, storing green there (editors store black, white or the edge's colours)."""
    path = tmp_path / "cut-out.png"
    image = Image.new("RGBA", (64, 64), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 32, 64))
    image.save(path)
    return path


def test_every_reader_of_photos_shows_a_cut_out_over_white(cut_out_png):
    init = load_script("img2img").load_img(cut_out_png, 8)
    reference = consistency_image.read_image(argparse.ArgumentParser(), cut_out_png, 64, 64)
    inpaint = load_script("inpaint").make_batch(cut_out_png, cut_out_png, "cpu")
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # in [-1, 1]
    for pixels in (init, reference, inpaint["image"]):
        assert pixels.shape == (1, 3, 64, 64)
        assert torch.equal(pixels[0, :, :, :32], red.expand(3, 64, 32))
        assert torch.equal(pixels[0, :, :, 32:], torch.ones(3, 64, 32))


def test_masks_and_condition_maps_read_transparency_as_nothing_drawn(cut_out_png, tmp_path):
    # inpaint's mask painted in white on a transparent layer that stores white: read without its
    # alpha it was white all over, and the whole image was filled
    painted = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    painted.paste((255, 255, 255, 255), (0, 0, 32, 64))
    painted.save(tmp_path / "cut-out_mask.png")
    mask = load_script("inpaint").make_batch(cut_out_png, tmp_path / "cut-out_mask.png", "cpu")["mask"]
    assert (mask[..., :32] == 1).all() and (mask[..., 32:] == -1).all()  # in [-1, 1]: fill, keep
    sketch = adapter_conditions.grey_map(adapter_conditions.read_image(cut_out_png, "sketch"))
    assert (sketch[:, 32:] == 0).all() and (sketch[:, :32] > 0).all()
    # canny and color make their maps from a photo: over white, like --init-img
    photo = adapter_conditions.rgb_map(adapter_conditions.read_image(cut_out_png, "canny"))
    assert (photo[:, 32:] == 1).all() and (photo[:, :32] == [1, 0, 0]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_flatten_blends_partial_transparency_and_leaves_opaque_images_alone(mode):
    half = Image.new("RGBA", (2, 1), (0, 0, 0, 128))  # black at half opacity
    if mode == "LA":
        half = half.convert("LA")
    elif mode == "P":  # a palette image with a transparent entry: fully transparent, no blend
        half = Image.new("P", (2, 1), 0)
        half.putpalette([0, 0, 0] * 256)
        half.info["transparency"] = 0
    flat = flatten(half, "white")
    expected = 255 if mode == "P" else 127
    assert flat.mode == "RGB" and (np.asarray(flat) == expected).all()
    for opaque in (Image.new("RGB", (2, 1)), Image.new("L", (2, 1)), Image.new("P", (2, 1))):
        assert flatten(opaque, "white") is opaque


def test_a_run_sharing_its_outdir_with_another_takes_the_next_free_numbers(tmp_path):
    """Two runs writing into one --outdir each chose their numbers at the start: the file the
    other run wrote meanwhile was a FileExistsError that lost the whole run. It is kept, and this
    run's images take the next free numbers."""
    from ldm.outputs import OutputWriter
    writer = OutputWriter(str(tmp_path))
    images = torch.rand(2, 3, 8, 8)
    assert writer.save_samples(images[:1], lambda i: {})[0].endswith("00000.png")
    (tmp_path / "samples" / "00001.png").write_bytes(b"the other run's")
    (tmp_path / "grid-0000.png").write_bytes(b"the other run's grid")
    paths = writer.save_samples(images, lambda i: {"position": i})
    grid = writer.save_grid(images, 2, {})
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00002.png", "00003.png"] and grid.endswith("grid-0001.png")
    assert (tmp_path / "samples" / "00001.png").read_bytes() == b"the other run's"
    assert (tmp_path / "grid-0000.png").read_bytes() == b"the other run's grid"
    assert writer.save_samples(images[:1], lambda i: {})[0].endswith("00004.png")


@pytest.mark.parametrize("mode, key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_transparency_as_a_colour_key_is_shown_over_the_background_too(tmp_path, mode, key):
    image = Image.new(mode, (4, 4), (200, 40, 40) if mode == "RGB" else 120)
    image.paste((0, 0, 0) if mode == "RGB" else 0, (0, 0, 2, 2))  # the keyed, transparent corner
    image.save(tmp_path / "keyed.png", transparency=key)
    pixels = np.asarray(read_user_image(tmp_path / "keyed.png", "white"))
    assert (pixels[:2, :2] == 255).all() and not (pixels[2:, 2:] == 255).all()


def test_a_16_bit_greyscale_colour_key_is_shown_over_the_background(tmp_path):
    """Scaled to 8 bits, the key (here 1234) would name grey 5: the keyed corner came out near black."""
    values = np.full((4, 4), 40000, np.uint16)
    values[:2, :2] = 1234
    Image.fromarray(values).save(tmp_path / "keyed16.png", transparency=1234)
    with Image.open(tmp_path / "keyed16.png") as image:
        assert image.mode == "I;16" and image.info["transparency"] == 1234
    pixels = np.asarray(read_user_image(tmp_path / "keyed16.png", "white").convert("L"))
    assert (pixels[:2, :2] == 255).all() and (pixels[2:, 2:] == 156).all()  # 40000 / 257
