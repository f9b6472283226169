import importlib
import importlib.util
import logging
import re

import difflib
import glob
import os
import zipfile
from collections import abc

import torch
import numpy as np

from inspect import isfunction
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)


def log_txt_as_img(wh, xc, size=10):
    # wh a tuple of (width, height)
    # xc a list of captions to plot
    b = len(xc)
    txts = list()
    for bi in range(b):
        txt = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(txt)
        font = ImageFont.truetype('data/DejaVuSans.ttf', size=size)
        nc = int(40 * (wh[0] / 256))
        lines = "\n".join(xc[bi][start:start + nc] for start in range(0, len(xc[bi]), nc))

        try:
            draw.text((0, 0), lines, fill="black", font=font)
        except UnicodeEncodeError:
            logger.warning("Cannot encode string for logging. Skipping.")

        txt = np.array(txt).transpose(2, 0, 1) / 127.5 - 1.0
        txts.append(txt)
    txts = np.stack(txts)
    txts = torch.tensor(txts)
    return txts


def ismap(x):
    if not isinstance(x, torch.Tensor):
        return False
    return (len(x.shape) == 4) and (x.shape[1] > 3)


def isimage(x):
    if not isinstance(x, torch.Tensor):
        return False
    return (len(x.shape) == 4) and (x.shape[1] == 3 or x.shape[1] == 1)


def exists(x):
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if isfunction(d) else d


def count_params(model, verbose=False):
    total_params = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total_params * 1.e-6)
    return total_params


def instantiate_from_config(config):
    if not "target" in config:
        if config == '__is_first_stage__':
            return None
        elif config == "__is_unconditional__":
            return None
        held = ", ".join(map(str, config)) if isinstance(config, abc.Mapping) else repr(config)
        raise ConfigError(f"a config section has no `target:` to build (it holds {held or 'nothing'})")
    params = config.get("params") or {}  # `params:` left empty reads as null: no parameters
    if not isinstance(params, abc.Mapping):
        raise ConfigError(f"the params of {config['target']} are {params!r}; give them as a mapping of names to values")
    return construct(get_obj_from_str(config["target"]), params, config["target"])


# Python's own words when a call's arguments do not fit the signature (3.10+: "Cls.__init__() ...")
_UNFIT_ARGUMENTS = re.compile(r"(\w+)\.__init__\(\) (got an unexpected keyword argument|missing \d+ required)")


def construct(cls, params, target):
    """cls(**params), the `params` of a config's `target`. Params the class (or a base it passes
    them on to) does not take, or required ones left out, are a ConfigError; a TypeError raised
    anywhere else inside the constructor is a bug and keeps its traceback."""
    try:
        return cls(**params)
    except TypeError as e:
        unfit = _UNFIT_ARGUMENTS.match(str(e))
        if unfit is None or unfit.group(1) not in {c.__name__ for c in getattr(cls, "__mro__", ())}:
            raise
        raise ConfigError(f"{target} does not take the config's parameters as given: {e}") from e


#: pip's names for importable modules whose package is named otherwise (upstream's optional ones)
PIP_NAMES = {"cv2": "opencv-python-headless", "taming": "'taming-transformers @ "
             "git+https://github.com/CompVis/taming-transformers'", "PIL": "pillow", "clip":
             "git+https://github.com/openai/CLIP.git"}


def pip_name(module):
    return PIP_NAMES.get(module, module)


def get_obj_from_str(string):
    """What a config's `target` names ("package.module.Name"). A target naming no module, or
    nothing in its module, is a ConfigError (a misspelt target: upstream's traceback); a package
    that the module imports and that is not installed stays a ModuleNotFoundError."""
    module, _, name = string.rpartition(".")
    if not module:
        raise ConfigError(f"target {string!r} is not of the form package.module.Name")
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            top = e.name.split(".")[0]
            if importlib.util.find_spec(top) is None:  # misspelt, or a package to install
                raise ConfigError(f"target {string}: there is no module {top} (misspelt, or a package this "
                                  f"environment lacks: pip install {pip_name(top)})") from e
            raise ConfigError(f"target {string}: there is no module {e.name}") from e
        raise
    try:
        return getattr(imported, name)
    except AttributeError:
        close = difflib.get_close_matches(name, [n for n in dir(imported) if not n.startswith("_")], n=1)
        raise ConfigError(f"target {string}: {module} has no {name}"
                          + (f" (did you mean {close[0]}?)" if close else "")) from None


def load_retrieval_database(folder):
    """A retrieval database (CLIP image embeddings with their image ids and patch coordinates, as
    upstream's RDM databases store them) from the .npz files in ``folder``: each array joined over
    the files, in name order. Upstream loaded the files in worker processes and joined them along
    the wrong axis, so a database of more files than CPU cores silently kept one file per worker,
    and files of unequal length failed. Raises FileNotFoundError or ValueError with a one-line
    message."""
    paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if not paths:
        raise FileNotFoundError(f"no .npz files in {folder}")
    parts = []
    for path in paths:
        if not zipfile.is_zipfile(path):  # else np.load reads it as a pickle, and refuses it as one
            raise ValueError(f"{path} is not an .npz archive (numpy.savez writes them), or is cut off")
        with np.load(path) as part:  # no pickles: allow_pickle stays False
            parts.append({key: part[key] for key in part.files})
    for path, part in zip(paths, parts):
        if "embedding" not in part or part.keys() != parts[0].keys():
            raise ValueError(f"{path} holds the arrays {sorted(part)}; every file of a database holds the same "
                             f"arrays, 'embedding' among them")
    database = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    logger.info("loaded a retrieval database of %d entries from %d file(s) in %s", len(database["embedding"]),
                len(paths), folder)
    return database


# --- errors a user can fix --------------------------------------------------------------------

class ModelError(Exception):
    """The model cannot be built from its config or its weights cannot be loaded, for a reason the
    user can fix; the message is one line meant for them. The scripts catch this, not its kinds."""


class ConfigError(ModelError, ValueError):
    """A model setting in the config has a value its class does not support; the message names the
    setting and the values it takes."""


def check_choice(setting, value, choices):
    """Refuse a model setting (a model.params key) outside its choices when the model is built,
    rather than at the first training step or sample that reads it."""
    if value not in choices:
        raise ConfigError(f"model.params.{setting} is {value!r}; it takes one of {', '.join(map(repr, choices))}")


def check_indices(indices, size, what, setting):
    """Refuse `indices` (a tensor) outside [0, size) with one ValueError line: an embedding table
    indexed past its end raises an IndexError deep inside torch."""
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if not 0 <= low <= high < size:
            raise ValueError(f"{what} must be in [0, {size}) ({setting}), got {low} to {high}")


def first_line(error):
    """The first line of an exception's message, or its type's name when it has none: for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
