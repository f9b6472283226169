"""Pieces shared by scripts/txt2img.py and scripts/img2img.py.

Command-line options common to both, their validation (one ``error: ...`` line, no
traceback), device/precision selection, model loading, seeding, the optional safety checker
and invisible watermark, and the writer that numbers and saves the PNGs with their metadata.
"""
import argparse
import atexit
import glob
import logging
import math
import os
import re
import signal
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Callable, NamedTuple

import torch

from ldm import diffusers_folder
from ldm.hub import pretrained_source
from ldm.image_io import make_grid, next_free_index, save_png, to_pil, upscale
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import DEFAULT_TIMESTEPS

logger = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as one line, `prog: error: what is wrong and how to fix it`. Plain
    argparse prints its usage block first, which for txt2img is some twenty lines of options
    burying the one that says what went wrong; --help still prints it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    @staticmethod
    @contextmanager
    def checking():
        """Hold what is logged while the input is checked until every check has passed: bad input
        then ends with its one error line alone, not after warnings (which model would run, what a
        flag will not do) about a run that is not going to happen."""
        root = logging.getLogger()
        held, handlers = [], root.handlers
        hold = logging.Handler()
        hold.emit = held.append
        root.handlers = [hold]
        try:
            yield
        except SystemExit:
            held.clear()  # the error line (parser.error) stands alone
            raise
        finally:
            root.handlers = handlers
            for record in held:
                root.handle(record)


# name -> sampler class; --sampler's choices come from here.
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}

# Upstream's boolean sampler flags, kept as aliases of --sampler NAME.
SAMPLER_ALIASES = {"plms": "plms", "dpm_solver": "dpm"}

# The models a command without --config/--ckpt may run, first match wins: upstream's SD v1 path
# (so upstream users' commands keep working), then the small model this fork ships, then its
# preliminary CPU-trained stand-in, whose weights are in every clone: a new user's first command
# runs a trained model (and says which) instead of stopping for want of weights.
SD_V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
EMBEDDED_CONFIG = "configs/embedded/procedural-t2i.yaml"
PRELIMINARY_CONFIG = "configs/embedded/procedural-t2i-16px.yaml"
DEFAULT_CONFIGS = (SD_V1_CONFIG, EMBEDDED_CONFIG, PRELIMINARY_CONFIG)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
DEFAULT_STEPS = 50  # upstream's --ddim_steps; a config's `sampling: steps:` overrides it


def configure_logging(level=logging.INFO):
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def add_common_arguments(parser, *, samplers, aliases, outdir, n_iter, n_samples, scale):
    """Options both scripts share; per-script defaults are passed in."""
    add = parser.add_argument
    # "append" with default None (not a list default, which argparse would append to)
    add("--prompt", type=str, action="append", default=None,
        help=f"the prompt to render (default: {DEFAULT_PROMPT!r}); repeat it to give each image of the "
             "batch its own prompt, one per image (then --n_samples must equal the number of prompts)")
    add("--outdir", type=str, nargs="?", default=outdir, help="dir to write results to")
    add("--skip_grid", action="store_true",
        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples")
    add("--skip_save", action="store_true", help="do not save individual samples. For speed measurements.")
    add("--ddim_steps", "--steps", type=int, default=None, metavar="N",
        help="number of sampling steps, for every --sampler (--steps: the same, named as in inpaint.py and the "
             f"benchmarks; default: from the config's `sampling` block, else {DEFAULT_STEPS})")
    add("--sampler", choices=sorted(samplers), default=None, help="sampling method (default: ddim)")
    for flag, name in aliases.items():
        add(f"--{flag}", action="store_true",
            help=f"same as --sampler {name} (upstream flag)" if name in samplers
            else f"upstream flag; {name} is not available in this script (refused with an error)")
    add("--fixed_code", action="store_true", help="if enabled, uses the same starting code across samples")
    add("--ddim_eta", type=float, default=None,
        help="ddim eta: 0 = deterministic, 1 = DDPM-like, fresh noise at every step (default: from the "
             "config's `sampling` block, else 0)")
    add("--n_iter", type=int, default=n_iter, help="sample this often")
    add("--C", type=int, default=None, help="latent channels (default: read from --config)")
    add("--f", type=int, default=None, help="first-stage downsampling factor (default: read from --config)")
    add("--n_samples", type=int, default=n_samples,
        help="how many samples to produce for each given prompt. A.k.a. batch size")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=None,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty)) "
             f"(default: from the config's `sampling` block, else {scale})")
    parser.set_defaults(default_scale=scale)  # this script's, for models whose config names none
    add("--negative-prompt", default="", metavar="TEXT",
        help="what guidance steers away from: the unconditional half of classifier-free guidance reads "
             "this prompt instead of the empty one (needs --scale other than 1)")
    add("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    add("--config", type=str, default=None,
        help=f"path to config which constructs model (default: the first of {', '.join(DEFAULT_CONFIGS)} "
             "whose weights are in place; with --ckpt, the one that names that file, else SD v1's)")
    add("--ckpt", type=str, default=None,
        help="path to checkpoint of model, .safetensors or .ckpt, or a diffusers pipeline folder (default: "
             "the weights named in the config's `sampling` block, e.g. models/ldm/stable-diffusion-v1/model.ckpt "
             "for SD v1)")
    add("--vae", default=None, metavar="PATH",
        help="autoencoder weights to use instead of the checkpoint's, as SD users swap in a fine-tuned VAE "
             "(e.g. vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers AutoencoderKL folder)")
    add("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    add("--precision", type=str, choices=["full", "autocast"], default="autocast",
        help="autocast: float16 autocast on CUDA (CPU always runs float32)")
    add_device_argument(parser)
    add_threads_argument(parser)
    add("--unsafe-pickle", action="store_true",
        help="allow full unpickling of a TRUSTED .ckpt (can run arbitrary code)")
    add("--random-weights", action="store_true",
        help="build the model from --config with random weights, no checkpoint (for testing)")
    add("--safety-checker", nargs="?", const="", default=None, metavar="FOLDER",
        help="run the Stable Diffusion safety checker (needs diffusers and its weights): from FOLDER (a "
             "diffusers SD pipeline, which holds safety_checker/ and feature_extractor/, or the checker's own "
             f"folder), else from --ckpt where that is a pipeline folder, else {SAFETY_MODEL_ID} from the "
             "Hugging Face cache or hub")
    add("--watermark", action="store_true",
        help="embed an invisible watermark (needs invisible-watermark and opencv-python-headless)")
    add("--display-scale", type=int, default=None, metavar="K",
        help="nearest-neighbour upscale saved PNGs by K, for the tiny images small models make; img2img "
             "reads --init-img shrunk by K, so those PNGs go back in at the model's size (default: from the "
             "config's `sampling` block, else 1)")


def add_device_argument(parser):
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")


def add_threads_argument(parser):
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="PyTorch CPU threads for CPU runs (default: PyTorch's, one per core); on a machine "
                             "other jobs keep busy, fewer threads than cores can be several times faster")


def positive_int(text):
    """argparse type: an int >= 1 (argparse reports anything else as one error line)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def validate_common(parser, opt, samplers, aliases):
    """Check the shared options; resolves opt.sampler. Exits via parser.error on bad input."""
    resolve_sampler(parser, opt, samplers, aliases)
    for flag, value in (("--n_samples", opt.n_samples), ("--n_iter", opt.n_iter),
                        ("--ddim_steps", opt.ddim_steps), ("--C", opt.C), ("--f", opt.f),
                        ("--display-scale", opt.display_scale)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    sampler = samplers[opt.sampler]
    if opt.ddim_eta is not None and opt.ddim_eta != 0 and not sampler.stochastic:
        parser.error(f"--ddim_eta applies to the ddim sampler; --sampler {opt.sampler} is deterministic "
                     f"(leave --ddim_eta out)")
    if opt.ddim_eta is not None and not 0 <= opt.ddim_eta <= 1:
        parser.error(f"--ddim_eta must be between 0 (deterministic) and 1 (DDPM-like), got {opt.ddim_eta}")
    if not 0 <= opt.seed < 2**32:  # numpy's and upstream's (pytorch_lightning's) seed range
        parser.error(f"--seed must be between 0 and {2**32 - 1}, got {opt.seed}")
    if opt.n_rows < 0:
        parser.error(f"--n_rows must be 0 (= n_samples) or positive, got {opt.n_rows}")
    if opt.n_rows and opt.skip_grid:  # upstream's combination, so a warning, not an error
        logger.warning("--n_rows %d lays out the grid, which --skip_grid leaves out: it has no effect", opt.n_rows)
    resolve_model(parser, opt)
    if opt.ddim_eta is None:  # a config's eta is for the sampler that draws step noise; the others have none
        opt.ddim_eta = opt.geometry.eta if sampler.stochastic else 0.0
        if opt.geometry.eta > 0 and not sampler.stochastic:
            # a model that needs eta > 0 leaves pixel noise on a deterministic path (the 16 px model:
            # pixel noise 0.04-0.14 with plms or dpm, 0.01 with its ddim eta 1; CONSISTENCY_NOTES.md)
            logger.warning("this model's config samples with ddim eta %g: --sampler %s draws no step noise and "
                           "can leave its images speckled (--sampler ddim samples it as intended)",
                           opt.geometry.eta, opt.sampler)
    if not math.isfinite(opt.scale):
        parser.error(f"--scale must be a finite number, got {opt.scale}")
    if opt.negative_prompt and opt.scale == 1.0:
        parser.error("--negative-prompt needs classifier-free guidance, which --scale 1 turns off (the "
                     "unconditional pass it replaces does not run): pass --scale above 1 or leave it out")
    if getattr(opt, "share_cfg", None) == "cond" and opt.scale == 1.0:
        parser.error("--share-cfg cond keeps the unconditional half of classifier-free guidance plain, and --scale 1 "
                     "runs no unconditional half (every image shares): pass --scale above 1 or leave it out")
    if opt.ddim_steps < sampler.min_steps:
        parser.error(f"--sampler {opt.sampler} needs --ddim_steps {sampler.min_steps} or more, got {opt.ddim_steps}")
    if opt.ddim_steps >= opt.geometry.timesteps:
        parser.error(f"--ddim_steps must be below the model's {opt.geometry.timesteps} training timesteps, "
                     f"got {opt.ddim_steps}")
    opt.prompts = read_prompts(parser, opt)
    warn_unseen_words(opt.geometry, opt.config, opt.prompts + [getattr(opt, "negative_prompt", "") or ""])
    batches = prompt_batches(opt)
    from ldm.modules.consistency import check_anchor_images
    check_anchor_images(parser, opt.consistency, len(batches[0]))  # --from-file: maybe fewer than n_samples
    from ldm.modules.consistency_reference import run_anchors  # it imports this module
    opt.run_anchors = run_anchors(opt.consistency, opt.n_iter * len(batches))
    if opt.consistency is not None and opt.n_iter * len(batches) == 1 == len(batches[0]) + len(
            getattr(opt, "reference_image", None) or ()):  # --from-file with one prompt and --n_samples 1
        logger.warning("--consistent-attn: this run is a single image, nothing to share; sampling normally")
        opt.consistency = None
    if opt.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available (use --device cpu)")
    if opt.safety_checker and not os.path.isdir(opt.safety_checker):
        parser.error(f"--safety-checker {opt.safety_checker}: no such folder (give a diffusers SD pipeline folder "
                     "or the safety checker's own, or no FOLDER for the hub's)")


def read_prompts(parser, opt):
    """Every image's prompt, in order: one --prompt repeated for the batch, several --prompt (one
    per image, so exactly n_samples of them), or the non-empty lines of --from-file."""
    if opt.prompt and opt.from_file:  # upstream read the file and dropped --prompt without a word
        parser.error("--prompt and --from-file both give the prompts: choose one source of prompts")
    prompts = opt.prompt or [DEFAULT_PROMPT]
    if len(prompts) > 1:
        if opt.n_samples != len(prompts):
            parser.error(f"{len(prompts)} prompts given (one per image of the batch) but --n_samples is "
                         f"{opt.n_samples}: pass --n_samples {len(prompts)}")
    if not opt.from_file:
        return list(prompts) if len(prompts) > 1 else opt.n_samples * prompts
    path = opt.from_file
    if not os.path.isfile(path):
        parser.error(f"--from-file {path}: {'a folder' if os.path.isdir(path) else 'not found'}; "
                     "pass a text file with one prompt per line")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: without the byte-order mark Notepad writes
            lines = [line for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError:
        parser.error(f"--from-file {path} is not UTF-8 text; pass a text file with one prompt per line")
    if not lines:
        parser.error(f"--from-file {path} has no prompts; pass a text file with one prompt per line")
    logger.info("read %d prompts from %s", len(lines), path)
    return lines


def warn_unseen_words(geometry, config_path, texts, shown=8):
    """One warning naming the words of `texts` (prompts, negative prompt) that the model's training
    captions never held, for a model whose config can list them (ModelGeometry.vocabulary): the
    README's SD prompts run on the embedded models, which know a few dozen words, and would
    otherwise draw a plain chair or face with no sign of why."""
    known = geometry.vocabulary
    if known is None:
        return
    unseen = [word for word in dict.fromkeys(re.findall(r"\w+", " ".join(texts).lower())) if word not in known]
    if unseen:
        more = f" and {len(unseen) - shown} more" if len(unseen) > shown else ""
        logger.warning("this model's text encoder learnt nothing for the prompt word(s) %s%s: it knows only the %d "
                       "words of its training captions (the `data` of %s)",
                       ", ".join(map(repr, unseen[:shown])), more, len(known), config_path)


def resolve_sampler(parser, opt, samplers, aliases):
    """Fold upstream's --plms/--dpm_solver into opt.sampler; contradictions are errors."""
    requested = [name for flag, name in aliases.items() if getattr(opt, flag)]
    if len(requested) > 1:
        parser.error("choose one sampler: " + " and ".join(f"--{f}" for f in aliases if getattr(opt, f))
                     + " contradict each other")
    if requested:
        if opt.sampler is not None and opt.sampler != requested[0]:
            flag = next(f for f, n in aliases.items() if n == requested[0])
            parser.error(f"--{flag} contradicts --sampler {opt.sampler}")
        opt.sampler = requested[0]
    opt.sampler = opt.sampler or "ddim"
    if opt.sampler not in samplers:
        parser.error(f"sampler '{opt.sampler}' is not supported here (choose from {', '.join(sorted(samplers))})")


# --- which model, at which size -----------------------------------------------------------

@dataclass(frozen=True)
class ModelGeometry:
    """What sampling needs to know about a config before any weights are loaded.

    channels/factor are read from the model definition itself (the latent channels, the first
    stage's downsampling), so --C/--f cannot disagree with the model; the default size, display
    scale, guidance scale, steps, DDIM eta and weights come from the config's optional
    ``sampling`` block."""
    channels: int
    factor: int
    unet_factor: int
    height: int = 512
    width: int = 512
    display_scale: int = 1
    weights: str | None = None
    scale: float | None = None  # guidance scale (None: the script's default)
    steps: int = DEFAULT_STEPS  # sampling steps; a small pixel-space model needs fewer than SD
    eta: float = 0.0  # DDIM eta; a small model can leave noise on the deterministic path (eta 0)
    timesteps: int = DEFAULT_TIMESTEPS  # of the training noise schedule; samplers take fewer steps than this
    not_text: str | None = None  # what the model is when not text-conditioned, e.g. "an unconditional model"
    vocabulary: frozenset[str] | None = None  # every word of its training captions, where its config can list them

    def __post_init__(self):
        # eta > 1 asks DDIM for more fresh noise than the step's variance holds (NaN, black images)
        if not 0 <= self.eta <= 1:
            raise ValueError(f"sampling.eta must be between 0 and 1, got {self.eta}")

    @property
    def multiple(self) -> int:
        """H and W must be multiples of this: the first stage and every UNet level halve them."""
        return self.factor * self.unet_factor


def read_geometry(config) -> ModelGeometry:
    params = config.model.params
    unet_levels = len(params.unet_config.params.get("channel_mult", [1, 2, 4, 4]))
    sampling = config.get("sampling") or {}
    not_text = non_text_conditioning(params)
    return ModelGeometry(channels=params.get("channels", 4), factor=_first_stage_factor_of(params.first_stage_config),
                         unet_factor=2 ** (unet_levels - 1), timesteps=params.get("timesteps", DEFAULT_TIMESTEPS),
                         not_text=not_text, vocabulary=None if not_text else _training_vocabulary(config), **sampling)


def _training_vocabulary(config) -> frozenset[str] | None:
    """The words of the model's training captions when the config's training dataset can list them
    (a class with a ``vocabulary()``: the embedded models' procedural scenes); else None. A text
    encoder trained from scratch on a closed vocabulary, as theirs, learnt nothing for any other
    word: its token embedding never left its random start, noise rather than meaning."""
    from omegaconf import OmegaConf
    from ldm.util import get_obj_from_str, instantiate_from_config
    train = OmegaConf.select(config, "data.params.train")
    if not train or "target" not in train:
        return None
    try:
        dataset = get_obj_from_str(train.target)
    except (ImportError, AttributeError):  # a loader this install lacks: sampling does not need it
        return None
    return frozenset(instantiate_from_config(train).vocabulary()) if hasattr(dataset, "vocabulary") else None


# What upstream's other LDMs condition on (model.params.cond_stage_key); a model with any other
# conditioning stage is taken to read text, so a user's own text encoder needs no registration.
NON_TEXT_CONDITIONING = {"class_label": "class labels", "segmentation": "segmentation maps",
                         "coordinates_bbox": "bounding boxes", "LR_image": "a low-resolution image",
                         "masked_image": "a masked image (scripts/inpaint.py runs it)", "image": "an image"}


def non_text_conditioning(params) -> str | None:
    stage = params.get("cond_stage_config")
    if stage == "__is_unconditional__":
        return "an unconditional model (scripts/sample_diffusion.py samples those)"
    kind = NON_TEXT_CONDITIONING.get(params.get("cond_stage_key"))
    if kind or stage == "__is_first_stage__":
        return f"a model conditioned on {kind or 'an image'}"
    return None


def require_text_model(parser, path, geometry):
    """txt2img, img2img and the consistency benchmark sample from prompts."""
    if geometry.not_text:
        parser.error(f"--config {path} is {geometry.not_text}, not a text-to-image model; pass one such as "
                     f"{SD_V1_CONFIG}")


def _first_stage_factor_of(first_stage_config) -> int:
    """1 for the identity (pixel space), 2^(levels-1) for the KL/VQ autoencoders' ``ddconfig``."""
    if first_stage_config.get("target", "").endswith("IdentityFirstStage"):
        return 1
    ch_mult = first_stage_config.get("params", {}).get("ddconfig", {}).get("ch_mult", [1, 2, 4, 4])
    return 2 ** (len(ch_mult) - 1)


def load_config(path):
    """The OmegaConf config at ``path``; unreadable files end with one ``error:`` line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError
    try:
        return OmegaConf.load(path)
    except (OSError, YAMLError, OmegaConfBaseException) as e:
        raise SystemExit(f"error: cannot read config {path}: {e}")


def read_model_geometry(parser, flag, path, example=SD_V1_CONFIG):
    """The ModelGeometry of the model config at `path`, before any model is built; a file that is
    missing, unreadable, not YAML or without the model keys is one error line."""
    from omegaconf import OmegaConf
    if not os.path.isfile(path):
        parser.error(f"config not found: {path} (pass {flag} PATH to a model config, e.g. {example})")
    try:
        return read_geometry(OmegaConf.load(path))
    except Exception as e:  # any of those: the fix is the same, another config
        from ldm.util import first_line
        parser.error(f"{flag} {path} is not a diffusion model config ({first_line(e)}); "
                     f"pass one such as {example}")


def in_repo(path):
    """`path` as given if it exists from the working directory, else this repository's file of
    that name if there is one: upstream's relative defaults (configs/..., the weights a config's
    `sampling` block names, models/...) then also work from another folder, e.g. `python
    ~/sd/scripts/txt2img.py` (outputs still go below the working directory)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repository = os.path.join(REPO_ROOT, path)
    return in_repository if os.path.exists(in_repository) else path


def resolve_model(parser, opt):
    """Fill opt.config, opt.ckpt, opt.vae, opt.C, opt.f, opt.H, opt.W, opt.display_scale, opt.scale,
    opt.ddim_steps and opt.geometry (whose eta validate_common applies).

    Without --config and --ckpt the first model of DEFAULT_CONFIGS whose weights exist is used
    (with --random-weights: SD v1, as upstream); with --ckpt alone, the config whose `sampling`
    block names that file (a shipped model's), else SD v1's. Flags the user gave always win,
    except --C/--f, which must match the model. Relative paths are read from the working directory, else from
    the repository (`in_repo`)."""
    opt.config = in_repo(opt.config) if opt.config else default_config(parser, opt)
    geometry = read_model_geometry(parser, "--config", opt.config)
    require_text_model(parser, opt.config, geometry)
    resolve_weights(parser, opt, geometry)
    if opt.vae is not None:
        opt.vae = in_repo(opt.vae)
        if not os.path.exists(opt.vae):
            parser.error(f"--vae {opt.vae} not found: pass an autoencoder's weight file or folder")
        if geometry.factor == 1:
            parser.error(f"--vae: {opt.config} samples in pixel space, with no autoencoder to replace")
        check_checkpoint_type(parser, "--vae", opt.vae)
    if not opt.random_weights and os.path.isdir(opt.ckpt):
        try:
            diffusers_folder.weight_files(opt.ckpt)
        except ValueError as e:
            parser.error(f"--ckpt {e}")
    for flag, name, value in (("--C", "C", geometry.channels), ("--f", "f", geometry.factor)):
        given = getattr(opt, name)
        if given is not None and given != value:
            parser.error(f"{flag} {given} does not match the model: {opt.config} has {flag} {value} (leave {flag} out)")
        setattr(opt, name, value)
    scale = geometry.scale if geometry.scale is not None else opt.default_scale
    for name, value in (("H", geometry.height), ("W", geometry.width), ("display_scale", geometry.display_scale),
                        ("scale", scale), ("ddim_steps", geometry.steps)):
        if name in vars(opt) and getattr(opt, name) is None:  # img2img has no --H/--W
            setattr(opt, name, value)
    opt.geometry = geometry


def resolve_weights(parser, opt, geometry):
    """opt.ckpt of a script with --ckpt and --random-weights: the file given, else the weights the
    config's `sampling` block names (`in_repo`); None with --random-weights. A missing file is one
    error line saying what to pass instead."""
    if opt.random_weights:
        if opt.ckpt:
            parser.error("--ckpt and --random-weights: choose one")
        return
    opt.ckpt = in_repo(opt.ckpt or geometry.weights)
    if not (opt.ckpt and os.path.exists(opt.ckpt)):
        missing = f"checkpoint not found: {opt.ckpt}" if opt.ckpt else f"{opt.config} names no weights"
        parser.error(f"{missing}: pass --ckpt PATH, or --config {PRELIMINARY_CONFIG} for the shipped 16 px model, "
                     f"or --random-weights to run without weights")
    check_checkpoint_type(parser, "--ckpt", opt.ckpt)


def check_checkpoint_type(parser, flag, path):
    """A file of no checkpoint type, or one cut off, is one error line before the model is built
    (which takes seconds for SD v1), not after; folders are read as diffusers folders when loading."""
    from ldm.util import incomplete_checkpoint, unsupported_checkpoint_type
    problem = os.path.isfile(path) and (unsupported_checkpoint_type(path) or incomplete_checkpoint(path))
    if problem:
        parser.error(f"{flag}: {problem}")


def _same_file(a, b):
    a, b = in_repo(a), in_repo(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _layout(path):
    """The weight names and shapes of the checkpoint file `path` (ldm.util.tensor_layout) but its EMA
    copies (model_ema.*, which a training checkpoint holds beside the weights that an export keeps);
    None for anything else (a folder, no file, another format)."""
    from ldm.util import tensor_layout
    layout = tensor_layout(in_repo(path)) if os.path.isfile(in_repo(path)) else None
    return layout and {name: shape for name, shape in layout.items() if not name.startswith("model_ema.")}


def default_config(parser, opt):
    if opt.random_weights:
        return in_repo(SD_V1_CONFIG)
    weights = default_weights()
    if opt.ckpt:
        return config_of_weights(opt.ckpt, weights) or in_repo(SD_V1_CONFIG)  # upstream's for any other
    for path, file in zip(DEFAULT_CONFIGS, weights):
        if file and os.path.exists(in_repo(file)):  # a file, or a diffusers pipeline folder linked there
            if path == PRELIMINARY_CONFIG:
                logger.warning("no SD v1 weights (%s) and no 32 px embedded model (%s): running the preliminary "
                               "16 px model trained on a CPU, a weak stand-in (models/embedded/README.md); "
                               "pass --ckpt/--config for another model", weights[0], weights[1])
            return in_repo(path)
    parser.error(f"no model weights found: put SD v1 weights at {weights[0]} or pass --ckpt PATH (with --config), "
                 f"or train the embedded model into {weights[1]} (models/embedded/README.md); "
                 "--random-weights runs without weights")


def default_weights() -> list[str | None]:
    """The weights each of DEFAULT_CONFIGS names in its `sampling` block (None: it names none)."""
    return [read_geometry(load_config(in_repo(path))).weights for path in DEFAULT_CONFIGS]


def config_of_weights(ckpt, named_weights=None) -> str | None:
    """The config that goes with the weights `ckpt`, where they tell: the default config whose
    `sampling` block names that very file (a shipped model's), the config of the main.py run they
    come from (run_config), else the default config whose weights have the same tensors (a copy of
    a shipped model's elsewhere); None for any other weights, or for no `ckpt`."""
    if not ckpt:
        return None
    named_weights = default_weights() if named_weights is None else named_weights
    default_for = lambda same: next(
        (path for path, file in zip(DEFAULT_CONFIGS, named_weights) if file and same(ckpt, file)), None)
    named = default_for(_same_file)
    if named:
        return in_repo(named)
    config = run_config(ckpt)
    if config:
        logger.info("--ckpt %s: sampling it with the config of the main.py run it comes from, %s", ckpt, config)
        return config
    layout = _layout(ckpt)  # read once: the model that weights of the same tensors are for fits these too
    alike = layout and default_for(lambda _, file: _layout(file) == layout)
    if alike:
        logger.info("--ckpt %s has the tensors of the weights %s names: built with that config", ckpt, alike)
        return in_repo(alike)
    return None


def run_config(checkpoint) -> str | None:
    """The config of the main.py run `checkpoint` is in (LOGDIR/checkpoints/*.ckpt): the newest
    LOGDIR/configs/*-project.yaml, with the overrides it was trained with; for weights exported by
    scripts/export_checkpoint.py, that of the run checkpoint its .json sidecar names; else None."""
    folder = os.path.dirname(checkpoint) or os.curdir
    if os.path.basename(os.path.abspath(folder)) != "checkpoints":
        source = _exported_from(checkpoint)
        return run_config(source) if source else None
    configs = sorted(glob.glob(os.path.join(folder, os.pardir, "configs", "*-project.yaml")))
    return os.path.normpath(configs[-1]) if configs else None  # relative or absolute as `checkpoint` was


def _exported_from(weights) -> str | None:
    """The checkpoint that scripts/export_checkpoint.py exported `weights` from, if its sidecar
    (the same name, .json) says so and that file is still there."""
    import json
    try:
        with open(os.path.splitext(weights)[0] + ".json") as f:
            source = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):  # no sidecar, or another kind of .json
        return None
    return source if isinstance(source, str) and os.path.isfile(source) else None


def check_image_size(parser, height, width, multiple):
    """H and W must be positive multiples of ``multiple`` (first-stage factor --f times the UNet's 8x
    downsampling: 64 for SD, 8 for a pixel-space model with --f 1); the error suggests the nearest valid size."""
    for flag, value in (("--H", height), ("--W", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            parser.error(f"{flag} must be a positive multiple of {multiple}, got {value} "
                         f"(nearest valid size: {nearest})")


LARGE_SIZE_FACTOR = 4  # pixels beyond this many times the model's own size get a warning


def warn_if_far_above_model_size(geometry, height, width, what, fix):
    """Warn when the images are far larger than the size the model samples by default (its
    training size): every step costs about that factor more (self-attention, quadratic in the
    pixels, more still) and SD 1.x tends to repeat its subjects far above 512 px (known from SD
    users, not measured here). A warning, not an error: a somewhat larger size is legitimate."""
    factor = height * width / (geometry.height * geometry.width)
    if factor > LARGE_SIZE_FACTOR:
        logger.warning("%s %dx%d, %.0fx the pixels of this model's %dx%d: each sampling step costs at least that "
                       "much more, and far above its own size a model tends to repeat its subjects; %s",
                       what, width, height, factor, geometry.width, geometry.height, fix)


def check_output_dir(parser, flag, path):
    """Create the folder `path` for a run's outputs now, before any work, so that a bad one (a
    file, an unwritable place, no value at all) is one error line instead of a traceback after
    sampling. The folders it creates are removed at exit if the run leaves them empty (weights
    that fail to load, Ctrl-C while loading), so that a failed run leaves nothing behind."""
    if not path:
        parser.error(f"{flag} needs a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{flag} {path} is a file, not a folder; pass a folder")
    created = _missing_folders(path)
    try:
        os.makedirs(path, exist_ok=True)
        if created:
            atexit.register(_remove_if_empty, created)
        # a real file, not os.access: root passes permission-bit checks even where it cannot write (/proc)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        parser.error(f"{flag} {path}: cannot create files in this folder ({e.strerror}); pass a writable folder")


def _missing_folders(path):
    """The folders os.makedirs(path) would create, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    return missing


def _remove_if_empty(folders):
    for folder in reversed(folders):  # innermost first; a folder with anything in it stays, with its parents
        try:
            os.rmdir(folder)
        except OSError:
            return


def check_new_file(parser, flag, path):
    """`path` is a file the run will create: it must not exist yet (outputs are never overwritten)
    and its folder must be writable (created if missing), both checked before any work."""
    if os.path.exists(path):
        parser.error(f"{flag} {path} exists; outputs are never overwritten: pass a new path")
    check_output_dir(parser, flag, os.path.dirname(os.path.abspath(path)))


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def computed_precision(precision, device) -> str:
    """What sampling computes in: float16 autocast only on CUDA with --precision autocast (upstream's
    default); everything else float32, as upstream's autocast("cuda") did on a CPU. Logged and kept
    in each PNG, since the same seed gives other images in another precision."""
    return "float16 autocast" if precision == "autocast" and device.type == "cuda" else "float32"


def precision_context(precision, device):
    if computed_precision(precision, device) == "float16 autocast":
        return torch.autocast("cuda")
    return nullcontext()


def record_compute(opt, device):
    """Resolve --device auto and --precision in `opt`, for each PNG (run_metadata), and log them."""
    opt.device, opt.computed_precision = device.type, computed_precision(opt.precision, device)
    logger.info("model on %s, %s, sampler %s", device, opt.computed_precision, opt.sampler)


def set_cpu_threads(requested=None):
    """Set PyTorch's intra-op threads for a CPU run (None: keep PyTorch's choice); returns the number.

    Every op splits its work over the threads and waits for all of them, so on a CPU that other
    processes keep busy a descheduled thread stalls every op: on this project's shared 2-core
    machine the embedded model's 50 steps took 21 s with 2 threads at load 0.7 but 320 s at load
    3-4, against ~35 s with 1 thread at load 5 (docs/benchmarks.md). The default stays PyTorch's
    (all cores), not a guess from the load average: results differ in the last bits between
    thread counts, and the same command must give the same PNG bytes whatever else is running."""
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices); also makes --random-weights reproducible."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(opt):
    """(model, device): the model of --config with --ckpt's weights (or random ones) on --device;
    errors are one line. Seeded before the build, so that --random-weights models are
    reproducible, and after it for sampling (`seed_step_noise`)."""
    device = resolve_device(opt.device)
    seed_everything(opt.seed)
    if device.type == "cpu":
        threads = set_cpu_threads(opt.threads)
        logger.info("CPU run on %d thread(s) (--threads to choose)", threads)
    model = build_model(opt.config, None if opt.random_weights else opt.ckpt, device,
                        unsafe_pickle=opt.unsafe_pickle, random_weights=opt.random_weights, vae=opt.vae)
    record_compute(opt, device)
    seed_step_noise(opt.seed)
    return model, device


def seed_step_noise(seed):
    """Seed what sampling draws from the global generators (DDIM's step noise at eta > 0,
    img2img's encoding noise), so that it follows from the seed alone, not from what building
    the model drew (nothing, when weights load into placeholders; ldm.util.build_with_weights).
    A stream apart from the start noise's (`cpu_noise`, drawn from `seed` itself): from the same
    seed the first step's noise would be x_T again, which leaves the images covered in noise.
    Modulo 2**32, as the CPU generator keeps only a seed's low 32 bits anyway."""
    torch.manual_seed((seed + 2**31) % 2**32)


def build_model(config_path, ckpt, device="cpu", **options):
    """ldm.util.load_model_from_config on the config file at `config_path`. What stops it ends the
    script with one error line, naming the config where the fix may lie in it: a setting it holds,
    or weights that do not fit its model (SD v1's config is the one used for a --ckpt given alone
    that no shipped config names)."""
    import ldm.util
    try:
        return ldm.util.load_model_from_config(load_config(config_path), ckpt, device, **options)
    except ldm.util.ConfigError as e:
        raise SystemExit(f"error: {e} (set in {config_path})")
    except ldm.util.WeightsMismatchError as e:
        raise SystemExit(f"error: {e} (the model of {config_path}; --config names the checkpoint's own)")
    except (ldm.util.ModelError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


def make_sampler(opt, model, samplers):
    return samplers[opt.sampler](model)


def prompt_batches(opt):
    """opt.prompts (validate_common's read_prompts) cut into sampling batches of at most n_samples,
    prompt i for image i. Each image is conditioned on its own prompt; consistent attention shares
    self-attention only, so the images of a batch agree in appearance while each follows its own text."""
    it = iter(opt.prompts)
    return list(iter(lambda: list(islice(it, opt.n_samples)), []))


def conditionings(model, prompts, scale, negative_prompt=""):
    """(cond, uncond) for a batch of prompts; uncond is None when guidance is off (scale 1). The
    unconditional half reads `negative_prompt`: guidance `e_u + s·(e_c − e_u)` then pushes away
    from it as well as towards the prompt."""
    uc = model.get_learned_conditioning(len(prompts) * [negative_prompt]) if scale != 1.0 else None
    return model.get_learned_conditioning(prompts), uc


def check_against_model(parser, opt, model):
    """After loading, before sampling, what only the loaded model can tell: a reference from
    another model, or a --subject word missing from a prompt (checked again with the model's own
    tokenizer: a text encoder other than the vendored CLIP has none before loading), ends the run
    with one ``prog: error:`` line; a prompt longer than the text encoder reads is a warning."""
    reference = getattr(opt, "reference", None)
    if reference is not None:
        try:
            reference.check_model(model)
        except ValueError as err:  # ReferenceMismatch
            parser.error(str(err))
    from ldm.modules.consistency_subject import tokenizer_of
    check_subject_words(parser, opt, lambda: tokenizer_of(model))
    warn_truncated_prompts(opt, model)


def warn_truncated_prompts(opt, model):
    """SD's text encoder reads a fixed context (77 tokens for CLIP, start and end included) and
    cuts the rest, as in training; upstream cut silently, so the end of a long prompt had no effect
    and nothing said why. One warning per prompt that is cut (and for --negative-prompt)."""
    encoder = getattr(model, "cond_stage_model", None)
    tokenizer, context = getattr(encoder, "tokenizer", None), getattr(encoder, "max_length", None)
    if not callable(tokenizer) or context is None:
        return  # a class-label or other encoder: nothing is cut
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    named = [(f"prompt {_shortened(prompt)}", prompt) for prompt in dict.fromkeys(opt.prompts)]
    named += [("--negative-prompt", opt.negative_prompt)] if getattr(opt, "negative_prompt", "") else []
    for name, text in named:
        tokens, budget = count(text), context - 2
        if tokens > budget:
            words = text.split()
            read = _longest_prefix(len(words), lambda n: count(" ".join(words[:n])) <= budget)
            logger.warning("%s is %d tokens long; the text encoder reads %d (a context of %d with its start and end "
                           "tokens): from %s on it has no effect", name, tokens, budget, context,
                           _shortened(" ".join(words[read:])))


def _longest_prefix(n, fits):
    """The largest i <= n with fits(i), for a `fits` that holds up to some i and not after."""
    low, high = 0, n
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _shortened(text, length=40):
    return repr(text if len(text) <= length else text[:length - 1] + "…")


def check_step_window(parser, opt, sampler, timesteps=None):
    """A --share-window holding none of the steps at which this run calls the model would share
    (or record as a reference) nothing: one error line before the first image, instead of a
    warning, or with --write-reference an error, after a batch. `timesteps`: the calls of a run
    that samples part of the schedule (img2img); default a whole run of --ddim_steps (a dry run,
    no model call)."""
    from ldm.modules.consistency import in_window
    reference = getattr(opt, "reference", None)
    config = opt.consistency or (reference.config if reference is not None else None)
    if config is None or config.window == (0.0, 1.0):
        return
    timesteps = sampler.model_timesteps(opt.ddim_steps) if timesteps is None else timesteps
    num_timesteps = sampler.ddpm_num_timesteps
    if any(in_window(config, t, num_timesteps) for t in timesteps):
        return
    start, end = config.window
    positions = [1.0 - t / num_timesteps for t in timesteps]
    nearest = [max((p for p in positions if p < start), default=None),
               min((p for p in positions if p > end), default=None)]
    parser.error(f"--share-window {start:g}:{end:g} holds none of this run's {len(positions)} model calls (the nearest "
                 f"at {' and '.join(f'{p:.3f}' for p in nearest if p is not None)} of the trajectory, 0 = noise, "
                 f"1 = image): widen it or take more --ddim_steps")


def check_subject_words_before_loading(parser, opt):
    """The --subject check with the tokenizer that opt.config names, when the config alone gives
    it (the vendored CLIP tokenizer of SD v1 and the embedded models): a word missing from a
    prompt then costs no model load, which for SD is gigabytes."""
    from ldm.modules.encoders.modules import clip_tokenizer_from_config
    check_subject_words(parser, opt, lambda: clip_tokenizer_from_config(
        load_config(opt.config).model.params.get("cond_stage_config")))


def check_subject_words(parser, opt, tokenizer):
    """Every --subject word (of --consistent-attn, and of a reference being written, whose masks
    come from the first batch's reference images) is a word of every prompt it applies to, else
    one error line naming the word and the prompt. `tokenizer()` -> (tokenizer, context length),
    or None when not known yet; it is called only when there are subjects."""
    from ldm.modules.consistency_subject import SubjectNotInPrompt, subject_token_mask
    reference = getattr(opt, "reference", None)
    checks = [(opt.consistency, prompt_batches(opt))]
    if reference is not None and reference.config is not None:
        first = prompt_batches(opt)[0]
        checks.append((reference.config, [[first[i] for i in reference.config.anchor_positions(len(first))]]))
    checks = [(config, batches) for config, batches in checks if config is not None and config.subjects]
    if not checks:
        return
    try:
        known = tokenizer()
        if known is None:
            return
        text_tokenizer, max_length = known
        for config, batches in checks:
            for prompts in batches:
                subject_token_mask(text_tokenizer, prompts, config.subjects, max_length)
    except SubjectNotInPrompt as err:
        parser.error(str(err))


def add_batch_arguments(parser):
    """What a batch can share or follow, the same in txt2img and img2img: --consistent-attn and its
    --share-* flags, --reference-image, --write-/--read-reference and --adapter."""
    from ldm.modules import adapters, consistency, consistency_image, consistency_reference
    for feature in (consistency, consistency_image, consistency_reference, adapters):
        feature.add_arguments(parser)


def consistency_from_arguments(parser, opt):
    """--consistent-attn's config, or None; each --reference-image joins every batch as one more
    image (an anchor), so it counts towards the images that share."""
    from ldm.modules import consistency
    return consistency.config_from_arguments(opt, parser, opt.n_samples + len(opt.reference_image or ()))


def attention_sharing(opt, model, prompts):
    """The context that shares self-attention while one batch of `prompts` is sampled: the
    --write-/--read-reference run, --consistent-attn's anchors over a run of several batches
    (the first batch's anchors for all), or --consistent-attn within the batch (a no-op when
    none is on)."""
    from ldm.modules.consistency import consistent_attention
    if getattr(opt, "reference", None) is not None:
        return opt.reference.batch(model, prompts)
    if opt.run_anchors is not None:
        return opt.run_anchors.batch(model, prompts)
    return consistent_attention(model, opt.consistency, len(prompts), prompts=prompts)


@contextmanager
def sampling_batch(opt, model, prompts, x):
    """One batch of `prompts` as the sampler sees it: --reference-image's anchors in front (of the
    prompts and of `x`, the start latents), inside the sharing and adapter contexts. Yields
    (c, uc, x, known): the conditionings, the start latents and the sampler's `mask`/`x0`
    options; the last len(prompts) images sampled are the outputs."""
    from ldm.modules import adapters
    n, anchor, known = len(prompts), opt.image_anchor, {}
    if anchor is not None:
        prompts, x = anchor.extend(prompts, x)
        known = anchor.known(model, len(prompts))
    with attention_sharing(opt, model, prompts), adapters.conditioning(model, opt.adapters, n, len(prompts) - n):
        yield (*conditionings(model, prompts, opt.scale, opt.negative_prompt), x, known)


def latents_to_images(model, latents):
    """Decode latents to (B, 3, H, W) float32 CPU images in [0, 1]."""
    images = model.decode_first_stage(latents)
    return torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu()


def cpu_noise(generator, shape, device):
    """Gaussian noise drawn on the CPU (same numbers on every device) and moved to ``device``."""
    return torch.randn(shape, generator=generator).to(device)


def noised_batches(opt, shape, device):
    """Yield (prompts, noise) for every batch of every iteration (--n_iter), with a progress bar:
    `noise` is (len(prompts), *shape[1:]), drawn from --seed in this order, or with --fixed_code
    the first rows of one draw of `shape` (n_samples images) for every batch. txt2img starts
    from it, img2img noises its init image with it."""
    from tqdm import tqdm
    batches = prompt_batches(opt)
    generator = torch.Generator().manual_seed(opt.seed)
    fixed = cpu_noise(generator, shape, device) if opt.fixed_code else None
    with tqdm(total=opt.n_iter * len(batches), desc="Sampling") as progress:
        for _ in range(opt.n_iter):
            for prompts in batches:
                n = len(prompts)
                yield prompts, fixed[:n] if fixed is not None else cpu_noise(generator, (n, *shape[1:]), device)
                progress.update()


# --- optional post-processing -------------------------------------------------------------

SAFETY_MODEL_ID = "CompVis/stable-diffusion-safety-checker"
WATERMARK_TEXT = "StableDiffusionV1"
WATERMARK_MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images (its DWT-DCT needs the room)


class Postprocess(NamedTuple):
    """What a run does to its images on the way out. `batch`: to each batch of samples, before any
    file or grid is made of them (the safety checker, whose blanked images stay blank in the grid).
    `png`: to the pixels of every PNG the run writes, samples and grids, at their saved size (the
    invisible watermark, which a reader decodes from the file as it is: upstream marked each file)."""
    batch: Callable
    png: Callable | None = None


def build_postprocess(opt, height, width):
    """The run's Postprocess for (B, 3, height, width) images in [0, 1], saved --display-scale
    times larger. Everything is loaded here, before sampling, so a missing optional dependency or an
    image too small to watermark fails fast with one line."""
    saved_height, saved_width = height * opt.display_scale, width * opt.display_scale
    if opt.watermark and saved_height * saved_width < WATERMARK_MIN_PIXELS:
        raise SystemExit(f"error: --watermark needs images of 256x256 pixels or more (invisible-watermark's "
                         f"limit), this run saves {saved_width}x{saved_height}: leave it out, or generate larger "
                         "images or save them larger (--display-scale)")
    check = (_load_safety_checker(*safety_checker_sources(opt.safety_checker, opt.ckpt))
             if opt.safety_checker is not None else lambda images: images)
    return Postprocess(batch=check, png=_load_watermarker() if opt.watermark else None)


def safety_checker_sources(folder, ckpt):
    """(checker, feature extractor): the folders to load them from, or the hub id for both.
    `folder`: --safety-checker's FOLDER, "" where none was given. SD v1 pipelines on the hub
    (CompVis/stable-diffusion-v1-4) ship the checker, so a user with a pipeline folder has it."""
    pipeline = diffusers_folder.cache_snapshot(folder or ckpt) if folder or ckpt else None
    if pipeline and os.path.isdir(os.path.join(pipeline, "safety_checker")):  # FOLDER or --ckpt
        return os.path.join(pipeline, "safety_checker"), os.path.join(pipeline, "feature_extractor")
    if folder:  # the checker's own folder
        return pipeline, pipeline
    return SAFETY_MODEL_ID, SAFETY_MODEL_ID


def _load_safety_checker(checker_source, extractor_source):
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor
    except ImportError as e:
        raise SystemExit(f"error: --safety-checker needs diffusers (pip install diffusers): {e}")

    try:
        # not AutoFeatureExtractor: transformers 5 no longer maps CLIP's preprocessor config to one
        # one hub id for both, unless given folders: the hub is asked once
        sources = {source: pretrained_source(source) for source in {extractor_source, checker_source}}
        extractor = AutoImageProcessor.from_pretrained(sources[extractor_source])
        checker = StableDiffusionSafetyChecker.from_pretrained(sources[checker_source])
    except Exception as e:  # offline hub, missing cache, a folder without the files ...: "weights unavailable"
        from ldm.util import first_line
        raise SystemExit(f"error: --safety-checker could not load {checker_source}: {first_line(e)}; "
                         "--safety-checker FOLDER takes a local copy (a diffusers SD pipeline folder)")
    logger.info("safety checker: %s", checker_source)

    def check(images):
        array = images.permute(0, 2, 3, 1).numpy()
        features = extractor([to_pil(img) for img in images], return_tensors="pt")
        checked, flagged = checker(images=array, clip_input=features.pixel_values)
        for i, nsfw in enumerate(flagged):
            if nsfw:
                logger.warning("safety checker flagged image %d; replacing it with black", i)
                checked[i] = 0
        return torch.from_numpy(checked).permute(0, 3, 1, 2)

    return check


def _load_watermarker():
    try:
        import cv2
        import numpy as np
        from imwatermark import WatermarkEncoder
        from PIL import Image
    except ImportError as e:
        raise SystemExit("error: --watermark needs invisible-watermark and opencv-python-headless "
                         f"(pip install invisible-watermark opencv-python-headless): {e}")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK_TEXT.encode("utf-8"))

    def watermark(image):  # upstream's put_watermark
        bgr = encoder.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")
        return Image.fromarray(bgr[:, :, ::-1])

    return watermark


# --- outputs ------------------------------------------------------------------------------

def run_metadata(opt, *, prompt, height, width, extra_metadata=None, batch=None, position=None):
    """The JSON stored in each PNG's "parameters" text chunk.

    ``extra_metadata`` is a dict other features add their settings to (stored under "extra").
    A sample also records where it was made: ``batch`` (from 0, in the run) and ``position`` in
    that batch, which with the same seed reproduces it and is what --anchor-images takes.
    """
    metadata = {
        "prompt": prompt,
        "seed": opt.seed,
        "sampler": opt.sampler,
        "steps": opt.ddim_steps,
        "scale": opt.scale,
        "negative_prompt": opt.negative_prompt,
        "eta": opt.ddim_eta,
        "H": height,
        "W": width,
        "config": opt.config,
        "ckpt": None if opt.random_weights else opt.ckpt,
        "device": opt.device,
        "precision": opt.computed_precision,
        "extra": dict(extra_metadata or {}),
    }
    if opt.vae:
        metadata["vae"] = opt.vae
    if batch is not None:
        metadata.update(batch=batch, position=position)
    if opt.random_weights:
        metadata["random_weights"] = True
    return metadata


class OutputWriter:
    """Saves samples as ``outdir/samples/NNNNN.png`` and grids as ``outdir/grid-NNNN.png``.

    Numbering continues after the highest existing index; existing files are never overwritten.
    """

    def __init__(self, outdir, display_scale=1, mark=None):
        self.outdir = outdir
        self.sample_dir = os.path.join(outdir, "samples")
        self.display_scale = display_scale
        self.mark = mark  # PIL image -> PIL image, on every file's pixels as saved (Postprocess.png)
        os.makedirs(self.sample_dir, exist_ok=True)
        self.next_sample = next_free_index(self.sample_dir, digits=5)
        self.next_grid = next_free_index(outdir, prefix="grid-", digits=4)

    def save_samples(self, images, metadata):
        """Save each (3, H, W) image; ``metadata(i)`` gives the parameters for image i of the batch."""
        paths = []
        for i, image in enumerate(images):
            path = os.path.join(self.sample_dir, f"{self.next_sample:05}.png")
            paths.append(self._save(image, path, metadata(i)))
            self.next_sample += 1
        return paths

    def save_grid(self, images, nrow, metadata):
        path = os.path.join(self.outdir, f"grid-{self.next_grid:04}.png")
        self._save(make_grid(images, nrow=nrow), path, metadata)
        self.next_grid += 1
        return path

    def _save(self, image, path, metadata):
        pixels = upscale(to_pil(image), self.display_scale)
        return save_png(self.mark(pixels) if self.mark else pixels, path, metadata)


def written_message(opt, paths):
    """The run's last line: where the samples are, or that the flags asked for none."""
    if paths:
        return f"{len(paths)} files written; your samples are ready and waiting for you here: {opt.outdir}"
    return "no files written: --skip_save and --skip_grid leave out the samples and the grid"


def save_results(opt, results, *, height, width, extra_metadata=None, mark=None):
    """Save each batch of ``results`` ((prompts, images) pairs) as samples (unless --skip_save)
    and all of them as one grid (unless --skip_grid), with metadata, each file's pixels through
    `mark` (Postprocess.png); returns the paths."""
    writer = OutputWriter(opt.outdir, opt.display_scale, mark)

    def metadata(prompt, **where):
        return run_metadata(opt, prompt=prompt, height=height, width=width, extra_metadata=extra_metadata, **where)

    def grid():
        if not all_images:
            return []
        prompt = all_prompts[0] if len(set(all_prompts)) == 1 else all_prompts
        with ctrl_c_deferred():
            return [writer.save_grid(torch.cat(all_images), opt.n_rows or opt.n_samples, metadata(prompt))]

    paths, all_images, all_prompts, finished = [], [], [], 0
    try:
        for batch, (prompts, images) in enumerate(results):
            with ctrl_c_deferred():
                if not opt.skip_save:
                    paths += writer.save_samples(images, lambda i: metadata(prompts[i], batch=batch, position=i))
                if not opt.skip_grid:
                    all_images.append(images)
                    all_prompts += prompts
                finished += 1
    except KeyboardInterrupt:  # Ctrl-C in a long run: the finished batches keep their samples and get their grid
        paths += grid()
        logger.warning("interrupted after %d finished batch(es): %s", finished, written_message(opt, paths))
        raise
    return paths + grid()


@contextmanager
def ctrl_c_deferred():
    """Ctrl-C arriving inside the block takes effect at its end, so that a batch's files are written
    whole (a PNG cut off mid-write would be left broken, under a name never reused). Where Python
    does not handle Ctrl-C (a thread, a process that ignores it) the block runs as it is."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def interruptible(main):
    """Run a script's `main`; Ctrl-C ends it with exit status 130, as a shell reports it, instead of
    a traceback from wherever the sampler was (save_results says what was saved)."""
    try:
        return main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def feature_metadata(opt, extra_metadata=None):
    """Log the optional features this run uses and add their settings to the PNG metadata
    (keys the caller already set win)."""
    extra = dict(extra_metadata or {})
    for key, attribute in (("consistent_attn", "consistency"), ("run_anchors", "run_anchors"),
                           ("reference", "reference"), ("reference_image", "image_anchor"),
                           ("t2i_adapter", "adapters")):
        feature = getattr(opt, attribute, None)
        if feature is not None:
            logger.info("%s: %s", key, feature.describe())
            extra.setdefault(key, feature.describe())
    return extra
