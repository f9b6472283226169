"""Upstream's LSUN training data (configs/latent-diffusion/lsun_*.yaml) on a current Pillow:
it named PIL.Image.LINEAR, removed in Pillow 10, so the dataset could not be built at all."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.lsun import LSUNBase


@pytest.mark.parametrize("interpolation", ["linear", "bilinear", "bicubic", "lanczos"])
def test_lsun_base_reads_a_centre_crop_resized_to_size(tmp_path, interpolation):
    pixels = np.zeros((12, 20, 3), np.uint8)
    pixels[:, 4:16] = 200  # the centre square; the bands left and right are cropped away
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "files.txt").write_text("a.png\n")
    data = LSUNBase(txt_file=tmp_path / "files.txt", data_root=tmp_path, size=8,
                    interpolation=interpolation, flip_p=0.0)
    example = data[0]
    assert len(data) == 1 and example["relative_file_path_"] == "a.png"
    assert example["image"].shape == (8, 8, 3) and example["image"].dtype == np.float32
    np.testing.assert_allclose(example["image"], 200 / 127.5 - 1.0, atol=1e-6)


def test_a_blank_line_is_no_image_and_an_unknown_interpolation_is_a_config_error(tmp_path):
    """A blank (e.g. a trailing) line was an image path to the data folder itself, an error only
    when read; an interpolation Pillow's table lacks was a KeyError."""
    from ldm.util import ConfigError
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "files.txt").write_text("a.png\n\n  \n")
    assert len(LSUNBase(txt_file=tmp_path / "files.txt", data_root=tmp_path, size=8)) == 1
    with pytest.raises(ConfigError, match="interpolation is 'area'; it takes one of 'linear', 'bilinear'"):
        LSUNBase(txt_file=tmp_path / "files.txt", data_root=tmp_path, size=8, interpolation="area")

