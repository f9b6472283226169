import argparse, os, sys, datetime, glob
import difflib
import inspect
import logging
import numpy as np
import signal
import time
import typing
import warnings
import torch
import yaml
import pytorch_lightning as pl

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset
from contextlib import contextmanager
from functools import partial
from PIL import Image

from pytorch_lightning import seed_everything
from pytorch_lightning.trainer import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, Callback, LearningRateMonitor  # noqa: F401 (config targets main.X)
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only, rank_zero_info

from ldm.checkpoints import (CheckpointError, incomplete_checkpoint, numpy_safe_globals, read_checkpoint,
                             state_dict_of)
from ldm.data.base import Txt2ImgIterableBaseDataset
from ldm.image_io import make_grid
from ldm.models.lightning import lightning_module
from ldm.modules.ema import with_ema_of_parts_not_held
from ldm.script_helpers import ArgumentParser
from ldm.util import (ConfigError, ModelError, construct, first_line, get_obj_from_str, instantiate_from_config,
                      pip_name)

logger = logging.getLogger("main")


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif v.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError(
            f"Boolean value expected, got {v!r} (KEY=VALUE config overrides cannot follow this flag "
            "directly: put them after a flag that takes a value, e.g. --logdir DIR)")


def get_parser(**parser_kwargs):
    parser = ArgumentParser(**parser_kwargs)
    parser.add_argument(
        "-n",
        "--name",
        type=str,
        default="",
        help="postfix for logdir",
    )
    parser.add_argument(
        "-r",
        "--resume",
        type=str,
        default="",
        help="resume from logdir or checkpoint in logdir",
    )
    parser.add_argument(
        "-b",
        "--base",
        nargs="*",
        action="extend",  # -b a.yaml ... -b b.yaml: both (the last list alone, upstream)
        metavar="base_config.yaml",
        help="paths to base configs. Loaded from left-to-right. "
             "Parameters can be overwritten or added with command-line arguments of the form `key=value` "
             "(e.g. data.params.batch_size=4), given after the other flags.",
        default=list(),
    )
    parser.add_argument(
        "-t",
        "--train",
        type=str2bool,
        const=True,
        default=False,
        nargs="?",
        help="train",
    )
    parser.add_argument(
        "--no-test",
        type=str2bool,
        const=True,
        default=False,
        nargs="?",
        help="disable test",
    )
    parser.add_argument(
        "-p",
        "--project",
        help="accepted for upstream's commands, without effect: use -n/--name, -l/--logdir or -r/--resume"
    )
    parser.add_argument(
        "-d",
        "--debug",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="enable post-mortem debugging",
    )
    parser.add_argument(
        "-s",
        "--seed",
        type=int,
        default=23,
        help="seed for seed_everything",
    )
    parser.add_argument(
        "-f",
        "--postfix",
        type=str,
        default="",
        help="post-postfix for default name",
    )
    parser.add_argument(
        "-l",
        "--logdir",
        type=str,
        default="logs",
        help="folder of the runs: logs, configs, checkpoints",
    )
    parser.add_argument(
        "--scale_lr",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="scale base-lr by ngpu * batch_size * n_accumulate",
    )
    add_trainer_arguments(parser)
    return parser


def int_or_float(text):
    """A batch count ("1": one batch) or a fraction of the batches ("1.0": all of them), as
    pytorch-lightning 1.x parsed the limit and interval options: a float type made `1` all."""
    try:
        return int(text)
    except ValueError:
        return float(text)


# Trainer options settable on the command line (pytorch-lightning 2 dropped
# Trainer.add_argparse_args). They default to None = "not given": only given ones override
# the config's lightning.trainer section. Anything else goes there (or as lightning.trainer.KEY=VALUE).
TRAINER_ARGS = {
    "accelerator": str, "devices": str, "strategy": str, "precision": str, "max_steps": int,
    "max_epochs": int, "accumulate_grad_batches": int, "limit_train_batches": int_or_float,
    "limit_val_batches": int_or_float, "val_check_interval": int_or_float, "check_val_every_n_epoch": int,
    "log_every_n_steps": int, "num_sanity_val_steps": int, "benchmark": bool,
    # pytorch-lightning 1.x names, translated by trainer_config_from_args
    "gpus": str, "resume_from_checkpoint": str,
}


def add_trainer_arguments(parser):
    group = parser.add_argument_group("trainer (pytorch_lightning.Trainer arguments)")
    for name, kind in TRAINER_ARGS.items():
        if kind is bool:
            group.add_argument(f"--{name}", type=str2bool, default=None)  # a typo is an error, not False
        else:
            group.add_argument(f"--{name}", type=kind, default=None)


def nondefault_trainer_args(opt):
    return sorted(k for k in TRAINER_ARGS if getattr(opt, k) is not None)


TRAINER_PARAMETERS = inspect.signature(Trainer.__init__).parameters  # what a lightning.trainer key may name
EXAMPLE_CONFIG = "configs/embedded/procedural-t2i.yaml"
OVERRIDE_HINT = "config overrides are written KEY=VALUE, e.g. data.params.batch_size=4"


def check_overrides(parser, args):
    """The arguments the parser does not know must be config overrides KEY=VALUE (merged over
    the --base configs); anything else is a mistyped flag or a stray word: one error line."""
    options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            name = arg.split("=", 1)[0]
            key = name[2:] if name.startswith("--") else None
            if key in ("logger", "callbacks"):
                parser.error(f"unknown option {name}: main.py builds the trainer's {key} from the config's "
                             f"lightning.{key} section")
            if key in TRAINER_PARAMETERS and key != "self":  # Lightning 1 took each as a flag
                parser.error(f"unknown option {name}: pass it as a config override, lightning.trainer.{key}=VALUE "
                             "(main.py's flags are the trainer options of --help)")
            close = difflib.get_close_matches(name if name.startswith("-") else "--" + name, options, n=1)
            if arg.startswith("-"):
                parser.error(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close
                                                         else f" ({OVERRIDE_HINT})"))
            parser.error(f"unexpected argument {arg!r} ({OVERRIDE_HINT}"
                         + (f"; or did you mean {close[0]}?)" if close else ")"))


def _one_line(error):
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return f"{error.problem}" + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    return " ".join(str(error).split()) or type(error).__name__


def load_config(parser, paths, overrides):
    """The --base configs merged left to right, then the KEY=VALUE overrides; exits through
    parser.error (one line) unless the result names a model and its data to train on."""
    if not paths:
        parser.error(f"no --base config given (pass a training config such as {EXAMPLE_CONFIG})")
    for path in paths:
        if not os.path.isfile(path):
            if "=" in path:
                parser.error(f"config not found: {path} (a KEY=VALUE override? --base takes every argument "
                             "up to the next flag: put overrides before --base or after a later flag)")
            parser.error(f"config not found: {path} (pass -b/--base CONFIG.yaml)")
    configs = []
    for path in paths:
        try:
            config = OmegaConf.load(path)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read {path} as YAML: {_one_line(e)}")
        if not isinstance(config, DictConfig):
            parser.error(f"{path} is not a YAML mapping of config sections (model:, data:, lightning:)")
        configs.append(config)
    try:
        given = OmegaConf.from_dotlist(overrides)
        config = OmegaConf.merge(*configs, given)
    except Exception as e:  # omegaconf's errors for an override that does not fit the configs
        parser.error(f"cannot apply the overrides {' '.join(overrides)}: {_one_line(e)}")
    for section in ("model", "data"):
        value = config.get(section)
        if value is None:
            missing = (f"{paths[0]} has no `{section}:` section" if len(paths) == 1
                       else f"none of {', '.join(paths)} has a `{section}:` section")
            parser.error(f"{missing} (pass a training config such as {EXAMPLE_CONFIG})")
        if not isinstance(value, DictConfig) or "target" not in value:
            parser.error(f"the `{section}:` section of {', '.join(paths)} has no `target:` "
                         f"(see {EXAMPLE_CONFIG} for the layout)")
        params = value.get("params")
        if params is not None and not isinstance(params, DictConfig):  # e.g. the override model.params=3
            parser.error(f"`{section}.params` must be a mapping of the target's arguments, got {params!r} "
                         f"(see {EXAMPLE_CONFIG} for the layout)")
    check_config_keys(parser, config, [*zip(paths, configs), ("an override", given)])
    learning_rate = config.model.get("base_learning_rate")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        parser.error(f"model.base_learning_rate must be a positive number (the learning rate per sample, which "
                     f"--scale_lr multiplies by the batch size), got {learning_rate!r}")
    return config


#: the keys main.py reads, per section of the merged config ("" the top level; a target's params
#: are checked by the target's own signature)
CONFIG_KEYS = {"": ("model", "data", "lightning", "sampling"), "model": ("target", "params", "base_learning_rate"),
               "data": ("target", "params"), "lightning": ("trainer", "logger", "modelcheckpoint", "callbacks")}


def check_config_keys(parser, config, sources):
    """A key main.py does not read (a misspelt section or override, e.g. lightnig.trainer.max_epochs=1
    or model.base_learing_rate=1e-5) is an error naming where it is set (`sources`: (name, config)
    of each file and of the overrides; a resumed run's own files among them): upstream trained
    without it, and saved it into the run's configs as if it had applied."""
    for section, known in CONFIG_KEYS.items():
        node = config.get(section) if section else config
        for key in node if isinstance(node, DictConfig) else ():
            if key not in known:
                where = f"{section}.{key}" if section else key
                setter = next((name for name, source in sources if OmegaConf.select(source, where) is not None),
                              "the configs")
                close = difflib.get_close_matches(str(key), known, n=1)
                parser.error(f"{setter} sets {where}, which main.py does not read"
                             + (f": did you mean {section + '.' if section else ''}{close[0]}?" if close
                                else f" ({section or 'the top level'} takes {', '.join(known)})"))


def build_model(parser, model_config, paths):
    """The model the config describes, as a LightningModule (ldm's models are plain modules until
    trained: ldm/models/lightning.py). A parameter its class does not take (a misspelt key or
    override) or weights that cannot be loaded are one error line, not a traceback."""
    try:
        return construct(lightning_module(get_obj_from_str(model_config.target)), model_config.get("params", {}),
                         model_config.target)
    except ConfigError as e:
        parser.error(f"{e} (set in {', '.join(paths)} or an override)")
    except ModelError as e:
        parser.error(str(e))


def parse_devices(devices):
    """'2' -> 2, '-1' -> -1 (every GPU), '0,1' -> [0, 1], 'auto' -> 'auto' (Trainer(devices=...) accepts them all)."""
    if isinstance(devices, (int, list)):  # already parsed (a config's devices: [0, 1])
        return devices
    devices = str(devices).strip()
    if devices.removeprefix("-").isdigit():
        return int(devices)
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return devices


def several_devices(trainer_config):
    """Whether the trainer will run on more than one device (`devices` as the command line or the
    config give it; "auto" and -1 are every GPU where the accelerator may be one)."""
    devices = parse_devices(trainer_config.get("devices", "auto"))
    if devices in ("auto", -1):
        return trainer_config.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 1
    return (len(devices) if isinstance(devices, list) else int(devices)) > 1


def new_run_name(logdir, name):
    """`name`, or name-2, name-3 ... where a run in `logdir` has it already: runs are named to the
    second, and two started within one second under one name shared a folder, the second
    overwriting the first's configs and last.ckpt."""
    candidate, n = name, 1
    while os.path.exists(os.path.join(logdir, candidate)):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def weights_alone(path):
    """The error for a checkpoint of weights alone (an export, an every-n-steps checkpoint) given to resume."""
    return (f"it holds the weights alone, no optimizer state to resume; to train on from its weights in a new run, "
            f"pass --base CONFIG.yaml model.params.ckpt_path={path}")


def check_resumable_file(parser, path):
    """--resume FILE: a checkpoint of a run (logs/<run>/checkpoints/*.ckpt), so that there is a run to
    continue (upstream took the folder two levels up as the run: its configs, and the place to log into)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if folder == "trainstep_checkpoints":  # main.py's metrics_over_trainsteps_checkpoint
        parser.error(f"--resume {path}: an every-n-steps checkpoint: {weights_alone(path)}")
    if folder != "checkpoints":
        parser.error(f"--resume {path}: not a checkpoint of a run (logs/<run>/checkpoints/*.ckpt), so there is no "
                     f"run to continue; to train on from it in a new run, pass --base CONFIG.yaml "
                     f"--resume_from_checkpoint {path} (-n NAME names the run)")


def check_run_folder(parser, path):
    """--resume FOLDER: a run's folder (it has configs/ or checkpoints/), not the folder of the runs."""
    if any(os.path.isdir(os.path.join(path, part)) for part in ("configs", "checkpoints")):
        return
    runs = sorted(p for p in glob.glob(os.path.join(path, "*"))
                  if os.path.isdir(os.path.join(p, "configs")) or os.path.isdir(os.path.join(p, "checkpoints")))
    if runs:
        parser.error(f"--resume {path}: a folder of runs, not a run; pass one of them, e.g. {runs[-1]}")
    parser.error(f"--resume {path}: not a run's folder (it has no configs/ or checkpoints/); pass a run's log "
                 f"folder (logs/<run>) or a checkpoint in it (logs/<run>/checkpoints/last.ckpt)")


def read_resumed(parser, ckpt_path):
    """(state dict, global step) of the checkpoint a run goes on from, read once (mapped) for the
    seed and check_resumable; None and 0 for a new run and for what cannot be read (Lightning
    reads the file again, and reports what is wrong with it). A file of weights alone (an export,
    an every-n-steps checkpoint) is one error line: Lightning's KeyError came after the run's folder
    was written."""
    if ckpt_path is None:
        return None, 0
    no_step = "no global step read from %s (%s): seeding with --seed alone"
    try:
        checkpoint = read_checkpoint(ckpt_path, mapped=True)
    except CheckpointError as e:
        logger.warning(no_step, ckpt_path, e)
        return None, 0
    if isinstance(checkpoint, dict) and "optimizer_states" not in checkpoint:
        parser.error(f"{ckpt_path}: {weights_alone(ckpt_path)}")
    try:
        step = int(checkpoint.get("global_step") or 0)
    except (AttributeError, TypeError, ValueError) as e:  # its weights are still checked against the model
        logger.warning(no_step, ckpt_path, e)
        step = 0
    try:
        return state_dict_of(checkpoint, ckpt_path), step
    except CheckpointError:
        return None, step


def check_resumable(parser, model, saved, ckpt_path, flag):
    """A checkpoint to go on from whose weights (`saved`) do not fit the model its configs build now (a
    KEY=VALUE override, or a code change since the run saved it): one error line before training,
    not Lightning's RuntimeError listing every key once the trainer has started. The EMA of a part
    the checkpoint does not average (on_load_checkpoint fills it) is no misfit."""
    saved = with_ema_of_parts_not_held(model, saved)
    expected = model.state_dict()
    misfits = {"missing": [k for k in expected if k not in saved],
               "not in this model": [k for k in saved if k not in expected],
               "of other shapes": [k for k in expected if k in saved and saved[k].shape != expected[k].shape]}
    if any(misfits.values()):
        told = "; ".join(f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in misfits.items() if keys)
        parser.error(f"{flag} {ckpt_path}: its weights do not fit the model the configs build: {told}; were the "
                     "configs or KEY=VALUE overrides changed since the run saved it?")


def _admits(annotation, value):
    """Whether a trainer option annotated `annotation` takes `value`, judged for the plain types a
    YAML or KEY=VALUE override gives (bool, int, float, str, None); anything else is taken."""
    if annotation is typing.Any or annotation is inspect.Parameter.empty:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        return any(_admits(a, value) for a in typing.get_args(annotation))
    kinds = (int, float) if annotation is float else (annotation,)  # an int is a float (PEP 484)
    if not all(kind in (bool, int, float, str, type(None)) for kind in kinds):
        return True  # a class, list[int], a timedelta ...: not judged here
    return isinstance(value, kinds)


def _taken(annotation):
    """Union[Literal[16, 32], Literal['bf16'], None] -> "16, 32, 'bf16' or None"."""
    def flat(a):
        if typing.get_origin(a) is typing.Union:
            return [word for b in typing.get_args(a) for word in flat(b)]
        if typing.get_origin(a) is typing.Literal:
            return [repr(v) for v in typing.get_args(a)]
        return ["None" if a is type(None) else getattr(a, "__name__", str(a))]
    words = flat(annotation)
    return " or ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " or " + words[-1]


def values_the_trainer_does_not_take(trainer_config):
    """'max_steps=\'abc\' (takes int)' for each option whose value is of a type its Trainer
    annotation rules out: Lightning's own error does not say which option it was ("'<' not
    supported between instances of 'str' and 'int'"), and some come only once training starts."""
    return [f"{key}={value!r} (takes {_taken(TRAINER_PARAMETERS[key].annotation)})"
            for key, value in trainer_config.items()
            if key in TRAINER_PARAMETERS and not _admits(TRAINER_PARAMETERS[key].annotation, value)]


def trainer_config_from_args(trainer_config):
    """Translate pytorch-lightning 1.x trainer options into 2.x ones, in place.

    gpus=N / "0,1," -> accelerator="gpu", devices=N / [0, 1] (gpus=0: the CPU); resume_from_checkpoint is returned
    (it is an argument of Trainer.fit in 2.x). Float limits that are whole numbers become
    batch counts (int), as in 1.x, and so do whole floats of options that take an int (YAML's 1e6).
    """
    gpus = trainer_config.pop("gpus", None)
    if gpus is not None:
        # as in 1.x: "0," (upstream's training command) is the GPU with id 0, 0 is no GPU
        devices = parse_devices(str(gpus).strip())
        if devices:
            trainer_config["accelerator"] = "gpu"
            trainer_config["devices"] = devices
        else:
            trainer_config["accelerator"] = "cpu"
    if "devices" in trainer_config:
        trainer_config["devices"] = parse_devices(trainer_config["devices"])
    for key in ("limit_train_batches", "limit_val_batches", "val_check_interval"):
        value = trainer_config.get(key)
        if isinstance(value, float) and value.is_integer() and value > 1:
            trainer_config[key] = int(value)
    for key, value in trainer_config.items():  # YAML reads 1e6 as a float: a count Lightning takes
        if isinstance(value, float) and value.is_integer() and key in TRAINER_PARAMETERS:
            annotation = TRAINER_PARAMETERS[key].annotation
            if not _admits(annotation, value) and _admits(annotation, int(value)):
                trainer_config[key] = int(value)
    return trainer_config.pop("resume_from_checkpoint", None)


def image_side_multiple(model):
    """Training images' H and W must be multiples of this: an autoencoder's encoder (the first
    stage of an LDM, or the model being trained) and each UNet level halve them, and a side
    that does not halve evenly comes back a pixel short where the decoder meets its skip
    connection or the reconstruction meets its input (a RuntimeError at the first step)."""
    multiple = 1
    encoder = getattr(getattr(model, "first_stage_model", model), "encoder", None)
    if hasattr(encoder, "num_resolutions"):  # ldm's Encoder (KL and VQ autoencoders); not the identity
        multiple *= 2 ** (encoder.num_resolutions - 1)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if hasattr(unet, "channel_mult"):
        multiple *= 2 ** (len(unet.channel_mult) - 1)
    return multiple


def build_section(parser, section, config):
    """A logger or callback of the config's lightning section; a misspelt target or parameter is one
    error line naming the section (upstream's traceback)."""
    try:
        return instantiate_from_config(config)
    except ConfigError as e:
        parser.error(f"{section}: {e}")


def build_data(parser, data_config):
    """The data module with its datasets built. Upstream's LSUN and ImageNet configs read file
    lists and folders under data/ that a fresh clone lacks, and ImageNet's dataset imports packages
    this fork does not install (albumentations, cv2, taming, torchvision): each is one error line."""
    try:
        data = instantiate_from_config(data_config)
        # NOTE according to https://pytorch-lightning.readthedocs.io/en/latest/datamodules.html
        # calling these ourselves should not be necessary but it is.
        # lightning still takes care of proper multiprocessing though
        data.prepare_data()
        data.setup()
    except ConfigError as e:  # a misspelt target or parameter
        parser.error(f"data: {e}")
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        parser.error(f"the data needs the package {top} (pip install {pip_name(top)})")
    except FileNotFoundError as e:  # an OSError's (strerror, filename), or a library's message alone
        detail = f"{e.strerror}: {e.filename}" if e.filename else first_line(e)
        parser.error(f"the data cannot be read: {detail} (the config's data.params say where it is read from)")
    return data


def check_data(parser, model, datasets):
    """The data fits the model, checked on each split's first sample: one error line before
    training instead of an error at the first step.

    The keys the model reads from a batch (model.params.first_stage_key, cond_stage_key for a
    conditional model, an autoencoder's image_key) are in the samples (SD's jpg/txt against a
    dataset of image/caption is the usual mismatch), and the images' sides are multiples of
    `image_side_multiple` (iterable datasets are not sampled)."""
    wanted = {name: getattr(model, name) for name in ("first_stage_key", "image_key") if hasattr(model, name)}
    if getattr(getattr(model, "model", None), "conditioning_key", None) is not None:
        wanted["cond_stage_key"] = model.cond_stage_key
    multiple = image_side_multiple(model)
    for split, dataset in datasets.items():
        if isinstance(dataset, IterableDataset) or len(dataset) == 0:
            continue
        sample = dataset[0]
        if not isinstance(sample, dict):
            continue
        for name, key in wanted.items():
            if key not in sample:
                parser.error(f"the {split} data has no {key!r}, which the model reads (model.params.{name}); its "
                             f"samples have {', '.join(map(repr, sample))}: pass model.params.{name}=<one of them>")
        for name in ("first_stage_key", "image_key"):
            shape = getattr(sample.get(wanted.get(name)), "shape", ())
            if len(shape) == 3 and (shape[0] % multiple or shape[1] % multiple):  # (H, W, C), as ldm's data
                height, width = shape[:2]
                sizes = sorted({max(multiple, round(side / multiple) * multiple) for side in (height, width)})
                parser.error(f"the {split} data's images ({wanted[name]!r}) are {width}x{height} pixels, but this model "
                             f"takes sides that are multiples of {multiple} (its first stage and UNet levels halve "
                             f"them): resize or crop the data to sides such as {' or '.join(map(str, sizes))} "
                             f"(ldm's datasets take a size parameter, e.g. data.params.{split}.params.size)")


def interactive_debugger():
    """pudb where installed (upstream's choice), else the standard library's pdb: SIGUSR2 or a
    crash under --debug opens one instead of raising ImportError into the training step."""
    try:
        import pudb as debugger
    except ImportError:
        import pdb as debugger
    return debugger


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset"""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def worker_init_fn(_):
    worker_info = torch.utils.data.get_worker_info()

    dataset = worker_info.dataset
    worker_id = worker_info.id

    if isinstance(dataset, Txt2ImgIterableBaseDataset):
        # every num_workers-th record (upstream's equal slices left the last num_records % num_workers
        # records to no worker)
        dataset.sample_ids = dataset.valid_ids[worker_id::worker_info.num_workers]
        current_id = np.random.choice(len(np.random.get_state()[1]), 1)
        return np.random.seed(np.random.get_state()[1][current_id] + worker_id)
    else:
        return np.random.seed(np.random.get_state()[1][0] + worker_id)


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, validation=None, test=None, predict=None,
                 wrap=False, num_workers=None, shuffle_test_loader=False, use_worker_init_fn=False,
                 shuffle_val_dataloader=False):
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            whole = type(value) is int and value >= least  # True is no batch size
            if not whole and not (name == "num_workers" and value is None):  # None: twice the batch size
                # else a traceback from the loader, once the run's folder is written
                raise ConfigError(f"data.params.{name} must be a whole number of at least {least}, got {value!r}")
        self.batch_size = batch_size
        self.dataset_configs = dict()
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        if train is not None:
            self.dataset_configs["train"] = train
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.dataset_configs["validation"] = validation
            self.val_dataloader = partial(self._val_dataloader, shuffle=shuffle_val_dataloader)
        if test is not None:
            self.dataset_configs["test"] = test
            self.test_dataloader = partial(self._test_dataloader, shuffle=shuffle_test_loader)
        if predict is not None:
            self.dataset_configs["predict"] = predict
            self.predict_dataloader = self._predict_dataloader
        self.wrap = wrap

    def prepare_data(self):
        for data_cfg in self.dataset_configs.values():
            instantiate_from_config(data_cfg)

    def setup(self, stage=None):
        self.datasets = dict(
            (k, instantiate_from_config(self.dataset_configs[k]))
            for k in self.dataset_configs)
        if self.wrap:
            for k in self.datasets:
                self.datasets[k] = WrappedDataset(self.datasets[k])

    def _train_dataloader(self):
        is_iterable_dataset = isinstance(self.datasets['train'], Txt2ImgIterableBaseDataset)
        if is_iterable_dataset or self.use_worker_init_fn:
            init_fn = worker_init_fn
        else:
            init_fn = None
        return DataLoader(self.datasets["train"], batch_size=self.batch_size,
                          num_workers=self.num_workers, shuffle=False if is_iterable_dataset else True,
                          worker_init_fn=init_fn)

    def _val_dataloader(self, shuffle=False):
        if isinstance(self.datasets['validation'], Txt2ImgIterableBaseDataset) or self.use_worker_init_fn:
            init_fn = worker_init_fn
        else:
            init_fn = None
        return DataLoader(self.datasets["validation"],
                          batch_size=self.batch_size,
                          num_workers=self.num_workers,
                          worker_init_fn=init_fn,
                          shuffle=shuffle)

    def _test_dataloader(self, shuffle=False):
        is_iterable_dataset = isinstance(self.datasets['train'], Txt2ImgIterableBaseDataset)
        if is_iterable_dataset or self.use_worker_init_fn:
            init_fn = worker_init_fn
        else:
            init_fn = None

        # do not shuffle dataloader for iterable dataset
        shuffle = shuffle and (not is_iterable_dataset)

        return DataLoader(self.datasets["test"], batch_size=self.batch_size,
                          num_workers=self.num_workers, worker_init_fn=init_fn, shuffle=shuffle)

    def _predict_dataloader(self, shuffle=False):
        if isinstance(self.datasets['predict'], Txt2ImgIterableBaseDataset) or self.use_worker_init_fn:
            init_fn = worker_init_fn
        else:
            init_fn = None
        return DataLoader(self.datasets["predict"], batch_size=self.batch_size,
                          num_workers=self.num_workers, worker_init_fn=init_fn)


class SetupCallback(Callback):
    def __init__(self, resume, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config
        self.lightning_config = lightning_config

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            # Create logdirs and save configs
            os.makedirs(self.logdir, exist_ok=True)
            os.makedirs(self.ckptdir, exist_ok=True)
            os.makedirs(self.cfgdir, exist_ok=True)

            if "callbacks" in self.lightning_config:
                if 'metrics_over_trainsteps_checkpoint' in self.lightning_config['callbacks']:
                    os.makedirs(os.path.join(self.ckptdir, 'trainstep_checkpoints'), exist_ok=True)
            logger.info("Project config\n%s", OmegaConf.to_yaml(self.config))
            OmegaConf.save(self.config,
                           os.path.join(self.cfgdir, "{}-project.yaml".format(self.now)))

            logger.info("Lightning config\n%s", OmegaConf.to_yaml(self.lightning_config))
            OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                           os.path.join(self.cfgdir, "{}-lightning.yaml".format(self.now)))

        else:
            # ModelCheckpoint callback created log directory --- remove it
            if not self.resume and os.path.exists(self.logdir):
                dst, name = os.path.split(self.logdir)
                dst = os.path.join(dst, "child_runs", name)
                os.makedirs(os.path.split(dst)[0], exist_ok=True)
                try:
                    os.rename(self.logdir, dst)
                except FileNotFoundError:
                    pass


@contextmanager
def evaluation_mode(module):
    """`module` in eval mode, then every submodule back in the mode it was in. Upstream called
    train() afterwards, which also switched what trains in eval mode to train mode: an
    autoencoder's LPIPS (its dropout), after the first image log, made the perceptual loss random."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class ImageLogger(Callback):
    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True,
                 rescale=True, disabled=False, log_on_batch_idx=False, log_first_step=False,
                 log_images_kwargs=None):
        super().__init__()
        self.rescale = rescale
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.logger_log_images = {
            pl.loggers.TensorBoardLogger: self._tensorboard,
        }
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)]
        if not increase_log_steps:
            self.log_steps = [self.batch_freq]
        self.clamp = clamp
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_images_kwargs = log_images_kwargs if log_images_kwargs else {}
        self.log_first_step = log_first_step

    def check_arguments(self, pl_module):
        """One line saying what is wrong with `log_images_kwargs` for this model, or None.

        Checked before training starts: images are first logged after `batch_frequency` steps,
        too late to learn that a name in the config was misspelt."""
        signature = inspect.signature(pl_module.log_images)
        try:
            signature.bind_partial(None, **self.log_images_kwargs)
        except TypeError as e:
            return (f"ImageLogger log_images_kwargs: {e} for {type(pl_module).__name__}.log_images; "
                    f"it takes {', '.join(list(signature.parameters)[1:])}")
        return None

    @rank_zero_only
    def _tensorboard(self, pl_module, images, batch_idx, split):
        for k in images:
            grid = make_grid(images[k])
            grid = (grid + 1.0) / 2.0  # -1,1 -> 0,1; c,h,w

            tag = f"{split}/{k}"
            pl_module.logger.experiment.add_image(
                tag, grid,
                global_step=pl_module.global_step)

    @rank_zero_only
    def log_local(self, save_dir, split, images,
                  global_step, current_epoch, batch_idx):
        root = os.path.join(save_dir, "images", split)
        for k in images:
            grid = make_grid(images[k], nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0  # -1,1 -> 0,1; c,h,w
            grid = grid.transpose(0, 1).transpose(1, 2).squeeze(-1)
            grid = grid.numpy()
            grid = (grid * 255).astype(np.uint8)
            filename = "{}_gs-{:06}_e-{:06}_b-{:06}.png".format(
                k,
                global_step,
                current_epoch,
                batch_idx)
            path = os.path.join(root, filename)
            os.makedirs(os.path.split(path)[0], exist_ok=True)
            Image.fromarray(grid).save(path)

    def log_img(self, pl_module, batch, batch_idx, split="train"):
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if (self.check_frequency(check_idx) and  # batch_idx % self.batch_freq == 0
                hasattr(pl_module, "log_images") and
                callable(pl_module.log_images) and
                self.max_images > 0):
            logger_type = type(pl_module.logger)

            with torch.no_grad(), evaluation_mode(pl_module):
                images = pl_module.log_images(batch, **self.log_images_kwargs)

            for k in images:
                if images[k].dim() == 4:  # a batch; 3-D entries are ready-made grids
                    images[k] = images[k][:self.max_images]
                if isinstance(images[k], torch.Tensor):
                    images[k] = images[k].detach().cpu()
                    if self.clamp:
                        images[k] = torch.clamp(images[k], -1., 1.)

            self.log_local(pl_module.logger.log_dir, split, images,
                           pl_module.global_step, pl_module.current_epoch, batch_idx)

            logger_log_images = self.logger_log_images.get(logger_type, lambda *args, **kwargs: None)
            logger_log_images(pl_module, images, pl_module.global_step, split)

    def check_frequency(self, check_idx):
        if ((check_idx % self.batch_freq) == 0 or (check_idx in self.log_steps)) and (
                check_idx > 0 or self.log_first_step):
            try:
                self.log_steps.pop(0)
            except IndexError:
                pass
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.disabled and pl_module.global_step > 0:
            self.log_img(pl_module, batch, batch_idx, split="val")


class CUDACallback(Callback):
    # see https://github.com/SeanNaren/minGPT/blob/master/mingpt/callback.py
    # Only added when training on CUDA.
    def on_train_epoch_start(self, trainer, pl_module):
        # Reset the memory use counter
        device = trainer.strategy.root_device
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        device = trainer.strategy.root_device
        torch.cuda.synchronize(device)
        max_memory = torch.cuda.max_memory_allocated(device) / 2 ** 20
        epoch_time = time.time() - self.start_time

        max_memory = trainer.strategy.reduce(torch.tensor(max_memory, device=device)).item()
        epoch_time = trainer.strategy.reduce(torch.tensor(epoch_time, device=device)).item()
        rank_zero_info(f"Average Epoch time: {epoch_time:.2f} seconds")
        rank_zero_info(f"Average Peak memory {max_memory:.2f}MiB")


class TimeOfThisCommand(Timer):
    """lightning.trainer.max_time, counted from this command's start. Lightning's own Timer adds the
    time a resumed run had spent before, so a --resume of a run that max_time stopped (every run of
    scripts/gpu_train_embedded.sh) trained no step and ended as if done; max_time is set here to fit
    one command into a lease or a job slot."""

    def load_state_dict(self, state_dict):
        pass


def stopped_by_sigterm(trainer, training_start, logdir):
    """Say what a SIGTERM left (TrainingStart saved last.ckpt if a step was trained); True unless the
    training had just reached its end (Lightning raises at the end of the epoch even then)."""
    if trainer.fit_loop.done:
        logger.warning("SIGTERM arrived as the training ended at step %d: the run is complete (no test is run)",
                       trainer.global_step)
        return False
    last = os.path.join(logdir, "checkpoints", "last.ckpt")
    if training_start.trained(trainer):
        left = f"saved; --resume {logdir} continues it"
    elif os.path.isfile(last):
        left = f"no step trained by this command; --resume {logdir} continues from its last.ckpt"
    else:
        left = "no step trained, nothing saved"
    logger.warning("stopped by SIGTERM at step %d: %s", trainer.global_step, left)
    return True


def save_last(trainer, ckptdir):
    """checkpoints/last.ckpt, with the optimizer state (--resume continues it). Called on every
    rank: Lightning writes the file on rank 0 and then waits for all ranks (upstream called it on
    rank 0 alone, and a run on several devices failed at its end)."""
    last = os.path.join(ckptdir, "last.ckpt")
    if trainer.global_rank == 0:
        logger.info("Saving %s at step %d.", last, trainer.global_step)
    trainer.save_checkpoint(last, weights_only=False)


class TrainingStart(Callback):
    """The step at which this process began to train, after a --resume restored its state (None
    before): what a failure or Ctrl-C may save is only what was trained since. Upstream saved on
    Ctrl-C whatever the model held, so interrupting a --resume before its checkpoint was restored
    wrote an untrained model over the run's last.ckpt."""
    step = None

    def __init__(self, ckptdir):
        self.ckptdir = ckptdir

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step

    def trained(self, trainer):
        return self.step is not None and trainer.global_step > self.step

    def on_exception(self, trainer, pl_module, exception):
        # Lightning exits after Ctrl-C, and at the end of the step a SIGTERM arrives in (kill, timeout,
        # a scheduler's stop), once the callbacks have run: the last chance to save
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and self.trained(trainer):
            save_last(trainer, self.ckptdir)


class OneLastCheckpoint(Callback):
    """checkpoints/last.ckpt stays the run's one last checkpoint after the run folder was moved or
    copied (runs come back from GPU machines) and resumed there. Lightning restores where its
    ModelCheckpoint last saved only if the folder is unchanged; otherwise it wrote last-v1.ckpt
    beside the old last.ckpt, which the next --resume read: the steps between were lost."""

    def __init__(self, ckptdir):
        self.ckptdir = ckptdir

    def on_train_start(self, trainer, pl_module):  # after the resumed state was restored
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last and callback.dirpath \
                    and os.path.realpath(callback.dirpath) == os.path.realpath(self.ckptdir):
                callback.last_model_path = os.path.join(
                    callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)


class SaveOnSignal(Callback):
    """SIGUSR1 (SLURM's warning before it pre-empts a job) asks for last.ckpt, written at the end
    of the training step it arrives in. Upstream saved inside the signal handler, which can run
    while validation or image logging has the EMA weights swapped in: they were saved as the
    trained weights. The request is agreed on by all ranks, which may see the signal at
    different steps, so that they save together."""
    requested = False

    def __init__(self, ckptdir):
        self.ckptdir = ckptdir

    def request(self, *args):
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = False
            save_last(trainer, self.ckptdir)


if __name__ == "__main__":
    # custom parser to specify config files, train, test and debug mode,
    # postfix, resume.
    # `--key value` arguments are the flags below (trainer ones: TRAINER_ARGS).
    # `nested.key=value` arguments are interpreted as config parameters; anything else is an error.
    # configs are merged from left-to-right followed by command line parameters.

    # model:
    #   base_learning_rate: float
    #   target: path to lightning module
    #   params:
    #       key: value
    # data:
    #   target: main.DataModuleFromConfig
    #   params:
    #      batch_size: int
    #      wrap: bool
    #      train:
    #          target: path to train dataset
    #          params:
    #              key: value
    #      validation:
    #          target: path to validation dataset
    #          params:
    #              key: value
    #      test:
    #          target: path to test dataset
    #          params:
    #              key: value
    # lightning: (optional, has sane defaults and can be specified on cmdline)
    #   trainer:
    #       additional arguments to trainer
    #   logger:
    #       logger to instantiate
    #   modelcheckpoint:
    #       modelcheckpoint to instantiate
    #   callbacks:
    #       callback1:
    #           target: importpath
    #           params:
    #               key: value

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # add cwd for convenience and to make classes in this file available when
    # running as `python main.py`
    # (in particular `main.DataModuleFromConfig`)
    sys.path.append(os.getcwd())

    parser = get_parser()

    opt, unknown = parser.parse_known_args()
    check_overrides(parser, unknown)
    if opt.project:
        logger.warning("-p/--project has no effect (nor had it upstream): a run's folder is --logdir/<time>_<name>, "
                       "named with -n/--name, or the run given to --resume")
    if opt.name and opt.resume:
        parser.error("-n/--name and -r/--resume cannot be specified both. "
                     "If you want to resume training in a new log folder, "
                     "use -n/--name in combination with --resume_from_checkpoint")
    if opt.resume:
        if not os.path.exists(opt.resume):
            parser.error(f"--resume {opt.resume}: not found; pass a run's log folder (logs/<run>) or a checkpoint "
                         f"in it (logs/<run>/checkpoints/last.ckpt)")
        for flag, name in (("-l/--logdir", "logdir"), ("-f/--postfix", "postfix")):
            if getattr(opt, name) != parser.get_default(name):
                parser.error(f"{flag} names a new run's folder, but --resume continues the run in its own; leave "
                             f"{flag} out, or train on in a new run with --base CONFIG.yaml --resume_from_checkpoint CKPT")
        if os.path.isfile(opt.resume):
            check_resumable_file(parser, opt.resume)
            ckpt = os.path.abspath(opt.resume)
            logdir = os.path.dirname(os.path.dirname(ckpt))
        else:
            check_run_folder(parser, opt.resume)
            logdir = os.path.abspath(opt.resume)
            ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        others = [path for path in sorted(glob.glob(os.path.join(logdir, "checkpoints", "*.ckpt"))) if path != ckpt]
        way_out = f"pass one of its other checkpoints instead: {', '.join(others)}" if others else "start a new run"
        if not os.path.isfile(ckpt):
            parser.error(f"--resume {opt.resume}: no checkpoints/last.ckpt in it (the run stopped before it saved "
                         f"one); {way_out}")
        damaged = incomplete_checkpoint(ckpt)
        if damaged:  # Lightning would fail on it with a traceback, after building the model
            parser.error(f"--resume {opt.resume}: {damaged} {way_out[0].upper()}{way_out[1:]}")
        opt.resume_from_checkpoint = ckpt
        base_configs = sorted(glob.glob(os.path.join(logdir, "configs/*.yaml")))
        if not base_configs and not opt.base:
            parser.error(f"no configs in {os.path.join(logdir, 'configs')} to resume from (pass --base CONFIG.yaml)")
        opt.base = base_configs + opt.base
        nowname = os.path.basename(logdir)
    else:
        if opt.name:
            name = "_" + opt.name
        elif opt.base:
            cfg_fname = os.path.split(opt.base[0])[-1]
            cfg_name = os.path.splitext(cfg_fname)[0]
            name = "_" + cfg_name
        else:
            name = ""
        nowname = new_run_name(opt.logdir, now + name + opt.postfix)
        logdir = os.path.join(opt.logdir, nowname)
    config = load_config(parser, opt.base, unknown)
    if not opt.train and (opt.no_test or "test" not in config.data.get("params", {})):
        skipped = "test data, which --no-test skips" if opt.no_test else "data.params.test, which it has none of"
        parser.error(f"nothing to run: main.py trains with -t (--train); without it it only tests on the "
                     f"config's {skipped}")

    ckptdir = os.path.join(logdir, "checkpoints")
    cfgdir = os.path.join(logdir, "configs")

    trainer = None
    try:
        lightning_config = config.pop("lightning", OmegaConf.create())
        # merge trainer cli with config
        trainer_config = lightning_config.get("trainer", OmegaConf.create())
        for k in nondefault_trainer_args(opt):
            trainer_config[k] = getattr(opt, k)
        trainer_config = OmegaConf.to_container(trainer_config, resolve=True)
        ckpt_path = trainer_config_from_args(trainer_config)
        if ckpt_path is not None and not opt.resume:  # --resume checked its checkpoint above
            problem = incomplete_checkpoint(ckpt_path) if os.path.isfile(ckpt_path) else "not found"
            if problem:
                parser.error(f"--resume_from_checkpoint {ckpt_path}: {problem}")
        # the global step is added to --seed: a resumed run starts its epoch over (the procedural loader
        # cannot be fast-forwarded), and with the same seed it drew again the very scenes, timesteps
        # and noise of the steps it had trained
        saved, resumed_step = read_resumed(parser, ckpt_path)
        seed_everything(opt.seed + resumed_step)
        max_steps = trainer_config.get("max_steps")
        if opt.train and isinstance(max_steps, int) and 0 <= max_steps <= resumed_step:
            # a run's saved lightning config keeps the --max_steps it was started with
            parser.error(f"{'--resume' if opt.resume else '--resume_from_checkpoint'} {opt.resume or ckpt_path}: "
                         f"it is at step {resumed_step} and max_steps is {max_steps}, so no step would be trained; "
                         f"pass --max_steps N above {resumed_step} to train on")
        misfits = values_the_trainer_does_not_take(trainer_config)
        if misfits:  # else a traceback, some once the run's folder is written
            parser.error(f"lightning.trainer: {'; '.join(misfits)}")
        if any(word in str(trainer_config.get("strategy", "")) for word in ("spawn", "fork", "notebook")):
            parser.error(f"--strategy {trainer_config['strategy']}: main.py saves last.ckpt from its own process, "
                         "which a strategy that trains in spawned or forked ones leaves untrained; use --strategy ddp")
        if trainer_config.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
            parser.error(f"the trainer asks for a GPU (accelerator {trainer_config['accelerator']!r}, from "
                         "--accelerator or --gpus) but CUDA is not available here; train on the CPU with "
                         "--accelerator cpu and without --gpus")
        on_cuda = trainer_config.get("accelerator") in ("gpu", "cuda") or (
            trainer_config.get("accelerator", "auto") == "auto" and torch.cuda.is_available())
        lightning_config.trainer = trainer_config

        # model
        model = build_model(parser, config.model, opt.base)
        if saved is not None:
            check_resumable(parser, model, saved, ckpt_path, "--resume" if opt.resume else "--resume_from_checkpoint")
            del saved  # views of the mapped file, not kept through training
        accumulate_grad_batches = trainer_config.get("accumulate_grad_batches", 1)
        if not model.automatic_optimization:
            # Lightning 2 accumulates and clips only for automatic optimization (and refuses the
            # settings otherwise): models that step their optimizers themselves do it themselves
            model.accumulate_grad_batches = trainer_config.pop("accumulate_grad_batches", 1)
            for setting in ("gradient_clip_val", "gradient_clip_algorithm"):
                setattr(model, setting, trainer_config.pop(setting, None))
            if trainer_config.get("strategy", "auto") in ("auto", "ddp") and several_devices(trainer_config):
                # each optimizer's pass leaves the other's parameters without gradients, which DDP
                # refuses unless told to look for them (Lightning 1.4, upstream's, looked by default)
                trainer_config["strategy"] = "ddp_find_unused_parameters_true"

        # trainer and callbacks
        trainer_kwargs = dict()

        # default logger configs (CSV needs no extra package; tensorboard/wandb are optional)
        default_logger_cfgs = {
            "wandb": {
                "target": "pytorch_lightning.loggers.WandbLogger",
                "params": {
                    "name": nowname,
                    "save_dir": logdir,
                    "offline": opt.debug,
                    "id": nowname,
                }
            },
            "tensorboard": {
                "target": "pytorch_lightning.loggers.TensorBoardLogger",
                "params": {
                    "name": "tensorboard",
                    "save_dir": logdir,
                }
            },
            "csv": {
                "target": "pytorch_lightning.loggers.CSVLogger",
                "params": {
                    "name": "csv",
                    "save_dir": logdir,
                }
            },
        }
        default_logger_cfg = default_logger_cfgs["csv"]
        if "logger" in lightning_config:
            logger_cfg = lightning_config.logger
        else:
            logger_cfg = OmegaConf.create()
        logger_cfg = OmegaConf.merge(default_logger_cfg, logger_cfg)
        trainer_kwargs["logger"] = build_section(parser, "lightning.logger", logger_cfg)

        # modelcheckpoint - use TrainResult/EvalResult(checkpoint_on=metric) to
        # specify which metric is used to determine best models
        default_modelckpt_cfg = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {
                "dirpath": ckptdir,
                "filename": "{epoch:06}",
                "verbose": True,
                "save_last": True,
            }
        }
        if hasattr(model, "monitor"):
            default_modelckpt_cfg["params"]["monitor"] = model.monitor
            default_modelckpt_cfg["params"]["save_top_k"] = 3

        if "modelcheckpoint" in lightning_config:
            modelckpt_cfg = lightning_config.modelcheckpoint
        else:
            modelckpt_cfg = OmegaConf.create()
        modelckpt_cfg = OmegaConf.merge(default_modelckpt_cfg, modelckpt_cfg)

        # add callback which sets up log directory
        default_callbacks_cfg = {
            "setup_callback": {
                "target": "main.SetupCallback",
                "params": {
                    "resume": opt.resume,
                    "now": now,
                    "logdir": logdir,
                    "ckptdir": ckptdir,
                    "cfgdir": cfgdir,
                    "config": config,
                    "lightning_config": lightning_config,
                }
            },
            "image_logger": {
                "target": "main.ImageLogger",
                "params": {
                    "batch_frequency": 750,
                    "max_images": 4,
                    "clamp": True
                }
            },
            "learning_rate_logger": {
                "target": "main.LearningRateMonitor",
                "params": {
                    "logging_interval": "step",
                    # "log_momentum": True
                }
            },
            "checkpoint_callback": modelckpt_cfg,
        }
        if on_cuda:
            default_callbacks_cfg["cuda_callback"] = {"target": "main.CUDACallback"}

        if "callbacks" in lightning_config:
            callbacks_cfg = lightning_config.callbacks
        else:
            callbacks_cfg = OmegaConf.create()

        if 'metrics_over_trainsteps_checkpoint' in callbacks_cfg:
            logger.warning(
                'Caution: Saving checkpoints every n train steps without deleting. This might require some free space.')
            default_metrics_over_trainsteps_ckpt_dict = {
                'metrics_over_trainsteps_checkpoint':
                    {"target": 'pytorch_lightning.callbacks.ModelCheckpoint',
                     'params': {
                         "dirpath": os.path.join(ckptdir, 'trainstep_checkpoints'),
                         "filename": "{epoch:06}-{step:09}",
                         "verbose": True,
                         'save_top_k': -1,
                         'every_n_train_steps': 10000,
                         'save_weights_only': True
                     }
                     }
            }
            default_callbacks_cfg.update(default_metrics_over_trainsteps_ckpt_dict)

        callbacks_cfg = OmegaConf.merge(default_callbacks_cfg, callbacks_cfg)
        if 'ignore_keys_callback' in callbacks_cfg and ckpt_path is not None:
            callbacks_cfg.ignore_keys_callback.params['ckpt_path'] = ckpt_path
        elif 'ignore_keys_callback' in callbacks_cfg:
            del callbacks_cfg['ignore_keys_callback']

        trainer_kwargs["callbacks"] = [build_section(parser, f"lightning.callbacks.{k}", callbacks_cfg[k])
                                       for k in callbacks_cfg]
        for callback in trainer_kwargs["callbacks"]:
            # by attribute: config targets import `main.ImageLogger`, not this __main__'s class
            problem = callback.check_arguments(model) if hasattr(callback, "check_arguments") else None
            if problem:
                parser.error(problem)

        # data: built (which may read file lists, or download) once the cheaper checks above passed, and
        # before the trainer, so that a mistake in it is not reported after Lightning's account of the machine
        data = build_data(parser, config.data)
        check_data(parser, model, data.datasets)
        logger.info("#### Data #####")
        for k in data.datasets:
            logger.info(f"{k}, {data.datasets[k].__class__.__name__}, {len(data.datasets[k])}")

        # LatentDiffusion freezes its first stage (and a fixed text encoder) in eval mode on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        training_start, save_on_signal = TrainingStart(ckptdir), SaveOnSignal(ckptdir)
        trainer_kwargs["callbacks"] += [training_start, save_on_signal, OneLastCheckpoint(ckptdir)]
        try:  # Lightning's words for a trainer option it does not take, or an accelerator it cannot run
            if trainer_config.get("max_time") is not None:
                trainer_kwargs["callbacks"].append(TimeOfThisCommand(duration=trainer_config.pop("max_time"),
                                                                     interval="step"))
            trainer = Trainer(**trainer_config, **trainer_kwargs)
        except (TypeError, ValueError, MisconfigurationException, ModuleNotFoundError) as e:
            parser.error(f"lightning.trainer: {first_line(e)}")
        trainer.logdir = logdir  ###
        if hasattr(model, "monitor"):  # logged once everything is checked: a mistake is the line after the model's
            logger.info(f"Monitoring {model.monitor} as checkpoint metric.")
        logger.info(f"Merged modelckpt-cfg: \n{modelckpt_cfg}")

        # configure learning rate
        bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
        ngpu = trainer.num_devices if on_cuda else 1
        logger.info(f"accumulate_grad_batches = {accumulate_grad_batches}")
        if opt.scale_lr:
            model.learning_rate = accumulate_grad_batches * ngpu * bs * base_lr
            logger.info(
                "Setting learning rate to {:.2e} = {} (accumulate_grad_batches) * {} (num_gpus) * {} (batchsize) * {:.2e} (base_lr)".format(
                    model.learning_rate, accumulate_grad_batches, ngpu, bs, base_lr))
        else:
            model.learning_rate = base_lr
            logger.info("++++ NOT USING LR SCALING ++++")
            logger.info(f"Setting learning rate to {model.learning_rate:.2e}")


        def divein(*args, **kwargs):
            if trainer.global_rank == 0:
                interactive_debugger().set_trace()


        signal.signal(signal.SIGUSR1, save_on_signal.request)
        signal.signal(signal.SIGUSR2, divein)

        # run
        if opt.train:
            try:
                # Lightning resumes with torch.load(weights_only=True); runs whose schedulers set numpy
                # learning rates (before ldm/lr_scheduler.py returned floats) pickled numpy scalars
                with torch.serialization.safe_globals(numpy_safe_globals()):
                    trainer.fit(model, data, ckpt_path=ckpt_path)
            except SIGTERMException:  # Lightning's SystemExit has no code: the run would exit 0, as if done
                if stopped_by_sigterm(trainer, training_start, logdir):
                    raise SystemExit(128 + signal.SIGTERM)
                # else complete: TrainingStart saved last.ckpt as the exception passed
            except Exception:
                # Save what was trained, but only once a step was: a failure before it (a --resume
                # whose checkpoint did not restore, or did only in part) would write an untrained
                # model, or one without its optimizer state, over last.ckpt
                if training_start.trained(trainer):
                    save_last(trainer, ckptdir)
                raise
            else:
                # A run stopped by lightning.trainer.max_time ends between the every_n_train_steps
                # checkpoints; without this its last steps would be lost.
                save_last(trainer, ckptdir)
        has_test = "test" in data.dataset_configs and is_overridden("test_step", model)
        if not opt.no_test and not trainer.interrupted and has_test:
            trainer.test(model, data)
        elif not opt.train:
            logger.warning("nothing was run: without -t (--train) main.py only tests, and %s has no test_step",
                           type(model).__name__)
    except Exception:
        if opt.debug and rank_zero_only.rank == 0:  # also for a crash before the trainer exists (model, data)
            interactive_debugger().post_mortem()
        raise
    finally:
        # move newly created debug project to debug_runs
        if opt.debug and not opt.resume and trainer is not None and trainer.global_rank == 0 \
                and os.path.isdir(logdir):
            dst, name = os.path.split(logdir)
            dst = os.path.join(dst, "debug_runs", name)
            os.makedirs(os.path.split(dst)[0], exist_ok=True)
            os.rename(logdir, dst)
