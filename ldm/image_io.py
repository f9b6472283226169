"""Small image helpers shared by the sampling scripts and the training loggers.

Replaces torchvision.utils.make_grid (the only torchvision piece ldm used) and holds the
output conventions of scripts/txt2img.py and scripts/img2img.py: numbered files that are
never overwritten, and a JSON "parameters" PNG text chunk describing how an image was made.
"""
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"


def make_grid(images, nrow=8, padding=2, pad_value=0.0):
    """Tile a (B, C, H, W) tensor into one (C, H', W') image, rows of ``nrow`` images.

    Same layout as torchvision.utils.make_grid: ``padding`` pixels of ``pad_value`` around and
    between the tiles; a single (C, H, W) or (H, W) image is returned as it is (gray as RGB).
    """
    if images.dim() == 2:
        images = images.unsqueeze(0)
    if images.dim() == 3:
        return images.expand(3, -1, -1) if images.shape[0] == 1 else images
    if images.dim() != 4:
        raise ValueError(f"make_grid expects a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, nrows * cell_h + padding, ncol * cell_w + padding), pad_value)
    for i in range(b):
        y, x = divmod(i, ncol)
        top, left = y * cell_h + padding, x * cell_w + padding
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def to_pil(image):
    """A (C, H, W) tensor in [0, 1] → PIL RGB image, truncated to 8 bits as upstream's scripts did
    (not rounded): the same samples give upstream's PNG bytes."""
    array = 255.0 * image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array.astype(np.uint8))


def read_user_image(path, background):
    """An image file a user gives (--init-img, --reference-image, --cond, inpaint's image and mask)
    as an image viewer shows it: turned upright by its EXIF orientation (cameras and phones store
    portrait photos sideways with a tag saying so), with 8 bits per channel (`to_8bit`) and, where
    it is transparent, shown over `background` (`flatten`). OSError or ValueError where the file is
    no image, or one too large for PIL to open safely."""
    try:
        with Image.open(path) as image:
            # a loaded copy: usable after the file closes
            return flatten(to_8bit(ImageOps.exif_transpose(image)), background)
    except Image.DecompressionBombError as e:  # not an OSError: the scripts' one-line handlers missed it
        raise ValueError(f"{e} (shrink the image)") from None


def flatten(image, background):
    """An RGB `image` over `background` where it has transparency; without, as it is. PIL's
    convert("RGB") drops the alpha channel, and transparent pixels show whatever colour they store
    (often black, sometimes the cut-out's edge colours): a product photo cut out onto transparency
    then became an object on black. Photos (--init-img, --reference-image, inpaint's image) lie on
    "white", as a page shows them; condition maps and masks on "black", where nothing is drawn.
    Transparency as a colour key (PNG's tRNS in an RGB, greyscale or palette image) counts too."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("RGB")


def to_8bit(image):
    """``image`` with 8 bits per channel. PIL's convert("RGB") and convert("L") clip a 16- or
    32-bit greyscale image at 255 and a float one to 0, so a 16-bit depth map or scan came out
    white and a [0, 1] float image black; their values are scaled instead: 16-bit ones by 257
    (65535 -> 255), floats from [0, 1]. Other modes (RGB, RGBA, L, P, CMYK, ...) are returned as
    they are. A 16-bit colour key (PNG's tRNS) becomes an alpha channel ("LA"): scaled, the key
    would name another grey, and its pixels would show as grey, not as the background."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    elif image.mode != "I" or values.max(initial=0.0) > 255:  # "I" holding 8-bit values stays as it is
        values = values / 257.0
    grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = np.where(np.asarray(image) == key, 0, 255).astype(np.uint8)
    return Image.merge("LA", (grey, Image.fromarray(alpha, "L")))


def upscale(image, factor):
    """Integer nearest-neighbour upscale, for viewing the tiny images small models make."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def png_parameters(parameters):
    """PngInfo carrying ``parameters`` (a JSON-serialisable dict) under the key "parameters"."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True, default=str))
    return info


def read_parameters(path):
    """The "parameters" dict stored by :func:`save_png`, or None if the PNG has none."""
    with Image.open(path) as image:
        text = image.text.get(PARAMETERS_KEY)
    return None if text is None else json.loads(text)


def save_png(image, path, parameters=None):
    """Save a PIL image as PNG with optional metadata; refuses to overwrite an existing file."""
    pnginfo = png_parameters(parameters) if parameters is not None else None
    # "xb": exclusive create, so a file that appeared meanwhile is never clobbered.
    with open(path, "xb") as f:
        image.save(f, format="PNG", pnginfo=pnginfo)
    return path


def next_free_index(directory, prefix="", digits=5):
    """Index after the highest existing ``{prefix}NNNNN.png`` in ``directory`` (0 if none).

    Uses the maximum index rather than the number of files, so deleted or foreign files never
    make a new image reuse an existing name.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d{{{digits},}})\.png$")
    indices = [int(m.group(1)) for m in map(pattern.match, _listdir(directory)) if m]
    return max(indices, default=-1) + 1


def _listdir(directory):
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
