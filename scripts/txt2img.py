"""Text-to-image sampling with Stable Diffusion v1 (or any LatentDiffusion text config).

main() is split into build_parser / validate_options / load_model / generate / save_outputs so that
features can add their own flags, checks and PNG metadata (see ``extra_metadata``).
"""
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm.modules import adapters, consistency_image, consistency_reference
from ldm.outputs import build_postprocess, feature_metadata, save_results, written_message
from ldm.script_helpers import (SAMPLERS, SAMPLER_ALIASES, ArgumentParser, add_batch_arguments, add_common_arguments,
                                check_against_model, check_image_size, check_sample_outdir, check_step_windows,
                                check_subject_words_before_loading, configure_logging, consistency_from_arguments,
                                interruptible, latents_to_images, load_model, make_sampler, noised_batches,
                                precision_context, sampling_batch, validate_common, warn_if_far_above_model_size)

logger = logging.getLogger("txt2img")


def build_parser():
    parser = ArgumentParser(description="Generate images from text prompts.")
    add_common_arguments(parser, samplers=SAMPLERS, aliases=SAMPLER_ALIASES,
                         outdir="outputs/txt2img-samples", n_iter=2, n_samples=3, scale=7.5)
    parser.add_argument("--H", type=int, default=None,
                        help="image height, in pixel space (default: from the config's `sampling` block, else 512)")
    parser.add_argument("--W", type=int, default=None,
                        help="image width, in pixel space (default: from the config's `sampling` block, else 512)")
    parser.add_argument("--laion400m", action="store_true", help="uses the LAION400M model")
    add_batch_arguments(parser)
    return parser


def validate_options(parser, opt):
    """Check the parsed options; bad input ends with one ``error:`` line (parser.error)."""
    opt.consistency = consistency_from_arguments(parser, opt)
    if opt.laion400m:  # upstream's shortcut to its LAION-400M model; flags the user gave win
        logger.info("Falling back to LAION 400M model...")
        opt.config = opt.config or "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
        if not opt.random_weights:
            opt.ckpt = opt.ckpt or "models/ldm/text2img-large/model.ckpt"
        if opt.outdir == parser.get_default("outdir"):
            opt.outdir = "outputs/txt2img-samples-laion400m"
    validate_common(parser, opt, SAMPLERS, SAMPLER_ALIASES)
    if opt.ddim_steps == 1:  # upstream's steps are 1, 1 + T/n, ...: the only one is the last, nearly clean level
        logger.warning("--ddim_steps 1 takes its one step at timestep 1 of %d, where the start noise counts as an "
                       "almost finished image: the images are that noise; take 2 or more", opt.geometry.timesteps)
    check_image_size(parser, opt.H, opt.W, multiple=opt.geometry.multiple)
    warn_if_far_above_model_size(opt.geometry, opt.H, opt.W, "--H/--W give images of", "take a smaller --H/--W")
    opt.reference = consistency_reference.reference_from_arguments(opt, parser)  # needs opt.sampler
    consistency_image.set_from_arguments(opt, parser, (opt.H, opt.W))
    opt.adapters = adapters.run_from_arguments(opt, parser, opt.n_samples, opt.W, opt.H)
    check_sample_outdir(parser, opt)
    check_subject_words_before_loading(parser, opt)  # needs opt.reference
    return opt


def sample_batch(opt, model, sampler, prompts, x_T):
    """(len(prompts), 3, H, W) images in [0, 1] on the CPU."""
    with sampling_batch(opt, model, prompts, x_T) as (c, uc, x_T, known):
        latents, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(x_T),
                                    shape=[opt.C, opt.H // opt.f, opt.W // opt.f], verbose=False,
                                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                    eta=opt.ddim_eta, x_T=x_T, **known)
    return latents_to_images(model, latents[-len(prompts):])


def generate(opt, model, sampler, device, postprocess):
    """Yield (prompts, images) for every batch of every iteration."""
    with torch.no_grad(), precision_context(opt.precision, device), model.ema_scope():
        if opt.adapters is not None:
            opt.adapters.prepare(model, device)  # features once per image, not per step
        latent_shape = (opt.n_samples, opt.C, opt.H // opt.f, opt.W // opt.f)
        for prompts, x_T in noised_batches(opt, latent_shape, device):
            yield prompts, postprocess.batch(sample_batch(opt, model, sampler, prompts, x_T))


def save_outputs(opt, results, extra_metadata=None, mark=None):
    """Save samples (unless --skip_save) and a grid (unless --skip_grid); returns the paths."""
    return save_results(opt, results, height=opt.H, width=opt.W, extra_metadata=extra_metadata, mark=mark)


def main(argv=None, extra_metadata=None):
    configure_logging()
    parser = build_parser()
    with parser.checking():
        opt = validate_options(parser, parser.parse_args(argv))
        extra_metadata = feature_metadata(opt, extra_metadata)
        postprocess = build_postprocess(opt, opt.H, opt.W)
    model, device = load_model(opt)
    check_against_model(parser, opt, model)
    sampler = make_sampler(opt, model, SAMPLERS)
    check_step_windows(parser, opt, sampler)
    paths = save_outputs(opt, generate(opt, model, sampler, device, postprocess), extra_metadata, postprocess.png)
    logger.info(written_message(opt, paths))
    return paths


if __name__ == "__main__":
    interruptible(main)
