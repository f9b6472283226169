# -*- coding: utf-8 -*-
"""BSRGAN's lighter degradation pipeline (smaller blur kernels, one blur instead of two, milder
Gaussian and JPEG noise, resizing a little more often), the super-resolution data's
`degradation: bsrgan_light`. Upstream kept a full copy of bsrgan.py here; only the step that
differs is written out (add_blur), and the pipeline is bsrgan.py's own, run with it and the
light variant's numbers (LIGHT), so a fix there is a fix here.

# --------------------------------------------
# Super-Resolution
# --------------------------------------------
#
# Kai Zhang (cskaizhang@gmail.com)
# https://github.com/cszn
# From 2019/03--2021/08
# --------------------------------------------
"""

import random

import numpy as np
from scipy import ndimage

from ldm.modules.image_degradation import bsrgan
# bsrgan's own functions, not copies; add_blur below is lighter (kernels a quarter as wide)
from ldm.modules.image_degradation.bsrgan import Variant, anisotropic_Gaussian, fspecial


def add_blur(img, sf=4):
    wd2 = 4.0 + sf
    wd = 2.0 + 0.2 * sf

    wd2 = wd2/4
    wd = wd/4

    if random.random() < 0.5:
        l1 = wd2 * random.random()
        l2 = wd2 * random.random()
        k = anisotropic_Gaussian(ksize=random.randint(2, 11) + 3, theta=random.random() * np.pi, l1=l1, l2=l2)
    else:
        k = fspecial('gaussian', random.randint(2, 4) + 3, wd * random.random())
    img = ndimage.convolve(img, np.expand_dims(k, axis=2), mode='mirror')

    return img


LIGHT = Variant(add_blur, blur_steps=(0,), resize_prob=0.8, noise_levels=(1, 2), jpeg_quality=(80, 95))


def degradation_bsrgan_variant(image, sf=4, isp_model=None):
    """bsrgan.py's degradation pipeline with the light variant's steps (LIGHT)."""
    return bsrgan.degradation_bsrgan_variant(image, sf, isp_model, variant=LIGHT)
