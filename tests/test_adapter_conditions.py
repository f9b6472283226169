"""Condition-image preprocessing for T2I-Adapters (ldm/modules/adapter_conditions.py)."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm.modules.adapter_conditions import (COND_TYPES, canny_numpy, color_palette, condition_batch,
                                            condition_files, sketch)


def shapes_image(size=128):
    image = Image.new("RGB", (size, size), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 70, 90], fill=(200, 50, 50))
    draw.ellipse([60, 40, 120, 110], fill=(40, 200, 90))
    draw.line([0, size - 1, size - 1, 0], fill=(250, 250, 250), width=3)
    return image


def test_numpy_canny_finds_thin_edges_of_a_step():
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:, 5:] = 200
    rgb[5:, :] = 120
    edges = canny_numpy(rgb) // 255
    expected = np.zeros((8, 10), np.uint8)
    expected[:4, 4] = 1          # the vertical step, one pixel wide
    expected[4, [0, 1, 2, 3, 4, 6, 7, 8, 9]] = 1  # the horizontal step (what OpenCV marks too)
    assert np.array_equal(edges, expected)
    assert not canny_numpy(np.full((16, 16, 3), 90, np.uint8)).any()


def test_numpy_canny_matches_opencv_when_installed():
    cv2 = pytest.importorskip("cv2")
    rgb = np.asarray(shapes_image())
    assert np.array_equal(canny_numpy(rgb) > 0, cv2.Canny(rgb, 100, 200) > 0)


def test_color_palette_is_one_colour_per_64_pixels():
    rgb = np.random.default_rng(0).integers(0, 255, (128, 192, 3), dtype=np.uint8)
    palette = color_palette(Image.fromarray(rgb))
    assert palette.shape == (128, 192, 3) and palette.dtype == np.float32
    cells = palette.reshape(2, 64, 3, 64, 3)
    assert np.all(cells == cells[:, :1, :, :1, :])  # constant inside every 64x64 cell
    assert 0.0 <= palette.min() and palette.max() <= 1.0


def test_sketch_is_binary_single_channel():
    grey = Image.fromarray(np.array([[0, 100, 140, 255]], np.uint8).repeat(4, 0))
    assert sketch(grey)[0, :, 0].tolist() == [0, 0, 1, 1]


def write(path, size=(64, 64), mode="RGB", colour=(255, 0, 0)):
    Image.new(mode, size, colour).save(path)
    return str(path)


def test_condition_batch_shapes_and_passthrough(tmp_path):
    a, b = write(tmp_path / "a.png"), write(tmp_path / "b.png", mode="L", colour=128)
    rgb = condition_batch([a, b], "depth", 3, 64, 64)
    assert rgb.shape == (2, 3, 64, 64) and rgb[0, :, 0, 0].tolist() == [1, 0, 0]
    grey = condition_batch([a, b], "passthrough", 1, 64, 64)
    assert grey.shape == (2, 1, 64, 64) and abs(grey[1, 0, 0, 0].item() - 128 / 255) < 1e-6
    assert condition_batch([a], "canny", 1, 64, 64).shape == (1, 1, 64, 64)
    assert set(COND_TYPES) >= {"canny", "color", "sketch", "depth", "seg", "keypose", "openpose", "passthrough"}


def test_condition_files_from_files_and_folders(tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for name in ("2.png", "1.jpg", "notes.txt"):
        (folder / name).write_bytes(b"")
    single = write(tmp_path / "x.png")
    assert condition_files([str(folder), single]) == [str(folder / "1.jpg"), str(folder / "2.png"), single]
    with pytest.raises(ValueError, match="condition image not found: nope.png"):
        condition_files(["nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no condition images"):
        condition_files([str(tmp_path / "empty")])


@pytest.mark.parametrize("cond_type, channels, size, expected, message", [
    ("depth", 1, (64, 64), (64, 64), "--cond-type depth gives 3-channel input but this adapter takes 1 channel"),
    ("canny", 3, (64, 64), (64, 64), "gives 1-channel input but this adapter takes 3 channels"),
    ("depth", 3, (100, 64), (64, 64), "is 100x64: both sides must be multiples of 64"),
    ("depth", 3, (128, 64), (64, 64), "pass --W 128 --H 64"),
])
def test_condition_batch_errors(tmp_path, cond_type, channels, size, expected, message):
    path = write(tmp_path / "c.png", size=size)
    with pytest.raises(ValueError, match=message):
        condition_batch([path], cond_type, channels, *expected)


def test_a_condition_saved_at_the_display_scale_is_told_to_shrink(tmp_path):
    """A 16 px model's PNGs are saved 16x enlarged: one such as condition is told to shrink, not to
    run the model at 256 px; another size keeps the --W/--H hint."""
    enlarged, other = write(tmp_path / "big.png", size=(256, 256)), write(tmp_path / "other.png", size=(32, 32))
    with pytest.raises(ValueError, match="is 256x256, 16x the 16x16 images to generate, as PNGs saved with "
                                         "--display-scale 16 are: shrink it 16x"):
        condition_batch([enlarged], "sketch", 1, 16, 16, multiple=8, display_scale=16)
    with pytest.raises(ValueError, match="pass --W 32 --H 32"):
        condition_batch([other], "sketch", 1, 16, 16, multiple=8, display_scale=16)


def test_unreadable_condition_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read condition image"):
        condition_batch([str(bad)], "depth", 3, 64, 64)
