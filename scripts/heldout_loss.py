"""Held-out denoising loss of several weight files of one model, paired: every file sees the same
scenes, timesteps and noise, so their differences are measured, not two noisy estimates.

    python3 scripts/heldout_loss.py --config configs/embedded/procedural-t2i-16px.yaml \
      --ckpt before.safetensors after.safetensors

The training log's `val/loss_simple_ema` is one batch of 64 scenes and moved between 0.014 and
0.023 during the 16 px model's cool-down run; this reads --n scenes (default 1024) of the
config's `data.params.validation` dataset and prints one row per file: the mean squared error of
the model's prediction (the noise, or x0 for an x0-parameterised model) ± its standard error,
and its difference to the first file ± the standard error of the paired differences.
"""
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.model_choice import check_checkpoint_type, config_of_weights, in_repo, load_config  # noqa: E402
from ldm.script_helpers import (ArgumentParser, add_threads_argument, build_model, check_seed,  # noqa: E402
                                configure_logging, positive_int, set_cpu_threads)
from ldm.util import ModelError  # noqa: E402

logger = logging.getLogger("heldout_loss")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=in_repo,
                        help="model config with a data.params.validation dataset (default: the one the first "
                             "--ckpt's weights come with, a shipped model's or a main.py run's)")
    parser.add_argument("--ckpt", required=True, nargs="+", type=in_repo,
                        help="weight files (.safetensors or .ckpt) to compare")
    parser.add_argument("--n", type=positive_int, default=1024, help="validation scenes")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="scenes per model call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timesteps and noise")
    add_threads_argument(parser)
    opt = parser.parse_args(argv)
    check_seed(parser, "--seed", opt.seed)  # as every script; 2**64 was a traceback after a model was built
    for path in opt.ckpt:
        if not os.path.isfile(path):
            parser.error(f"--ckpt {path}: no such file")
        check_checkpoint_type(parser, "--ckpt", path)  # all before the first is scored
    opt.config = opt.config or config_of_weights(opt.ckpt[0])
    if opt.config is None:
        parser.error(f"--config: the weights {opt.ckpt[0]} do not say which model they are (no shipped model's, "
                     "no main.py run's); pass --config CONFIG.yaml")
    return opt


def validation_batches(config, n, batch_size):
    """[(images (B, C, H, W) in [-1, 1], captions)] of the first n validation items."""
    from omegaconf import OmegaConf

    from ldm.util import ConfigError, first_line, instantiate_from_config
    spec = OmegaConf.select(config, "data.params.validation")
    if spec is None:
        raise SystemExit("error: the config has no data.params.validation dataset to measure on; use a "
                         "training config such as configs/embedded/procedural-t2i-16px.yaml")
    spec = OmegaConf.merge(spec, {"params": {"length": n}})
    try:
        data = instantiate_from_config(spec)
    except (ConfigError, ImportError, OSError) as e:  # e.g. LSUN's: it takes no length, reads files
        raise SystemExit(f"error: the config's validation dataset ({spec.target}) cannot give {n} scenes here: "
                         f"{first_line(e)}; use a config with procedural data, such as "
                         "configs/embedded/procedural-t2i-16px.yaml")
    batches = []
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([torch.as_tensor(item["image"]) for item in items]).permute(0, 3, 1, 2)
        batches.append((images.float(), [item["caption"] for item in items]))
    return batches


@torch.no_grad()
def losses_of(model, batches, timesteps, noises):
    """(n,) per-item loss of `model` on the batches, with the given timesteps and noise per batch."""
    out = []
    for (images, captions), t, noise in zip(batches, timesteps, noises):
        x = model.get_first_stage_encoding(model.encode_first_stage(images))
        prediction = model.apply_model(model.q_sample(x, t, noise), t, model.get_learned_conditioning(captions))
        target = noise if model.parameterization == "eps" else x
        out.append(((prediction - target) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(out)


def mean_se(values):
    return values.mean().item(), (values.std() / len(values) ** 0.5).item() if len(values) > 1 else float("nan")


def main(argv=None):
    configure_logging()
    opt = parse_args(argv)
    set_cpu_threads(opt.threads, torch.device("cpu"))
    config = load_config(opt.config)
    batches = validation_batches(config, opt.n, opt.batch_size)
    rows, first = [], None
    for path in opt.ckpt:
        try:
            model = build_model(opt.config, path)
        except ModelError as e:
            raise SystemExit(f"error: --ckpt {path}: {e}")
        if first is None:  # drawn once, in the model's latent shape, for every file
            generator = torch.Generator().manual_seed(opt.seed)
            shapes = [(len(captions), model.channels, model.image_size, model.image_size) for _, captions in batches]
            timesteps = [torch.randint(0, model.num_timesteps, (s[0],), generator=generator) for s in shapes]
            noises = [torch.randn(s, generator=generator) for s in shapes]
        # a KL first stage samples its latents from the global generator: the same draws for every file
        torch.manual_seed(opt.seed)
        with model.ema_scope():  # the weights txt2img samples with: a .ckpt's EMA copy, where it has one
            losses = losses_of(model, batches, timesteps, noises)
        first = losses if first is None else first
        rows.append((path, mean_se(losses), mean_se(losses - first)))
    print(f"{opt.n} validation scenes of {opt.config}, timesteps and noise from seed {opt.seed}\n")
    print("| weights | loss | − first (paired) |\n|---|---|---|")
    for path, (loss, loss_se), (diff, diff_se) in rows:
        print(f"| {path} | {loss:.5f} ± {loss_se:.5f} | {diff:+.5f} ± {diff_se:.5f} |")


if __name__ == "__main__":
    main()
