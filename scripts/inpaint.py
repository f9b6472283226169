"""Fill the masked part of images with upstream's LDM inpainting model.

For every pair example.png + example_mask.png in --indir (white: fill, black: keep), writes
example.png to --outdir. The model (models/ldm/inpainting_big, fetched by
scripts/download_models.sh) is a LatentDiffusion without text: its UNet reads the VQ latent of
the masked image and the downsampled mask, concatenated to the noisy latent, so it learns to
continue what the mask leaves visible. Pixels outside the mask are copied from the input.
"""
import glob
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm import script_helpers as helpers
from ldm.model_choice import check_checkpoint_type, in_repo, read_model_geometry
from ldm.outputs import ctrl_c_deferred
from ldm.image_io import read_user_image, save_png
from ldm.models.diffusion.ddim import DDIMSampler

logger = logging.getLogger("inpaint")

CONFIG = "models/ldm/inpainting_big/config.yaml"
CKPT = "models/ldm/inpainting_big/last.ckpt"


def make_batch(image, mask, device):
    image = np.array(read_user_image(image, "white").convert("RGB"))
    image = image.astype(np.float32)/255.0
    image = image[None].transpose(0,3,1,2)
    image = torch.from_numpy(image)

    mask = np.array(read_user_image(mask, "black").convert("L"))
    mask = mask.astype(np.float32)/255.0
    mask = mask[None,None]
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    mask = torch.from_numpy(mask)

    masked_image = (1-mask)*image

    batch = {"image": image, "mask": mask, "masked_image": masked_image}
    for k in batch:
        batch[k] = batch[k].to(device=device)
        batch[k] = batch[k]*2.0-1.0
    return batch


def parse_args():
    parser = helpers.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--indir", type=str, required=True,
                        help="dir containing image-mask pairs (`example.png` and `example_mask.png`)")
    parser.add_argument("--outdir", type=str, required=True,
                        help="dir to write results to (files already there are never overwritten)")
    parser.add_argument("--steps", type=helpers.positive_int, default=50, help="number of ddim sampling steps")
    parser.add_argument("--seed", type=int, default=42, help="the same seed and inputs give the same images")
    parser.add_argument("--config", type=str, default=CONFIG, help="the inpainting model's config")
    parser.add_argument("--ckpt", type=str, default=CKPT, help="the inpainting model's weights")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow full unpickling of a TRUSTED .ckpt (can run arbitrary code)")
    return parser, parser.parse_args()


def find_pairs(parser, opt, multiple):
    """(image, mask, output path) for each *_mask.png of --indir; every problem a user can fix
    (missing image, sizes, an output that exists) is one error line before the model loads."""
    if not os.path.isdir(opt.indir):
        parser.error(f"--indir {opt.indir} is not a folder")
    masks = sorted(glob.glob(os.path.join(opt.indir, "*_mask.png")))
    if not masks:
        parser.error(f"no *_mask.png in {opt.indir} (it needs pairs example.png + example_mask.png)")
    pairs = []
    for mask in masks:
        image = mask[:-len("_mask.png")] + ".png"
        if not os.path.isfile(image):
            parser.error(f"{image} not found (each *_mask.png needs its image next to it)")
        try:  # the sizes as sampling reads them (upright by EXIF orientation)
            size, mask_size = read_user_image(image, "white").size, read_user_image(mask, "black").size
        except (OSError, ValueError) as e:
            parser.error(f"cannot read {image} and its mask as images: {e}")
        if size != mask_size:
            parser.error(f"{mask} is {mask_size[0]}x{mask_size[1]} but {image} is {size[0]}x{size[1]}; "
                         "a mask must have its image's size")
        if size[0] % multiple or size[1] % multiple:
            parser.error(f"{image} is {size[0]}x{size[1]}; this model needs sides that are multiples of "
                         f"{multiple} (crop or resize it, e.g. to 512x512)")
        output = os.path.join(opt.outdir, os.path.basename(image))
        if os.path.exists(output):
            parser.error(f"{output} exists; outputs are never overwritten: pass a new --outdir")
        pairs.append((image, mask, output))
    return pairs


def check_inpainting_model(parser, opt, geometry):
    """The config is a model conditioned on the masked image (upstream's inpainting LDM), and
    --steps fits its schedule: else one error line, before the model is built."""
    key = OmegaConf.load(opt.config).model.get("params", {}).get("cond_stage_key")
    if key != "masked_image":
        parser.error(f"--config {opt.config} is not an inpainting model (conditioned on {key!r}, not on "
                     f"'masked_image'); this script needs {CONFIG}")
    helpers.check_steps(parser, "--steps", opt.steps, geometry.timesteps)


def check_checkpoint(parser, opt):
    """--ckpt is a checkpoint file, before any output folder is made or the model is built."""
    if os.path.isdir(opt.ckpt):
        parser.error(f"--ckpt {opt.ckpt} is a folder; pass the inpainting model's checkpoint file, e.g. {CKPT}")
    if not os.path.isfile(opt.ckpt):
        hint = " (scripts/download_models.sh downloads the inpainting model)" if opt.ckpt == CKPT else ""
        parser.error(f"{opt.ckpt} not found{hint}")
    check_checkpoint_type(parser, "--ckpt", opt.ckpt)


@torch.no_grad()
def inpaint(model, sampler, batch, steps):
    """The inpainted image as uint8 HxWx3: the model's image inside the mask, the input outside."""
    # encode masked image and concat downsampled mask
    c = model.cond_stage_model.encode(batch["masked_image"])
    cc = torch.nn.functional.interpolate(batch["mask"], size=c.shape[-2:])
    c = torch.cat((c, cc), dim=1)

    shape = (c.shape[1]-1,)+c.shape[2:]
    samples_ddim, _ = sampler.sample(S=steps, conditioning=c, batch_size=c.shape[0], shape=shape, verbose=False)
    x_samples_ddim = model.decode_first_stage(samples_ddim)

    image = torch.clamp((batch["image"]+1.0)/2.0, min=0.0, max=1.0)
    mask = torch.clamp((batch["mask"]+1.0)/2.0, min=0.0, max=1.0)
    predicted_image = torch.clamp((x_samples_ddim+1.0)/2.0, min=0.0, max=1.0)

    inpainted = (1-mask)*image+mask*predicted_image
    # rounded, not truncated (upstream): kept pixels come back as they went in, not some levels 1 darker
    return (inpainted.cpu().numpy().transpose(0,2,3,1)[0]*255).round().astype(np.uint8)


def main():
    helpers.configure_logging()
    parser, opt = parse_args()
    helpers.check_seed(parser, "--seed", opt.seed)
    opt.config, opt.ckpt = in_repo(opt.config), in_repo(opt.ckpt)
    geometry = read_model_geometry(parser, "--config", opt.config, example=CONFIG)
    check_inpainting_model(parser, opt, geometry)
    pairs = find_pairs(parser, opt, geometry.multiple)
    check_checkpoint(parser, opt)
    helpers.check_output_dir(parser, "--outdir", opt.outdir)
    logger.info("Found %d inputs.", len(pairs))

    device = helpers.resolve_device("auto")
    model = helpers.build_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    sampler = DDIMSampler(model)
    helpers.seed_everything(opt.seed)
    with model.ema_scope():
        for image, mask, output in tqdm(pairs):
            inpainted = Image.fromarray(inpaint(model, sampler, make_batch(image, mask, device), opt.steps))
            with ctrl_c_deferred():  # a PNG cut off by Ctrl-C would block the rerun ("exists")
                save_png(inpainted, output)  # exclusive: a file another run wrote meanwhile stays
    logger.info("%d images written to %s", len(pairs), opt.outdir)


if __name__ == "__main__":
    helpers.interruptible(main)
