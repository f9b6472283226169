"""Train a T2I-Adapter for a frozen text-to-image model on the procedural scenes' layout maps.

    # on a GPU, for the embedded model (models/embedded/README.md; about 330k adapter weights)
    python3 scripts/train_adapter.py --ckpt models/embedded/procedural-t2i.safetensors \
        --out models/embedded/procedural-outline-adapter.safetensors --steps 2000 --batch-size 256
    # a CPU smoke run (random model, numbers meaningless)
    python3 scripts/train_adapter.py --random-weights --out /tmp/a.safetensors --steps 3 --batch-size 4 \
        --num-workers 0

What it does (ldm/modules/adapter_training.py has the pieces and the reasons):

* the model from --config/--ckpt is frozen (eval mode, no gradients; EMA weights when the
  checkpoint has them, as sampling uses), only the adapter learns;
* the adapter is sized from the model: one stage per UNet level with the level's width and
  PixelUnshuffle(f) with the first stage's f (1 for the pixel-space embedded model), its
  outputs zero-initialised so training starts from the unchanged model;
* data: ldm.data.procedural.ProceduralScenes with a layout condition rendered from the same
  scene (--condition outline: the object's outline, white on black = --cond-type sketch; or
  mask: the filled silhouette), the base model's caption distribution (10% empty captions);
* loss: the model's denoising MSE with the adapter's features added, cubic timestep sampling
  t = (1 - u^3) T (T2I-Adapter sec. 3.4); AdamW, constant LR after a linear warm-up; bf16
  autocast on CUDA; optional EMA of the adapter (--ema-decay, saved instead of the raw weights);
* writes OUT (.safetensors, released key layout + the unshuffle factor in the header, so
  `scripts/txt2img.py --adapter OUT --cond-type sketch` loads it) and OUT with .json: settings,
  loss curve, and the held-out loss with and without the adapter (same images, noise, t).

Why a script and not a main.py config: main.py trains a LatentDiffusion LightningModule, and
making it train a second, external network while freezing its own would need a new module
class, EMA and checkpoint handling, and an export step to get the released key layout. The
adapter loop is a few dozen lines, runs the exact sampling-time injection, and writes the
final file directly.
"""
import json
import logging
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.data.procedural import CONDITION_KINDS, KINDS, ProceduralScenes  # noqa: E402
from ldm.model_choice import config_of_weights, in_repo, read_model_geometry, resolve_weights  # noqa: E402
from ldm.modules.adapter_training import (TIMESTEP_SAMPLING, AdapterEMA, diffusion_loss,  # noqa: E402
                                          encode_batch, sample_timesteps)
from ldm.modules.adapters import adapter_for_model, save_adapter  # noqa: E402
from ldm.script_helpers import (ArgumentParser, add_device_argument, add_threads_argument, build_model,  # noqa: E402
                                check_new_file, check_seed, configure_logging, resolve_device, set_cpu_threads)
from ldm.util import first_line  # noqa: E402

logger = logging.getLogger("train_adapter")

DEFAULT_CONFIG = "configs/embedded/procedural-t2i.yaml"
TRAIN_SEED, EVAL_SEED = 2, 1  # data seeds: 0 trained the base model, 1 is its validation split
EVAL_BATCH = 256  # held-out scenes per forward pass
COND_TYPE = "sketch"  # how txt2img reads both maps: 1 channel, binarised at 0.5


def build_parser():
    parser = ArgumentParser(description="Train a T2I-Adapter for a frozen text-to-image model on the "
                                                 "procedural scenes' outline or mask maps.")
    add = parser.add_argument
    add("--config", type=in_repo, help="model config (default: the one --ckpt's weights come with, a shipped "
        f"model's or a main.py run's; else the embedded procedural model's, {DEFAULT_CONFIG})")
    add("--ckpt", type=in_repo, help="the trained model's weights (.safetensors or .ckpt; default: those the "
                                     "config's sampling block names)")
    add("--random-weights", action="store_true", help="no checkpoint: a random model (CPU smoke runs only)")
    add("--out", required=True, help="adapter file to write (.safetensors); OUT with .json gets the report")
    add("--condition", choices=CONDITION_KINDS, default="outline",
        help="layout map: outline (object outline, white on black) or mask (filled silhouette)")
    add("--kinds", nargs="+", default=list(KINDS), choices=("face", "chair", "table", "shape"),
        help="scene kinds (default: those the embedded model was trained on)")
    add("--steps", type=int, default=2000, help="optimiser steps")
    add("--batch-size", type=int, default=256, help="scenes per step")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate after warm-up")
    add("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (0 or more)")
    add("--warmup-steps", type=int, default=100, help="linear LR warm-up")
    add("--timesteps", choices=TIMESTEP_SAMPLING, default="cubic",
        help="cubic: t = (1 - u^3) T, biased to the noisy steps where the layout forms (T2I-Adapter); "
             "uniform: as the base model was trained")
    add("--ema-decay", type=float, default=0.999, help="EMA of the adapter weights, saved instead of the raw "
                                                       "ones; 0 = no EMA. With LitEma's warm-up the decay of update n "
                                                       "is at most (1 + n) / (10 + n): 0.9955 at step 2000")
    add("--num-res-blocks", type=int, default=2, help="residual blocks per adapter stage (released: 2)")
    add("--no-zero-init", action="store_true", help="start from random adapter outputs instead of zeros")
    add("--eval-size", type=int, default=256, help="held-out scenes for the with/without-adapter loss")
    add("--num-workers", type=int, default=8, help="data loader processes (0: render in the main process)")
    add("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on CUDA")
    add_device_argument(parser)
    add_threads_argument(parser)
    add("--max-minutes", type=float, default=0, help="stop training after this long and save (0 = no limit)")
    add("--log-every", type=int, default=50, help="log and record the mean loss every this many steps")
    add("--seed", type=int, default=0, help="seed of the adapter's first weights and of the training timesteps "
                                             "and noise (the scenes have seeds of their own)")
    return parser


def sidecar(path):
    return os.path.splitext(path)[0] + ".json"


def validate(parser, opt):
    """Bad input ends in one parser.error line, before anything is built."""
    if opt.config is None:
        opt.config = config_of_weights(opt.ckpt) or in_repo(DEFAULT_CONFIG)
    if not os.path.isfile(opt.config):
        parser.error(f"config not found: {opt.config}")
    check_captioned_model(parser, opt.config)
    resolve_weights(parser, opt, read_model_geometry(parser, "--config", opt.config))
    if not opt.out.endswith(".safetensors"):
        parser.error(f"--out must end in .safetensors (got {opt.out})")
    for path in (opt.out, sidecar(opt.out)):
        if os.path.exists(path):
            parser.error(f"{path} exists; choose a new --out (adapters are never overwritten)")
    for flag, value, low in (("--steps", opt.steps, 1), ("--batch-size", opt.batch_size, 1),
                             ("--eval-size", opt.eval_size, 1), ("--log-every", opt.log_every, 1),
                             ("--num-res-blocks", opt.num_res_blocks, 1), ("--warmup-steps", opt.warmup_steps, 0),
                             ("--num-workers", opt.num_workers, 0)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    if not 0 < opt.lr < math.inf:  # inf trained on to an adapter of NaNs, saved, and black images from it
        parser.error(f"--lr must be a positive finite number, got {opt.lr}")
    if not 0 <= opt.weight_decay < math.inf:
        parser.error(f"--weight-decay must be a finite number, 0 or more, got {opt.weight_decay}")
    check_seed(parser, "--seed", opt.seed)
    if not opt.max_minutes >= 0:
        parser.error(f"--max-minutes must be positive, or 0 for no limit, got {opt.max_minutes}")
    if not 0 <= opt.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {opt.ema_decay}")
    if opt.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available (use --device cpu)")
    if opt.precision == "bf16" and resolve_device(opt.device).type == "cpu":  # --device auto included
        parser.error("--precision bf16 is for CUDA; use fp32 on the CPU")
    # last, as it creates the folder: the adapter is saved after training, so a place it cannot go
    # must fail now
    check_new_file(parser, "--out", opt.out)


def check_captioned_model(parser, path):
    """The config must describe a text-to-image model trained on captions, like the procedural scenes'."""
    from omegaconf import OmegaConf
    try:
        key = OmegaConf.load(path).model.params.get("cond_stage_key")
    except Exception as e:  # unreadable, binary, not YAML, no model keys: the fix is another --config
        parser.error(f"--config {path} is not a model config ({first_line(e)}); pass one such as {DEFAULT_CONFIG}")
    if key != "caption":
        parser.error(f"{path} is not a text-to-image model with captions (cond_stage_key: caption); the adapter "
                     f"is trained on captioned procedural scenes (e.g. --config {DEFAULT_CONFIG})")


# --- model and data -------------------------------------------------------------------------

def load_frozen_model(opt, device):
    torch.manual_seed(opt.seed)
    model = build_model(opt.config, opt.ckpt, device, random_weights=opt.random_weights)
    if not hasattr(model, "get_learned_conditioning") or getattr(model, "cond_stage_key", None) != "caption":
        raise SystemExit(f"error: {opt.config} is not a text-to-image model with captions "
                         f"(cond_stage_key: caption); the adapter is trained on captioned procedural scenes")
    if getattr(model, "use_ema", False):
        # train against the weights sampling uses: a training checkpoint's EMA copy goes into the
        # UNet (and text encoder, where the training averaged it) once (LitEma can only swap while the
        # weights still require gradients, so before freezing)
        model.model_ema.copy_to(model.ema_tracked())
        model.use_ema = False
    return model.eval().requires_grad_(False)


def pixel_size(model):
    """Side of the generated images: the UNet's input size times the first stage's f."""
    from ldm.modules.adapters import first_stage_factor
    return model.image_size * first_stage_factor(model)


def make_loader(opt, size, device, *, seed, length, batch_size, workers, drop_last=True):
    data = ProceduralScenes(size=size, length=length, seed=seed, kinds=opt.kinds, condition=opt.condition)
    # every index is a new random scene, so reading in order is already a random stream
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=drop_last,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)


def autocast(opt, device):
    precision = opt.precision if opt.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), precision


# --- training -------------------------------------------------------------------------------

def new_adapter(model, opt, device):
    torch.manual_seed(opt.seed)
    adapter = adapter_for_model(model, cond_channels=1, num_res_blocks=opt.num_res_blocks)
    if not opt.no_zero_init:
        adapter.zero_init_()
    return adapter.to(device).train()


def lr_at(step, opt):
    return opt.lr * min(1.0, (step + 1) / opt.warmup_steps) if opt.warmup_steps else opt.lr


def fit(model, opt, device):
    """Train a new adapter for the frozen `model`; returns (adapter to save, report dict)."""
    adapter = new_adapter(model, opt, device)
    ema = AdapterEMA(adapter, opt.ema_decay) if opt.ema_decay > 0 else None
    amp, precision = autocast(opt, device)
    start = time.perf_counter()
    curve, steps = train_steps(model, adapter, ema, opt, device, amp, start)
    seconds = time.perf_counter() - start
    final = ema.shadow if ema is not None else adapter.eval()
    report = {"steps": steps, "steps_requested": opt.steps, "batch_size": opt.batch_size,
              "seconds": round(seconds, 1), "loss_curve": curve, "final_loss": curve[-1]["loss"],
              "held_out": evaluate(model, final, opt, device, amp), "precision": precision, "device": str(device),
              "ema_decay_reached": round(ema.current_decay, 6) if ema is not None else None}
    return final, report


def train_steps(model, adapter, ema, opt, device, amp, start):
    """The optimisation loop; returns (loss curve, steps done)."""
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    loader = make_loader(opt, pixel_size(model), device, seed=TRAIN_SEED, length=opt.steps * opt.batch_size,
                         batch_size=opt.batch_size, workers=opt.num_workers)
    generator = torch.Generator(device).manual_seed(opt.seed)
    deadline = start + 60 * opt.max_minutes if opt.max_minutes > 0 else math.inf
    curve, window, step = [], [], 0
    for step, batch in enumerate(loader, start=1):
        x0, context, cond = encode_batch(model, batch, device)
        t = sample_timesteps(len(x0), model.num_timesteps, opt.timesteps, device, generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, opt)
        with amp:
            loss = diffusion_loss(model, adapter, x0, context, cond, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(adapter)
        window.append(loss.detach())
        if step % opt.log_every == 0:
            curve.append(log_window(step, opt.steps, window, start))
            window = []
        if time.perf_counter() > deadline:
            logger.warning("--max-minutes %g reached after %d of %d steps; saving what there is",
                           opt.max_minutes, step, opt.steps)
            break
    if window:
        curve.append(log_window(step, opt.steps, window, start))
    return curve, step


def log_window(step, steps, window, start):
    loss = float(torch.stack(window).mean())  # one host sync per window, not per step
    elapsed = time.perf_counter() - start
    logger.info("step %d/%d  loss %.5f  (%.1f s, %.2f steps/s)", step, steps, loss, elapsed, step / elapsed)
    return {"step": step, "loss": round(loss, 6)}


@torch.no_grad()
def evaluate(model, adapter, opt, device, amp):
    """Held-out denoising loss with and without the adapter on the same scenes, noise and
    (cubic) timesteps: how much the condition tells the frozen model about the image."""
    size = min(opt.eval_size, EVAL_BATCH)
    loader = make_loader(opt, pixel_size(model), device, seed=EVAL_SEED, length=opt.eval_size, batch_size=size,
                         workers=0, drop_last=False)  # all --eval-size scenes
    generator = torch.Generator(device).manual_seed(12345)
    totals = {"loss_with_adapter": 0.0, "loss_without_adapter": 0.0}
    scenes = 0
    for batch in loader:
        x0, context, cond = encode_batch(model, batch, device)
        t = sample_timesteps(len(x0), model.num_timesteps, opt.timesteps, device, generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        with amp:  # batch means, weighted by the batch's size: the last batch may be smaller
            totals["loss_with_adapter"] += len(x0) * float(diffusion_loss(model, adapter, x0, context, cond, t, noise))
            totals["loss_without_adapter"] += len(x0) * float(diffusion_loss(model, None, x0, context, cond, t, noise))
        scenes += len(x0)
    result = {k: round(v / scenes, 6) for k, v in totals.items()}
    logger.info("held-out loss (%d scenes, %s t): with adapter %.5f, without %.5f", scenes, opt.timesteps,
                result["loss_with_adapter"], result["loss_without_adapter"])
    return result


# --- output ---------------------------------------------------------------------------------

def settings(opt, adapter):
    return {"config": opt.config, "ckpt": opt.ckpt or "random weights", "condition": opt.condition,
            "cond_type": COND_TYPE, "kinds": list(opt.kinds), "lr": opt.lr, "weight_decay": opt.weight_decay,
            "warmup_steps": opt.warmup_steps, "timesteps": opt.timesteps, "ema_decay": opt.ema_decay,
            "zero_init": not opt.no_zero_init, "seed": opt.seed, "data_seed": TRAIN_SEED,
            "adapter": {"channels": list(adapter.channels), "cond_channels": adapter.cond_channels,
                        "num_res_blocks": adapter.num_res_blocks, "unshuffle": adapter.factor,
                        "parameters": sum(p.numel() for p in adapter.parameters())}}


def write_outputs(opt, adapter, report):
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    save_adapter(adapter, opt.out, {"condition": opt.condition, "cond_type": COND_TYPE, "steps": report["steps"]})
    with open(sidecar(opt.out), "x") as f:
        json.dump({**report, **settings(opt, adapter)}, f, indent=1)
    logger.info("wrote %s and %s", opt.out, sidecar(opt.out))


def main(argv=None):
    configure_logging()
    parser = build_parser()
    opt = parser.parse_args(argv)
    validate(parser, opt)
    device = resolve_device(opt.device)
    set_cpu_threads(opt.threads, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_frozen_model(opt, device)
    logger.info("training an adapter on %s maps for %s on %s: %d steps at batch %d", opt.condition, opt.config, device,
                opt.steps, opt.batch_size)
    adapter, report = fit(model, opt, device)
    try:
        write_outputs(opt, adapter, report)
    except OSError as e:  # checked writable before training; a disk that filled meanwhile is one line, not a traceback
        parser.exit(1, f"{parser.prog}: error: cannot write {opt.out} ({first_line(e)}); free the space or pass "
                       f"another --out and train again\n")
    return report


if __name__ == "__main__":
    main()
