"""make variations of input image

Noises an init image part of the way (--strength) with DDIM's stochastic_encode and denoises it
again under the prompt. main() is split like scripts/txt2img.py: build_parser /
validate_options / load_model / generate / save_outputs, with an ``extra_metadata`` hook.
"""
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm.image_io import read_user_image
from ldm.model_choice import in_repo
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules import adapters, consistency_image, consistency_reference
from ldm.outputs import build_postprocess, feature_metadata, save_results, written_message
from ldm.script_helpers import (ArgumentParser, add_batch_arguments, add_common_arguments, check_against_model,
                                check_sample_outdir, check_step_windows, check_subject_words_before_loading,
                                configure_logging, consistency_from_arguments, interruptible, latents_to_images,
                                load_model, make_sampler, noised_batches, precision_context, sampling_batch,
                                validate_common, warn_if_far_above_model_size)

logger = logging.getLogger("img2img")

# img2img needs stochastic_encode/decode, which only DDIM provides; upstream's --plms flag is
# accepted and rejected with a clear error.
SAMPLERS = {"ddim": DDIMSampler}
SAMPLER_ALIASES = {"plms": "plms"}


def build_parser():
    parser = ArgumentParser(description="Make variations of an input image guided by a prompt.")
    add_common_arguments(parser, samplers=SAMPLERS, aliases=SAMPLER_ALIASES,
                         outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0)
    parser.add_argument("--init-img", type=in_repo, nargs="?", help="path to the input image")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising, above 0. 1.0 noises the init image to the last of "
                             "the --ddim_steps timesteps: with many steps nearly pure noise (full destruction of "
                             "information in init image), with few much of it survives")
    add_batch_arguments(parser)
    return parser


def validate_options(parser, opt):
    """Check the parsed options; bad input ends with one ``error:`` line (parser.error)."""
    opt.consistency = consistency_from_arguments(parser, opt)
    validate_common(parser, opt, SAMPLERS, SAMPLER_ALIASES)
    if not opt.init_img:
        parser.error("pass --init-img PATH (the image to vary)")
    if not 0.0 < opt.strength <= 1.0:
        parser.error(f"--strength must be in (0.0, 1.0], got {opt.strength}" + (
            " (0 would return the init image unchanged)" if opt.strength == 0 else ""))
    if opt.ddim_steps == 1:  # txt2img warns too: the one step of upstream's schedule is timestep 1
        logger.warning("--ddim_steps 1 noises the init image to timestep 1 of %d only, whatever --strength: the "
                       "images are the init image almost unchanged; take more (strength 1 noises to the last of "
                       "their timesteps)", opt.geometry.timesteps)
    if encode_steps(opt) < 1:
        parser.error(f"--strength {opt.strength} x --ddim_steps {opt.ddim_steps} gives no denoising steps; "
                     f"raise one of them")
    return opt


def load_img(path, multiple, display_scale=1):
    """(1, 3, H, W) tensor in [-1, 1], in the model's pixels. A model shown enlarged by
    ``display_scale`` K (the small embedded models, whose PNGs are saved K times their size) reads
    the image shrunk by K (BOX filter: exact for those PNGs), so that txt2img's outputs go back in
    at the size the model made them; without it, a 16 px model fed its own 256 px PNG ran 256 times
    the pixels it was trained on, for many minutes. Then, as upstream, the sides are cropped down to
    multiples of ``multiple`` (LANCZOS resize): 64 for SD v1 (8x autoencoder times the UNet's 8x),
    8 for the pixel-space embedded model. An unusable image is a ValueError saying why."""
    try:
        image = read_user_image(path, "white").convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --init-img {path}: {e}") from None
    logger.info("loaded input image of size (%d, %d) from %s", *image.size, path)
    if display_scale > 1:
        image = image.resize([max(1, round(x / display_scale)) for x in image.size], resample=Image.BOX)
        logger.info("read at (%d, %d): the model's pixels, its images being shown %dx enlarged (--display-scale)",
                    *image.size, display_scale)
    w, h = (x - x % multiple for x in image.size)
    if w == 0 or h == 0:
        smallest = multiple * display_scale
        shrunk = f": the model reads it shrunk {display_scale}x, its display scale, and needs {multiple}x{multiple} " \
                 f"(--display-scale 1 reads it pixel for pixel)" if display_scale > 1 else ""
        raise ValueError(f"--init-img must be at least {smallest}x{smallest} pixels{shrunk}")
    image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.array(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array[None].transpose(0, 3, 1, 2)) - 1.0


def encode_init_image(model, init_image, batch_size, device):
    init_image = init_image.to(device).expand(batch_size, -1, -1, -1)
    return model.get_first_stage_encoding(model.encode_first_stage(init_image))


def encode_steps(opt):
    """How many of the --ddim_steps steps the init image is noised by, and denoised along: the
    whole steps of strength x steps, as upstream, but 0.29 x 100 (28.999999999999996 in floats) is 29."""
    return int(round(opt.strength * opt.ddim_steps, 9))


def sample_batch(opt, model, sampler, prompts, init_latent, t_enc, noise):
    """Vary the init latent for each prompt: (len(prompts), 3, H, W) images in [0, 1], CPU."""
    n = len(prompts)
    # Upstream noises to DDIM index t_enc while decode's first step is index t_enc - 1, one level
    # less noisy; kept for strength < 1 (the same images as upstream). At strength 1.0 index t_enc
    # does not exist: noise to the last index, exactly the level decode starts from.
    t = torch.full((n,), min(t_enc, opt.ddim_steps - 1), dtype=torch.long, device=init_latent.device)
    z_enc = sampler.stochastic_encode(init_latent[:n], t, noise=noise)
    with sampling_batch(opt, model, prompts, z_enc) as (c, uc, z_enc, known):
        latents = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=opt.scale,
                                 unconditional_conditioning=uc, verbose=False, **known)
    return latents_to_images(model, latents[-n:])


def generate(opt, model, sampler, device, postprocess, init_image):
    """Yield (prompts, images) for every batch of every iteration; `sampler` has its schedule made."""
    t_enc = encode_steps(opt)
    logger.info("target t_enc is %d steps", t_enc)
    with torch.no_grad(), precision_context(opt.precision, device), model.ema_scope():
        init_latent = encode_init_image(model, init_image, opt.n_samples, device)
        if opt.adapters is not None:
            opt.adapters.prepare(model, device)  # features once per image, not per step
        for prompts, noise in noised_batches(opt, init_latent.shape, device):
            yield prompts, postprocess.batch(sample_batch(opt, model, sampler, prompts, init_latent, t_enc, noise))


def save_outputs(opt, results, size, extra_metadata=None, mark=None):
    """Save samples (unless --skip_save) and a grid (unless --skip_grid); returns the paths."""
    extra = {"init_img": opt.init_img, "strength": opt.strength, **(extra_metadata or {})}
    return save_results(opt, results, height=size[0], width=size[1], extra_metadata=extra, mark=mark)


def check_init_image(parser, opt):
    """The init image, as the model reads it, and what depends on its size, checked before the
    model loads: the reference's image size is the (cropped) init image's, and a different
    strength is a different trajectory, so both are recorded with a reference."""
    try:
        init_image = load_img(opt.init_img, opt.geometry.multiple, opt.display_scale)
    except ValueError as err:
        parser.error(str(err))
    height, width = init_image.shape[2:]
    model_scale = opt.geometry.display_scale
    warn_if_far_above_model_size(opt.geometry, height, width, "--init-img is read at", "shrink the image" + (
        f", or read it at the model's --display-scale {model_scale}" if opt.display_scale < model_scale else ""))
    opt.reference = consistency_reference.reference_from_arguments(opt, parser, size=(height, width),
                                                                   strength=opt.strength)
    consistency_image.set_from_arguments(opt, parser, (height, width))
    opt.adapters = adapters.run_from_arguments(opt, parser, opt.n_samples, width, height,
                                               size_hint="crop or resize --init-img to match")
    check_subject_words_before_loading(parser, opt)
    check_sample_outdir(parser, opt)  # last: created only when the input is good
    return init_image


def main(argv=None, extra_metadata=None):
    configure_logging()
    parser = build_parser()
    with parser.checking():
        opt = validate_options(parser, parser.parse_args(argv))
        init_image = check_init_image(parser, opt)
        height, width = init_image.shape[2:]
        extra_metadata = feature_metadata(opt, extra_metadata)
        postprocess = build_postprocess(opt, height, width)
    model, device = load_model(opt)
    check_against_model(parser, opt, model)
    sampler = make_sampler(opt, model, SAMPLERS)
    # one schedule for the step-window check and the sampling
    sampler.make_schedule(ddim_num_steps=opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)
    check_step_windows(parser, opt, sampler, timesteps=sampler.ddim_timesteps[:encode_steps(opt)])
    results = generate(opt, model, sampler, device, postprocess, init_image)
    paths = save_outputs(opt, results, (height, width), extra_metadata, postprocess.png)
    logger.info(written_message(opt, paths))
    return paths


if __name__ == "__main__":
    interruptible(main)
