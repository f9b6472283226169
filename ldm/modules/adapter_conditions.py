"""Condition images for T2I-Adapters: read, preprocess, batch.

Only preprocessors that need no extra network weights live here, following the official
T2I-Adapter inference code (TencentARC/T2I-Adapter, ldm/modules/extra_condition/api.py):

    canny        edges of a photo: Canny with thresholds 100/200, 1 channel. Uses OpenCV when
                 it is installed (`pip install opencv-python-headless`, the `adapter` extra),
                 the same call as upstream; otherwise `canny_numpy`, a small re-implementation
                 (Sobel, non-maximum suppression, hysteresis) that marks nearly the same pixels.
    sketch       a ready-made sketch (white lines on black), binarised at 0.5, 1 channel
    color        the colour palette of a photo: downsampled 64x (bicubic), upsampled back
                 (nearest), 3 channels
    depth, seg, keypose, openpose
                 ready-made maps (a MiDaS depth map, a segmentation, a rendered pose), RGB as is
    passthrough  any ready-made map, as grey or RGB to match the adapter

Maps that need a model (depth from a photo, pose detection, PiDiNet sketches) must be made
elsewhere and passed as ready-made maps. All maps are float tensors in [0, 1].
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from ldm.image_io import read_user_image

log = logging.getLogger(__name__)

PALETTE_CELL = 64          # colour adapter: one colour per 64x64 pixels, as upstream
SIZE_MULTIPLE = 64         # SD v1 adapters downsample 8 (unshuffle) x 8 (three stages); Adapter.downsampling
CANNY_THRESHOLDS = (100, 200)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _to_float(array):
    return array.astype(np.float32) / 255.0


def canny_numpy(rgb, low=CANNY_THRESHOLDS[0], high=CANNY_THRESHOLDS[1]):
    """Canny edges of an (H, W, 3) uint8 image as (H, W) uint8 0/255, without OpenCV.

    Mirrors cv2.Canny(image, low, high): 3x3 Sobel per channel, keeping the channel with the
    strongest L1 gradient; thinning by non-maximum suppression along the gradient direction;
    hysteresis (weak edges survive when connected to strong ones)."""
    img = np.pad(rgb.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    H, W = rgb.shape[:2]
    win = lambda dy, dx: img[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # noqa: E731
    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1)) - (win(-1, -1) + 2 * win(0, -1) + win(1, -1))
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1)) - (win(-1, -1) + 2 * win(-1, 0) + win(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    best = mag.argmax(axis=2)[..., None]
    gx, gy, mag = (np.take_along_axis(a, best, axis=2)[..., 0] for a in (gx, gy, mag))

    # non-maximum suppression: compare with the two neighbours across the edge
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # gradient 0: →, 1: ↘, 2: ↓, 3: ↙
    padded = np.pad(mag, 1)
    shifted = lambda dy, dx: padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # noqa: E731
    # (neighbour before, neighbour after, ties kept?): like OpenCV, a flat two-pixel ridge keeps
    # one pixel along the axes; diagonals need a strict maximum
    neighbours = {0: ((0, -1), (0, 1), True), 1: ((-1, -1), (1, 1), False),
                  2: ((-1, 0), (1, 0), True), 3: ((-1, 1), (1, -1), False)}
    keep = np.zeros_like(mag, dtype=bool)
    for d, (a, b, ties) in neighbours.items():
        after = mag >= shifted(*b) if ties else mag > shifted(*b)
        keep |= (direction == d) & (mag > shifted(*a)) & after
    mag = np.where(keep, mag, 0.0)

    # hysteresis: grow the strong edges into connected weak ones until nothing changes
    strong, weak = mag > high, mag > low
    while True:
        p = np.pad(strong, 1)
        grown = weak & np.any([p[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        if np.array_equal(grown | strong, strong):
            return strong.astype(np.uint8) * 255
        strong |= grown


def canny(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"))
    try:
        import cv2
    except ImportError:
        edges = canny_numpy(rgb)
    else:
        edges = cv2.Canny(rgb, *CANNY_THRESHOLDS)
    return _to_float(edges)[..., None]


def sketch(image: Image.Image) -> np.ndarray:
    # upstream reads the first colour channel; grey is the same for grey sketches and sane for others
    return (_to_float(np.asarray(image.convert("L"))) > 0.5).astype(np.float32)[..., None]


def color_palette(image: Image.Image) -> np.ndarray:
    w, h = image.size
    small = image.convert("RGB").resize((max(1, w // PALETTE_CELL), max(1, h // PALETTE_CELL)), Image.BICUBIC)
    return _to_float(np.asarray(small.resize((w, h), Image.NEAREST)))


def rgb_map(image: Image.Image) -> np.ndarray:
    return _to_float(np.asarray(image.convert("RGB")))


def grey_map(image: Image.Image) -> np.ndarray:
    return _to_float(np.asarray(image.convert("L")))[..., None]


# name -> (input channels the matching adapter takes, preprocessor); None = as the adapter wants
COND_TYPES = {
    "canny": (1, canny),
    "sketch": (1, sketch),
    "color": (3, color_palette),
    "depth": (3, rgb_map),
    "seg": (3, rgb_map),
    "keypose": (3, rgb_map),
    "openpose": (3, rgb_map),
    "passthrough": (None, None),
}


def condition_files(entries) -> list:
    """Paths from a list of files and folders (a folder gives its images, sorted by name).
    ValueError (one line) for a missing path or an empty folder."""
    files = []
    for entry in entries:
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, name) for name in os.listdir(entry)
                           if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ValueError(f"no condition images ({', '.join(IMAGE_SUFFIXES)}) in folder {entry}")
            files += found
        elif os.path.isfile(entry):
            files.append(entry)
        else:
            raise ValueError(f"condition image not found: {entry}")
    return files


# the types whose preprocessor makes the map from a photo: a cut-out lies on white there, as an
# --init-img does; the others read maps, where transparency means nothing drawn (black)
FROM_PHOTOS = {"canny", "color"}


def read_image(path, cond_type) -> Image.Image:
    try:
        return read_user_image(path, "white" if cond_type in FROM_PHOTOS else "black")
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read condition image {path}: {e}")


def check_size(path, image: Image.Image, width: int, height: int, size_hint: str | None = None,
               multiple: int = SIZE_MULTIPLE, display_scale: int = 1) -> None:
    """The condition must have the output's size (no silent resizing). `size_hint` says how to
    change the output size; by default txt2img's flags. `multiple`: the adapter's downsampling
    (64 for SD v1, 8 for a pixel-space adapter with four levels). `display_scale`: how much larger
    the scripts save this model's images; a condition exactly that much larger is such a PNG, and
    the hint says to shrink it (generating at its size would run a 16 px model at 256 px)."""
    w, h = image.size
    if w % multiple or h % multiple:
        raise ValueError(f"condition image {path} is {w}x{h}: both sides must be multiples of {multiple} "
                         f"(the adapter downsamples by {multiple})")
    if (w, h) == (width * display_scale, height * display_scale) != (width, height):
        raise ValueError(f"condition image {path} is {w}x{h}, {display_scale}x the {width}x{height} images to "
                         f"generate, as PNGs saved with --display-scale {display_scale} are: shrink it "
                         f"{display_scale}x")
    if (w, h) != (width, height):
        hint = size_hint or f"pass --W {w} --H {h}"
        raise ValueError(f"condition image {path} is {w}x{h} but the images to generate are {width}x{height}: "
                         f"{hint} or resize the condition")


def condition_batch(paths, cond_type: str, cond_channels: int, width: int, height: int,
                    size_hint: str | None = None, multiple: int = SIZE_MULTIPLE,
                    display_scale: int = 1) -> torch.Tensor:
    """(len(paths), cond_channels, height, width) float tensor in [0, 1].

    ValueError (one line) when the type gives another channel count than the adapter takes
    (an RGB map into a sketch/canny adapter), or an image is unreadable or of the wrong size."""
    channels, preprocess = COND_TYPES[cond_type]
    if channels is None:
        preprocess = grey_map if cond_channels == 1 else rgb_map
    elif channels != cond_channels:
        fitting = sorted(name for name, (c, _) in COND_TYPES.items() if c in (cond_channels, None))
        raise ValueError(f"--cond-type {cond_type} gives {channels}-channel input but this adapter takes "
                         f"{cond_channels} channel{'s' if cond_channels > 1 else ''}: use --cond-type "
                         f"{'|'.join(fitting)}, or the adapter made for {cond_type}")
    maps = []
    for path in paths:
        image = read_image(path, cond_type)
        check_size(path, image, width, height, size_hint, multiple, display_scale)
        maps.append(torch.from_numpy(np.ascontiguousarray(preprocess(image))).permute(2, 0, 1))
    return torch.stack(maps)
