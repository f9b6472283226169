"""Pieces shared by scripts/txt2img.py and scripts/img2img.py.

Command-line options common to both and their validation (one ``error: ...`` line, no
traceback), device/precision selection, model loading, seeding, and the batch loop's noise,
conditionings and sharing contexts. Which model runs is decided in ldm.model_choice; what is
written, in ldm.outputs.
"""
import argparse
import atexit
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager, nullcontext
from itertools import islice

import torch

from ldm.model_choice import DEFAULT_CONFIGS, DEFAULT_STEPS, load_config, resolve_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.outputs import SAFETY_MODEL_ID, SAMPLES_FOLDER

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

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


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
    add("--ddim_steps", "--steps", type=positive_int, default=None, metavar="N",
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
    add("--n_iter", type=positive_int, default=n_iter,
        help=f"how many times the prompts are sampled, one batch after another (default: {n_iter}, as upstream); "
             "with --from-file each time takes every line, --n_samples lines a batch")
    add("--C", type=positive_int, default=None, help="latent channels (default: read from --config)")
    add("--f", type=positive_int, default=None, help="first-stage downsampling factor (default: read from --config)")
    add("--n_samples", type=positive_int, default=n_samples,
        help=f"images per batch, a.k.a. batch size: samples of the --prompt, or lines of --from-file a batch "
             f"(default: {n_samples})")
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
    add("--display-scale", type=positive_int, default=None, metavar="K",
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


def check_seed(parser, flag, seed):
    """A seed in numpy's and upstream's (pytorch_lightning's) range, else one error line."""
    if not 0 <= seed < 2**32:
        parser.error(f"{flag} must be between 0 and {2**32 - 1}, got {seed}")


def check_steps(parser, flag, steps, timesteps, where=""):
    """Sampling steps below the model's training timesteps (a sampler refuses more, with a traceback
    once the model is built), else one error line; `where` says where the timesteps are set."""
    if steps >= timesteps:
        parser.error(f"{flag} must be below the model's {timesteps} training timesteps{where}, got {steps}")


def check_sampler_steps(parser, name, sampler, steps):
    """At least the steps the `sampler` class (`--sampler name`) needs, else one error line."""
    if steps < sampler.min_steps:
        parser.error(f"--sampler {name} needs --ddim_steps {sampler.min_steps} or more, got {steps}")


def check_eta(parser, eta, deterministic_sampler=None):
    """DDIM's eta in [0, 1], and none for a sampler that draws no step noise (`deterministic_sampler`:
    its flag, e.g. "--sampler plms"); else one error line. None (not given) passes."""
    if eta is not None and eta != 0 and deterministic_sampler:
        parser.error(f"--ddim_eta applies to the ddim sampler; {deterministic_sampler} is deterministic "
                     f"(leave --ddim_eta out)")
    if eta is not None and not 0 <= eta <= 1:
        parser.error(f"--ddim_eta must be between 0 (deterministic) and 1 (DDPM-like), got {eta}")


def check_n_rows(parser, n_rows):
    if n_rows < 0:
        parser.error(f"--n_rows must be 0 (= n_samples) or positive, got {n_rows}")


def check_scale(parser, scale):
    if not math.isfinite(scale):
        parser.error(f"--scale must be a finite number, got {scale}")


def validate_common(parser, opt, samplers, aliases):
    """Check the shared options; resolves opt.sampler. Exits via parser.error on bad input."""
    resolve_sampler(parser, opt, samplers, aliases)
    sampler = samplers[opt.sampler]
    check_eta(parser, opt.ddim_eta, None if sampler.stochastic else f"--sampler {opt.sampler}")
    check_seed(parser, "--seed", opt.seed)
    check_n_rows(parser, opt.n_rows)
    if opt.n_rows and opt.skip_grid:  # upstream's combination, so a warning, not an error
        logger.warning("--n_rows %d lays out the grid, which --skip_grid leaves out: it has no effect", opt.n_rows)
    resolve_model(parser, opt)
    if opt.ddim_eta is None:  # a config's eta is for the sampler that draws step noise; the others have none
        opt.ddim_eta = opt.geometry.eta if sampler.stochastic else 0.0
    if opt.geometry.eta > 0 and opt.ddim_eta == 0:
        # a model that needs eta > 0 leaves pixel noise on a deterministic path (the 16 px model:
        # pixel noise 0.04-0.14 with plms or dpm, 0.01 with its ddim eta 1; CONSISTENCY_NOTES.md)
        what, fix = ((f"--sampler {opt.sampler}", "--sampler ddim samples it as intended") if not sampler.stochastic
                     else ("--ddim_eta 0", "leave --ddim_eta out to sample it as intended"))
        logger.warning("this model's config samples with ddim eta %g: %s draws no step noise and can leave its "
                       "images speckled (%s)", opt.geometry.eta, what, fix)
    check_scale(parser, opt.scale)
    if opt.negative_prompt and opt.scale == 1.0:
        parser.error("--negative-prompt needs classifier-free guidance, which --scale 1 turns off (the "
                     "unconditional pass it replaces does not run): pass --scale above 1 or leave it out")
    if getattr(opt, "share_cfg", None) == "cond" and opt.scale == 1.0:
        parser.error("--share-cfg cond keeps the unconditional half of classifier-free guidance plain, and --scale 1 "
                     "runs no unconditional half (every image shares): pass --scale above 1 or leave it out")
    check_sampler_steps(parser, opt.sampler, sampler, opt.ddim_steps)
    check_steps(parser, "--ddim_steps", opt.ddim_steps, opt.geometry.timesteps)
    opt.prompts = read_prompts(parser, opt)
    warn_unseen_words(opt.geometry, opt.config, opt.prompts + [getattr(opt, "negative_prompt", "") or ""])
    batches = prompt_batches(opt)
    from ldm.modules.consistency import anchors_of_first_batch, check_anchor_images, check_anchors_leave_readers
    check_anchor_images(parser, opt.consistency, len(batches[0]))  # --from-file: maybe fewer than n_samples
    images = len(batches[0]) + len(getattr(opt, "reference_image", None) or ())
    if opt.consistency is not None and opt.n_iter * len(batches) == 1 == images:  # --from-file: 1 line, --n_samples 1
        logger.warning("--consistent-attn: this run is a single image, nothing to share; sampling normally")
        opt.consistency = None
    check_anchors_leave_readers(parser, opt, images, opt.n_iter * len(batches))
    opt.consistency = anchors_of_first_batch(opt.consistency, len(batches[0]))  # a run of batches: the later read
    from ldm.modules.consistency_reference import run_anchors  # it imports this module
    opt.run_anchors = run_anchors(opt.consistency, opt.n_iter * len(batches))
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


def check_sample_outdir(parser, opt):
    """--outdir and, unless --skip_save, its samples folder, where OutputWriter saves: a file of
    that name was a traceback once the model had loaded."""
    check_output_dir(parser, "--outdir", opt.outdir)
    if getattr(opt, "skip_save", False):  # knn2img has no --skip_save
        return
    samples = os.path.join(opt.outdir, SAMPLES_FOLDER)
    if os.path.exists(samples) and not os.path.isdir(samples):
        parser.error(f"--outdir {opt.outdir} holds a file named {SAMPLES_FOLDER}, where the samples go: move it, "
                     "or pass another --outdir")
    if os.path.isdir(samples):  # one to make is made in --outdir, just checked: nothing made before the run
        check_output_dir(parser, "--outdir", samples)


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


def set_cpu_threads(requested, device):
    """Set PyTorch's intra-op threads for a run on `device` if it is the CPU (None: keep PyTorch's
    choice) and log them; returns the number, or None on another device, where --threads is
    ignored with a warning (the CPU then only feeds the accelerator).

    Every op splits its work over the threads and waits for all of them, so on a CPU that other
    processes keep busy a descheduled thread stalls every op: on this project's shared 2-core
    machine the embedded model's 50 steps took 21 s with 2 threads at load 0.7 but 320 s at load
    3-4, against ~35 s with 1 thread at load 5 (docs/benchmarks.md). The default stays PyTorch's
    (all cores), not a guess from the load average: results differ in the last bits between
    thread counts, and the same command must give the same PNG bytes whatever else is running."""
    if device.type != "cpu":
        if requested is not None:
            logger.warning("--threads %d ignored: it sets the CPU's threads for CPU runs, this run is on %s",
                           requested, device)
        return None
    if requested is not None:
        torch.set_num_threads(requested)
    threads = torch.get_num_threads()
    logger.info("CPU run on %d thread(s) (--threads to choose)", threads)
    return threads


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
    set_cpu_threads(opt.threads, device)
    model = build_model(opt.config, None if opt.random_weights else opt.ckpt, device,
                        unsafe_pickle=opt.unsafe_pickle, random_weights=opt.random_weights, vae=opt.vae)
    record_compute(opt, device)
    seed_step_noise(opt.seed)
    return model, device


def seed_step_noise(seed):
    """Seed what sampling draws from the global generators (DDIM's step noise at eta > 0,
    img2img's encoding noise), so that it follows from the seed alone, not from what building
    the model drew (nothing, when weights load into placeholders; ldm.checkpoints.build_with_weights).
    A stream apart from the start noise's (`cpu_noise`, drawn from `seed` itself): from the same
    seed the first step's noise would be x_T again, which leaves the images covered in noise.
    Modulo 2**32, as the CPU generator keeps only a seed's low 32 bits anyway."""
    torch.manual_seed((seed + 2**31) % 2**32)


def build_model(config_path, ckpt, device="cpu", **options):
    """ldm.checkpoints.load_model_from_config on the config file at `config_path`. What stops it ends the
    script with one error line, naming the config where the fix may lie in it: a setting it holds,
    or weights that do not fit its model (SD v1's config is the one used for a --ckpt given alone
    that no shipped config names)."""
    from ldm.checkpoints import WeightsMismatchError, load_model_from_config
    from ldm.util import ConfigError, ModelError
    try:
        return load_model_from_config(load_config(config_path), ckpt, device, **options)
    except ConfigError as e:
        raise SystemExit(f"error: {e} (set in {config_path})")
    except WeightsMismatchError as e:
        raise SystemExit(f"error: {e} (the model of {config_path}; --config names the checkpoint's own)")
    except (ModelError, FileNotFoundError) as e:
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
    another model, --share-groups/--share-blocks naming no layer of its UNet, or a --subject word
    missing from a prompt (checked again with the model's own tokenizer: a text encoder other
    than the vendored CLIP has none before loading), ends the run with one ``prog: error:`` line;
    a prompt longer than the text encoder reads is a warning."""
    reference = getattr(opt, "reference", None)
    if reference is not None:
        try:
            reference.check_model(model)
        except ValueError as err:  # ReferenceMismatch
            parser.error(str(err))
    config = sharing_config(opt)
    if config is not None:  # a config of the user's may have no attention at some resolution
        from ldm.modules.consistency import selected_sites
        try:
            selected_sites(model, config)
        except (ValueError, RuntimeError) as err:  # RuntimeError: a UNet layout the groups cannot place
            parser.error(f"--share-groups/--share-blocks: {err}")
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


def sharing_config(opt):
    """The ConsistentAttentionConfig the run shares with: --consistent-attn's, else the one of the
    reference it writes or reads, else None."""
    reference = getattr(opt, "reference", None)
    return opt.consistency or (reference.config if reference is not None else None)


def check_step_windows(parser, opt, sampler, timesteps=None):
    """A --share-window or --cond-tau holding none of the steps at which this run calls the model
    would share (or record as a reference) nothing, or apply the adapter at no step: one error line
    before the first image, instead of a warning, an error after a batch, or nothing at all.
    `timesteps`: the calls of a run that samples part of the schedule (img2img, from --strength);
    default a whole run of --ddim_steps (a dry run, no model call)."""
    from ldm.modules.consistency import in_window
    config = sharing_config(opt)
    adapters = getattr(opt, "adapters", None)
    cond_tau = adapters.cond_tau if adapters is not None else 1.0
    if (config is None or config.window == (0.0, 1.0)) and cond_tau == 1.0:
        return
    partial = timesteps is not None
    timesteps = timesteps if partial else sampler.model_timesteps(opt.ddim_steps)
    num_timesteps = sampler.ddpm_num_timesteps
    positions = [1.0 - t / num_timesteps for t in timesteps]  # 0 = noise, 1 = image
    calls = f"this run's {len(positions)} model calls"
    if config is not None and not any(in_window(config, t, num_timesteps) for t in timesteps):
        start, end = config.window
        nearest = [max((p for p in positions if p < start), default=None),
                   min((p for p in positions if p > end), default=None)]
        more = ("raise --strength, which starts the run nearer the noise" if partial and end < min(positions)
                else "take more --ddim_steps")
        parser.error(f"--share-window {start:g}:{end:g} holds none of {calls} (the nearest at "
                     f"{' and '.join(f'{p:.3f}' for p in nearest if p is not None)} of the trajectory, 0 = noise, "
                     f"1 = image): widen it or {more}")
    check_cond_tau(parser, cond_tau, positions, calls, steps_flag=None if partial else "--ddim_steps")


def check_cond_tau(parser, cond_tau, positions, calls, steps_flag="--ddim_steps"):
    """The adapter is on while 1 - t/T <= cond_tau (adapters.AdapterInjection): a --cond-tau below
    the first of the model calls' `positions` (1 - t/T, described by `calls`) applies it nowhere.
    `steps_flag`: the flag that takes more steps, None where more steps would not help."""
    if min(positions) > cond_tau:
        enough = math.ceil(min(positions) * 1000) / 1000  # 1 - 981/1000 is 0.019000000000000017: 0.019 is not
        parser.error(f"--cond-tau {cond_tau:g} holds none of {calls} (the first at {min(positions):.3f} of the "
                     f"trajectory, 0 = noise, 1 = image): the adapter would change nothing; raise it to "
                     f"{enough:g} or more" + (f" or take more {steps_flag}" if steps_flag else ""))


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


def interruptible(main):
    """Run a script's `main`; Ctrl-C ends it with exit status 130, as a shell reports it, instead of
    a traceback from wherever the sampler was (save_results says what was saved)."""
    try:
        return main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
