"""Which model a script runs, and at which size, decided from configs before any weights load.

Without --config/--ckpt the first of DEFAULT_CONFIGS whose weights are in place runs; with --ckpt
alone, the config that goes with those weights (`config_of_weights`). A config's model and its
optional `sampling` block give the `ModelGeometry`: latent channels, downsampling factors, default
size, guidance scale, steps, DDIM eta and weights. A problem a user can fix is one error line.
"""
import glob
import logging
import os
from dataclasses import dataclass

from ldm import diffusers_folder
from ldm.models.diffusion.sampler import check_predicts_noise
from ldm.modules.diffusionmodules.util import DEFAULT_TIMESTEPS
from ldm.util import ModelError

logger = logging.getLogger(__name__)

# The models a command without --config/--ckpt may run, first match wins: upstream's SD v1 path
# (so upstream users' commands keep working), then the small model this fork ships, then its
# preliminary CPU-trained stand-in, whose weights are in every clone: a new user's first command
# runs a trained model (and says which) instead of stopping for want of weights.
SD_V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
EMBEDDED_CONFIG = "configs/embedded/procedural-t2i.yaml"
PRELIMINARY_CONFIG = "configs/embedded/procedural-t2i-16px.yaml"
DEFAULT_CONFIGS = (SD_V1_CONFIG, EMBEDDED_CONFIG, PRELIMINARY_CONFIG)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_STEPS = 50  # upstream's --ddim_steps; a config's `sampling: steps:` overrides it


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
    parameterization: str = "eps"  # what the model predicts: the noise (eps) or the clean image (x0)
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
                         parameterization=params.get("parameterization", "eps"), not_text=not_text,
                         vocabulary=None if not_text else _training_vocabulary(config), **sampling)


def _training_vocabulary(config) -> frozenset[str] | None:
    """The words of the model's training captions when the config's training dataset can list them
    (a class with a ``vocabulary()``: the embedded models' procedural scenes); else None. A text
    encoder trained from scratch on a closed vocabulary, as theirs, learnt nothing for any other
    word: its token embedding never left its random start, noise rather than meaning."""
    from omegaconf import OmegaConf
    from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config
    train = OmegaConf.select(config, "data.params.train")
    if not train or "target" not in train:
        return None
    try:
        dataset = get_obj_from_str(train.target)
    except (ImportError, ConfigError):  # a loader this install lacks (or misspelt): sampling does not need it
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
    """txt2img, img2img and the consistency benchmark sample from prompts, with DDIM, PLMS or
    DPM-Solver: checked on the config, before the weights load."""
    if geometry.not_text:
        parser.error(f"--config {path} is {geometry.not_text}, not a text-to-image model; pass one such as "
                     f"{SD_V1_CONFIG}")
    try:
        check_predicts_noise(geometry.parameterization)
    except ModelError as err:
        parser.error(f"--config {path}: {err}")


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
    except (OSError, YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:  # the last: not a text file
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
    ~/sd/scripts/txt2img.py` (outputs still go below the working directory). A link counts as there
    even where it points nowhere, so that the caller can say so rather than read another file."""
    if not path or os.path.isabs(path) or os.path.lexists(path):  # "" is no name: not the repository's root
        return path
    in_repository = os.path.join(REPO_ROOT, path)
    return in_repository if os.path.lexists(in_repository) else path


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
    from ldm.checkpoints import incomplete_checkpoint, unsupported_checkpoint_type
    problem = os.path.isfile(path) and (unsupported_checkpoint_type(path) or incomplete_checkpoint(path))
    if problem:
        parser.error(f"{flag}: {problem}")


def _same_file(a, b):
    a, b = in_repo(a), in_repo(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _layout(path):
    """The weight names and shapes of the checkpoint file `path` (ldm.checkpoints.tensor_layout) but its EMA
    copies (model_ema.*, which a training checkpoint holds beside the weights that an export keeps);
    None for anything else (a folder, no file, another format)."""
    from ldm.checkpoints import tensor_layout
    path = in_repo(path)
    layout = tensor_layout(path) if os.path.isfile(path) else None
    return layout and {name: shape for name, shape in layout.items() if not name.startswith("model_ema.")}


def default_config(parser, opt):
    if opt.random_weights:
        return in_repo(SD_V1_CONFIG)
    weights = default_weights()
    if opt.ckpt:
        return config_of_weights(opt.ckpt, weights) or in_repo(SD_V1_CONFIG)  # upstream's for any other
    for path, file in zip(DEFAULT_CONFIGS, weights):
        found = file and in_repo(file)
        if found and not os.path.exists(found) and os.path.islink(found):
            # README's `ln -s /path/to/sd-v1-4.ckpt ...` with a wrong path: a smaller model would run unasked
            parser.error(f"{found} is a link to {os.readlink(found)}, which does not exist: point it at the "
                         f"weights (ln -sf /path/to/weights {file}) or remove it")
        if found and os.path.exists(found):  # a file, or a diffusers pipeline folder linked there
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
