"""The BSRGAN degradations of the super-resolution training data (`degradation: bsrgan` or
`bsrgan_light` in an ImageNetSR config) on a current SciPy: upstream's called `scipy.finfo`,
gone from SciPy's namespace, and `interp2d`, removed in SciPy 1.14."""
import random

import numpy as np
import pytest

pytest.importorskip("cv2")  # the `data` extra (opencv-python-headless); the test extra installs it

from ldm.modules.image_degradation import bsrgan, bsrgan_light  # noqa: E402

MODULES = [bsrgan, bsrgan_light]


def test_shift_pixel_moves_a_plane_by_half_the_scale_minus_one():
    """Bilinear interpolation reproduces a plane exactly, so the shifted kernel is known: every
    pixel reads the one (sf - 1) / 2 further down and right, clipped at the border."""
    y, x = np.mgrid[0:8, 0:8].astype(float)
    shifted = bsrgan.shift_pixel(x + 10 * y, sf=4)
    np.testing.assert_allclose(shifted, np.clip(x + 1.5, 0, 7) + 10 * np.clip(y + 1.5, 0, 7), atol=1e-12)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_degradation_variant_runs_every_branch_and_gives_the_low_resolution_image(module, monkeypatch):
    shifted, shift_pixel = [], bsrgan.shift_pixel  # the light variant runs bsrgan's pipeline too
    monkeypatch.setattr(bsrgan, "shift_pixel", lambda k, sf: shifted.append(sf) or shift_pixel(k, sf))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for seed in range(24):  # the pipeline draws its steps from the global RNGs, as upstream
        random.seed(seed)
        np.random.seed(seed)
        low = module.degradation_bsrgan_variant(image, sf=4)["image"]
        assert low.shape == (16, 16, 3) and low.dtype == np.uint8
    assert shifted, "no seed took the shifted-kernel downsampling; take more seeds"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_a_wide_image_keeps_its_aspect_after_the_mod_crop(module):
    """The mod crop cuts rows to a multiple of sf by the height and columns by the width; upstream
    cut them by each other's (an image 37 rows by 50 columns came out 9x9, not 9x12)."""
    image = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    for seed in range(8):
        random.seed(seed)
        np.random.seed(seed)
        assert module.degradation_bsrgan_variant(image, sf=4)["image"].shape == (9, 12, 3)
