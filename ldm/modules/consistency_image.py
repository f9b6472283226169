"""--reference-image: the batch takes the look of an image the user gives (a photo of their chair,
face or style; several images, e.g. views of one object, are one anchor each), in anchor mode.

Anchor mode lets every image read the self-attention keys/values of an anchor sampled in the same
batch. Here the anchor is given instead of sampled: it joins each batch as an extra first image
whose latent is, before every step, the reference image's latent noised to that step. That is the
replacement upstream's DDIM and PLMS make for inpainting (`mask`/`x0`), with a mask that covers the
whole anchor and nothing else (img2img's DDIM `decode` and DPM-Solver make the same replacement,
DPM-Solver on the model's input). The anchor's keys/values at step t are then what the model's
self-attention makes of that image at noise level t, the level the other images' queries are at,
so they read its colours, materials and identity as they would a sampled anchor's; their layout
stays their own (with --adapter, the layout their conditions give; the anchor gets no adapter
features, so no condition reshapes the keys/values read from it; in img2img, the init image's).
The anchor's own output, a re-noised copy of the reference, is dropped.
(ControlNet's "reference-only" mode feeds the reference the same way; StyleAligned inverts it
with DDIM instead, which costs a second pass over the steps.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ldm.image_io import read_user_image
from ldm.model_choice import in_repo
from ldm.modules.consistency import ShareMode
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def add_arguments(parser):
    parser.add_argument("--reference-image", metavar="PATH", nargs="+", type=in_repo,
                        help="the batch takes the look of this image (an object, face or style; several: views "
                             "of one): each is read as an extra anchor, noised to each step, and is not itself "
                             "an output; with --consistent-attn (anchor mode). Resized to the output size")


@dataclass(eq=False)
class ImageAnchor:
    """The reference images as the first images (the anchors) of every batch. `pixels`: (K, 3, H, W)
    in [-1, 1], one per path."""
    paths: tuple
    pixels: torch.Tensor
    _latent: torch.Tensor | None = None  # their first-stage encodings, made once

    def __len__(self):
        return len(self.paths)

    def describe(self) -> dict:
        return {"images": list(self.paths)}

    def extend(self, prompts, x_T):
        """The batch with the anchors in front. Their prompt is the first image's (an anchor's text
        shapes its own features as the batch's prompt would); their start codes are zeros, so that
        no noise is drawn for them: they are replaced before the first step anyway."""
        k = len(self)
        return [prompts[0]] * k + list(prompts), torch.cat([x_T[:1].new_zeros(k, *x_T.shape[1:]), x_T])

    def known(self, model, n) -> dict:
        """The sampler's `mask` and `x0` for a batch of `n` (anchors first): only the anchors are known."""
        latent, k = self.latent(model), len(self)
        mask = torch.zeros(n, 1, 1, 1, device=latent.device, dtype=latent.dtype)
        mask[:k] = 1
        return {"mask": mask, "x0": torch.cat([latent, latent[:1].expand(n - k, -1, -1, -1)])}

    def latent(self, model):
        if self._latent is None:
            # the posterior's mean, not a sample: the reference as it is, the same in every batch
            posterior = model.encode_first_stage(self.pixels.to(model.betas.device))
            if isinstance(posterior, DiagonalGaussianDistribution):
                posterior = posterior.mode()
            self._latent = model.get_first_stage_encoding(posterior)
        return self._latent


def set_from_arguments(opt, parser, size) -> None:
    """opt.image_anchor: the anchors --reference-image asks for, or None. With them, every batch has
    one anchor per image and reads the images, not the run's first anchors: opt.consistency gets
    their count, opt.run_anchors becomes None."""
    opt.image_anchor = anchor_from_arguments(opt, parser, size)
    if opt.image_anchor is not None:
        opt.consistency = replace(opt.consistency, n_anchors=len(opt.image_anchor))
        opt.run_anchors = None


def anchor_from_arguments(opt, parser, size) -> ImageAnchor | None:
    """The anchors --reference-image asks for at `size` (height, width), or None; after
    script_helpers.consistency_from_arguments (it needs opt.consistency). Bad input ends in one
    parser.error line, before the model is loaded."""
    paths = opt.reference_image
    if paths is None:
        return None
    if opt.write_reference or opt.read_reference:  # checked first: they refuse the --consistent-attn asked for next
        parser.error("--reference-image is an anchor image of --consistent-attn, a reference file an anchor recorded "
                     "by an earlier run: choose --reference-image or --write-/--read-reference")
    if not opt.consistent_attn:
        parser.error("--reference-image is read as the anchor of --consistent-attn; add --consistent-attn")
    config = opt.consistency  # not None: with the reference, a batch has two images or more
    # the flags themselves, not the config's values: --share-anchors 1 with two images would
    # otherwise pass as the default and be silently overridden by the image count
    if config.mode is not ShareMode.ANCHOR or opt.share_anchors is not None or config.anchor_images:
        parser.error("--reference-image gives the anchors of --share-mode anchor, one per image: leave out "
                     "--share-mode other than anchor, --share-anchors and --anchor-images")
    height, width = size
    return ImageAnchor(tuple(paths), torch.cat([read_image(parser, path, width, height) for path in paths]))


def read_image(parser, path, width, height) -> torch.Tensor:
    """The image file as `pixels`; one error line for a file that is no image."""
    try:
        return pixels(read_user_image(path, "white").convert("RGB"), width, height)
    except (OSError, ValueError) as e:
        parser.error(f"cannot read --reference-image {path}: {e}")


def pixels(image: Image.Image, width, height) -> torch.Tensor:
    """(1, 3, height, width) in [-1, 1]. Shrinking uses a box filter: exact for the PNGs of a small
    model saved enlarged by --display-scale, which then go back in at the model's own pixels."""
    shrink = image.width >= width and image.height >= height
    image = image.resize((width, height), resample=Image.BOX if shrink else Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()
