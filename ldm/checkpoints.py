"""Checkpoint files: reading them safely, and loading them into models.

`.safetensors` files load natively; `.ckpt`/`.pt`/`.pth` files with `torch.load(weights_only=True)`
and a small allow-list for what SD 1.x checkpoints hold besides tensors (`checkpoint_safe_globals`);
full unpickling, which can run code, only with `unsafe_pickle=True` (the scripts' --unsafe-pickle)
and a warning. A file is told by its content, not its name. Weights are checked against the model
its config builds (`apply_state_dict`), and every problem a user can fix is a `ModelError` whose
message is one line for them.
"""
import contextlib
import copy
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections import abc

import numpy as np
import torch

from ldm.diffusers_folder import read_pipeline_folder, read_vae_folder, vae_state_dict
from ldm.modules.ema import with_ema_of_parts_not_held
from ldm.util import ModelError, first_line, instantiate_from_config

logger = logging.getLogger(__name__)


class CheckpointError(ModelError):
    """A checkpoint cannot be used."""


class WeightsMismatchError(CheckpointError):
    """A checkpoint was read but its weights do not fit the model its config builds: the fix may be
    the config as well as the file, so the scripts name the config."""


SAFETENSORS_SUFFIXES = (".safetensors",)


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # .bin: diffusers/transformers weights saved before safetensors


# Weights every Stable Diffusion checkpoint must provide (everything else is optional).
REQUIRED_PREFIXES = ("first_stage_model.", "model.diffusion_model.", "cond_stage_model.")


# Non-tensor classes that old PyTorch Lightning checkpoints (SD 1.x .ckpt files) reference only
# as dict keys / bookkeeping; a placeholder stands in for them so nothing of theirs is executed.
_LIGHTNING_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class _PickledPlaceholder:
    """Stands in for an allow-listed bookkeeping class of a checkpoint; holds its state, runs nothing."""


def numpy_safe_globals():
    """Numpy scalars and dtypes (e.g. a callback's best score) as (object, pickled name) pairs."""
    from numpy._core.multiarray import scalar  # numpy 2, and 1.26 (whose numpy._core has it only imported by name)
    pairs = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
             (np.dtype, "numpy.dtype")]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType", "Int8DType",
                 "UInt64DType", "UInt32DType", "UInt16DType", "UInt8DType", "BoolDType", "StrDType", "BytesDType"):
        if dtypes is not None and hasattr(dtypes, name):
            cls = getattr(dtypes, name)
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


def checkpoint_safe_globals():
    """The allow-list used with torch.load(weights_only=True), as (object, pickled name) pairs."""
    return [(_PickledPlaceholder, name) for name in _LIGHTNING_GLOBALS] + numpy_safe_globals()


def _unsupported_global(error):
    """The class a weights-only load refused, or None when the pickle itself is unreadable."""
    patterns = (r"GLOBAL ([\w.]+)", r"Unsupported class ([\w.]+)", r"but got <class '([\w.]+)'>")  # torch's wordings
    match = next((m for m in (re.search(p, str(error)) for p in patterns) if m), None)
    return match.group(1) if match else None


def _load_pickle(path, unsafe_pickle, allowed, mapped):
    mmap = mapped and zipfile.is_zipfile(path)  # torch's zip format, the one torch.save writes since 1.6
    if unsafe_pickle:
        logger.warning("Loading %s with full unpickling (--unsafe-pickle): this can run arbitrary code, "
                       "only use it for files you trust", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # torch warns of a pickle protocol it does not know before it fails on a file that is no
            # pickle, and asks to "file an issue": above the one line this function raises, it misleads
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _unsupported_global(e)
        if refused is None:  # damaged or not a checkpoint: --unsafe-pickle would not help
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise CheckpointError(f"Cannot read checkpoint {path}: not a PyTorch checkpoint "
                                  f"({reason.group(1).strip() if reason else first_line(e)})") from e
        raise CheckpointError(f"{path} contains a pickled object that weights-only loading refuses "
                              f"({refused}); if you trust the file, pass --unsafe-pickle") from e


def _safetensors_header_length(start):
    """The JSON header's length where `start`, a file's first 9 bytes, begins as safetensors files
    do (the header's length in 8 bytes, then its "{"); None where it does not."""
    return int.from_bytes(start[:8], "little") if len(start) == 9 and start[8:] == b"{" else None


def _is_safetensors(path):
    """Whether the file starts as safetensors do: README's `ln -s sd-v1-5.safetensors
    models/ldm/stable-diffusion-v1/model.ckpt` keeps upstream's path, so the name alone does not
    tell the format."""
    with open(path, "rb") as f:
        header_length = _safetensors_header_length(f.read(9))
    return header_length is not None and header_length < os.path.getsize(path)


def save_safetensors(tensors, path, metadata=None):
    """`safetensors.torch.save_file` into a new file: it never replaces one. The name is claimed
    first (created empty, exclusively), so a file there, or one another run writes meanwhile under
    the same name, is a FileExistsError, not overwritten (save_file alone renames over it); a
    failed write removes what it left. The file gets the permissions of any other file this process
    writes (0666 less the umask): safetensors 0.8 writes through a temporary file created 0600
    (safetensors issue #782), so a reference, adapter or exported checkpoint was unreadable to the
    other users of a machine it was written for."""
    from safetensors.torch import save_file
    try:
        open(path, "xb").close()
    except FileExistsError:
        raise FileExistsError(f"{path} exists; files are never overwritten: choose a new name") from None
    try:
        save_file(tensors, str(path), metadata=metadata)
    except BaseException:
        os.unlink(path)
        raise
    umask = os.umask(0)  # the only way to read it: set, then put back at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_checkpoint(path, *, unsafe_pickle=False, mapped=False):
    """Read a checkpoint file as it was saved (a dict); see load_state_dict for the formats. A
    diffusers pipeline folder (unet/, vae/, text_encoder/) is read as one state dict in the
    single-file layout (ldm/diffusers_folder.py).

    mapped=True: the tensors of safetensors and torch.save zip files may be views of the file
    (mmap), read as they are used, not read whole into the process first: after an fp16 SD v1
    .ckpt the model loaders then hold the float32 model's 4.15 GiB, not 5.75, and load faster
    (docs/benchmarks.md). Only for callers that copy what they keep and do not write the file:
    rewritten in place (`cp`, `torch.save` over it), a mapped file changes such tensors, and one
    that got shorter ends the process with SIGBUS. By default every tensor is the caller's own."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return read_pipeline_folder(path, lambda file: read_checkpoint(file, unsafe_pickle=unsafe_pickle,
                                                                           mapped=mapped))
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    allowed = checkpoint_safe_globals()  # before the try below: a bug here is not a damaged file
    try:
        if suffix in SAFETENSORS_SUFFIXES or _is_safetensors(path):
            from safetensors.torch import load_file
            tensors = load_file(path, device="cpu")  # safetensors 0.8 maps the file
            return tensors if mapped else {key: tensor.clone() for key, tensor in tensors.items()}
        if suffix in PICKLE_SUFFIXES:
            return _load_pickle(path, unsafe_pickle, allowed, mapped)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise assorted types for damaged files
        raise CheckpointError(f"Cannot read checkpoint {path}: damaged or not a checkpoint "
                              f"({type(e).__name__}: {first_line(e)})") from e
    raise CheckpointError(unsupported_checkpoint_type(path))


def unsupported_checkpoint_type(path) -> str | None:
    """Why the file `path` is of no type read_checkpoint reads, by its name and first bytes (so
    scripts can say it before building a model); None when it may be a checkpoint, or cannot be
    read (read_checkpoint says why)."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or _is_safetensors(path):
            return None
    except OSError:
        return None
    return (f"Unsupported checkpoint type {suffix or '(none)'!r} for {path}; "
            f"expected one of {', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


def incomplete_checkpoint(path) -> str | None:
    """Why the checkpoint file `path` cannot be whole, told from its index alone (a zip's central
    directory at its end, a safetensors header's offsets): a file cut off while it was written, or
    copied in part, is then refused before a model is built or a training run restored, at the cost
    of a few kilobytes read. None when it looks whole (read_checkpoint may still find damage inside)."""
    try:
        missing = _missing_end(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):  # json.loads of a nested header
        return None  # unreadable or malformed: read_checkpoint says what is wrong
    return missing and f"{path} is not a whole checkpoint ({missing}): cut off while it was written or copied?"


def _missing_end(path) -> str | None:
    with open(path, "rb") as f:
        start = f.read(9)
        if not start:
            return "it is empty"
        if start[:4] == b"PK\x03\x04":  # torch.save's zip format
            try:
                zipfile.ZipFile(f).close()
            except zipfile.BadZipFile as e:
                return str(e)
            return None
        header_length, size = _safetensors_header_length(start), os.path.getsize(path)
        if header_length is None:  # neither format
            return None
        if 8 + header_length > size:
            return f"its header alone is {header_length} bytes, the file {size}"
        f.seek(8)
        header = json.loads(f.read(header_length))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return f"{size} of its {8 + header_length + end} bytes" if size < 8 + header_length + end else None


def tensor_layout(path) -> dict | None:
    """{name: shape} of the weights of a checkpoint file, read from its index alone: a safetensors
    header, or a torch.save zip's pickle, unpickled weights-only as read_checkpoint does, its tensors
    mapped and not read (a Lightning checkpoint: those of its state_dict); None for any other file
    (torch's format before 1.6, no file, one cut off in its index)."""
    from safetensors import SafetensorError, safe_open
    if zipfile.is_zipfile(path):
        try:
            return {key: tuple(tensor.shape) for key, tensor in load_state_dict(path, mapped=True).items()}
        except CheckpointError:  # e.g. one that needs --unsafe-pickle: no layout without it
            return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, SafetensorError):
        return None


def state_dict_of(checkpoint, path="checkpoint"):
    """The tensors of a loaded checkpoint: its 'state_dict' entry if it has one, else itself."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(checkpoint):
        logger.debug("%s: ignoring %d non-tensor entries", path, len(checkpoint) - len(tensors))
    return tensors


def load_state_dict(path, *, unsafe_pickle=False, mapped=False):
    """Load the weights of a checkpoint file as {name: tensor} on the CPU.

    .safetensors (or any name, by content): safetensors; .ckpt/.pt/.pth: torch.load(weights_only=True) with a small
    allow-list (checkpoint_safe_globals) for what Stable Diffusion 1.x .ckpt files contain; a
    diffusers pipeline folder: its UNet, VAE and text encoder, renamed to this layout.
    unsafe_pickle=True allows full unpickling (arbitrary code!) for trusted files; mapped: see
    read_checkpoint. Raises CheckpointError with a one-line message.
    """
    return state_dict_of(read_checkpoint(path, unsafe_pickle=unsafe_pickle, mapped=mapped), os.fspath(path))


# The text encoder of SD 1.x checkpoints (saved with transformers 4.19) lives under
# cond_stage_model.transformer.text_model.*; transformers 5 flattens CLIPTextModel to
# cond_stage_model.transformer.* (no text_model.), and drops the position_ids buffer.
CLIP_TEXT_PREFIX = "cond_stage_model.transformer."


CLIP_TEXT_MODEL = "text_model."


def _model_keys(model):
    return set(model.state_dict().keys()) if isinstance(model, torch.nn.Module) else set(model)


def _clip_key_candidates(key):
    """The same CLIP text weight with and without the 'text_model.' level."""
    if not key.startswith(CLIP_TEXT_PREFIX):
        return []
    rest = key[len(CLIP_TEXT_PREFIX):]
    if rest.startswith(CLIP_TEXT_MODEL):
        return [CLIP_TEXT_PREFIX + rest[len(CLIP_TEXT_MODEL):]]
    return [CLIP_TEXT_PREFIX + CLIP_TEXT_MODEL + rest]


def remap_clip_text_keys(sd, model):
    """Rename the CLIP text-encoder keys of `sd` to the layout `model` expects.

    `model` is a module or a collection of its state-dict keys. A key under
    cond_stage_model.transformer. that the model does not have is renamed by adding or removing
    the 'text_model.' level, when the renamed key is one the model has; an
    '...embeddings.position_ids' buffer the model does not have is dropped. Other keys are
    returned unchanged. Returns a new dict.
    """
    expected = _model_keys(model)
    out = {}
    for key, value in sd.items():
        if key.startswith(CLIP_TEXT_PREFIX) and key not in expected:
            renamed = [c for c in _clip_key_candidates(key) if c in expected]
            if renamed:
                key = renamed[0]
            elif key.endswith("embeddings.position_ids"):
                continue
        out[key] = value
    return out


def _drop_ema_keys(sd, expected):
    if any(k.startswith("model_ema.") for k in expected):
        return sd
    kept = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if len(kept) != len(sd):
        logger.info("Ignoring %d EMA weights (model_ema.*): this config does not use EMA", len(sd) - len(kept))
    return kept


def _some(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _misfits(sd, expected):
    """(missing, mismatched): the keys of `expected` that `sd` lacks, and those it has in another shape."""
    missing = [k for k in expected if k not in sd]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    return missing, mismatched


def _check_weights(sd, model_sd, source):
    missing, mismatched = _misfits(sd, model_sd)
    missing = [k for k in missing if k.startswith(REQUIRED_PREFIXES)]
    if missing:
        raise WeightsMismatchError(f"{source} lacks {len(missing)} weights this config needs "
                                   f"(e.g. {_some(missing)}); {_what_else(sd)}")
    if mismatched:
        raise WeightsMismatchError(f"{source} has {len(mismatched)} weights with shapes other than this config's "
                                   f"(e.g. {_some(mismatched)}); {_what_else(sd)}")


CONTROLNET_PREFIXES = ("control_model.", "controlnet_cond_embedding.")  # CompVis' and diffusers' ControlNet keys


def _what_else(sd):
    """What a file that does not fit the config is, where its keys tell: the files users with SD
    weights most often pass instead of an SD 1.x text-to-image checkpoint."""
    def has(*prefixes):
        return any(k.startswith(prefixes) for k in sd)
    first_conv = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if has("conditioner.embedders."):
        kind = "an SDXL checkpoint"
    elif has("cond_stage_model.model."):
        kind = "an SD 2.x checkpoint (its text encoder is OpenCLIP's)"
    elif has("lora_unet_", "lora_te") or any("lora_down" in k or ".lora_A" in k for k in sd):
        kind = "a LoRA (weights to add to a model), not a model"
    elif first_conv is not None and first_conv.ndim == 4 and first_conv.shape[1] in (8, 9):
        kind = (f"an {'inpainting' if first_conv.shape[1] == 9 else 'image-editing (instruct-pix2pix)'} "
                f"checkpoint (its UNet reads {first_conv.shape[1]} channels, a text-to-image one 4)")
    elif has("encoder.", "decoder.") and not has("model.diffusion_model."):
        kind = "an autoencoder (VAE) alone"
    elif has(*CONTROLNET_PREFIXES):
        kind = "a ControlNet alone, which this repository does not run (T2I-Adapters steer the same conditions)"
    elif has("body.0.", "adapter.body.0.") and not has("model.diffusion_model."):
        kind = "a T2I-Adapter, not a model (txt2img, img2img and adapter_benchmark take it as --adapter)"
    elif has("down_blocks.", "mid_block.", "up_blocks."):
        kind = "one part of a diffusers pipeline (pass the pipeline folder itself)"
    else:
        return "is it a checkpoint for this config?"
    return f"it looks like {kind}"


def apply_state_dict(model, sd, source="checkpoint"):
    """Load `sd` into `model` after dropping unused EMA copies and remapping CLIP text keys.

    Raises WeightsMismatchError if a weight of the autoencoder, UNet or text encoder is missing or has
    the wrong shape; unexpected keys are only logged.
    """
    _drop_ema_copy_without_weights(model, sd, source)
    model_sd = model.state_dict()
    sd = remap_clip_text_keys(_drop_ema_keys(sd, model_sd), model_sd.keys())
    _check_weights(sd, model_sd, source)
    sd = with_ema_of_parts_not_held(model, sd)
    placeholders = any(p.is_meta for p in model.parameters())
    if placeholders:  # the checkpoint's tensors become the model's, in the model's dtypes (fp16 files: float32)
        # as copies: load_weights reads the file mapped, and the model's weights must not be views
        # of a file that may be rewritten in place while the process samples (`cp`;
        # pytorch-lightning 2.1 saves last.ckpt so), which would change them or end it with SIGBUS
        sd = {k: v.to(model_sd[k].dtype, copy=True, memory_format=torch.contiguous_format) if k in model_sd else v
              for k, v in sd.items()}  # one copy, contiguous, also of a strided tensor
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=placeholders)
    if missing:
        logger.info("%d optional keys not in %s (kept as initialised): %s", len(missing), source, _some(missing))
    if unexpected:
        logger.info("%d keys of %s not used by the model: %s", len(unexpected), source, _some(unexpected))
    return model


def _drop_ema_copy_without_weights(model, sd, source):
    """A config with use_ema keeps an EMA copy that ema_scope() swaps in for sampling; a file
    without model_ema.* (e.g. exported with the EMA already in the UNet weights) would leave that
    copy at its random initialisation, so sampling must use the loaded weights instead, and the
    copy (as large as the UNet) goes. Only the copy's weights count: a file pruned down to its
    counters (model_ema.decay, model_ema.num_updates) has none. A file holds the copy of each part
    (LitEma.parts: the UNet, a trained text encoder) wholly or not at all; one holding some of a
    part's and not others would sample with random weights where it lacks them, and is refused."""
    if not getattr(model, "use_ema", False):
        return
    held, partial = model.model_ema.held_parts(sd, "model_ema.")
    if partial:
        part = model.model_ema.parts()[partial[0]]
        lacking = {f"model_ema.{name}" for name in part} - set(sd)
        raise WeightsMismatchError(f"{source} holds {len(part) - len(lacking)} of the {len(part)} EMA weights "
                                   f"(model_ema.*) of {partial[0]} this config samples with, lacking e.g. "
                                   f"{_some(lacking)}; a config with use_ema: false samples with its weights instead")
    if not held:
        # DEBUG: this is the usual case (SD's released files, exports), not news on every run
        logger.debug("%s has no separate EMA copy (model_ema.*): sampling with its UNet weights, which in pruned "
                     "and exported checkpoints are the EMA weights already", source)
        model.use_ema = False
        del model.model_ema


def _drop_checkpoint_paths(node, where):
    """Remove every `ckpt_path` of a model config in place; returns where they were. A training
    config names its pretrained first stage there (models/first_stage_models/...), which a
    sampling checkpoint holds anyway, and with random weights no file is wanted at all."""
    if not isinstance(node, abc.MutableMapping):
        return []
    skipped = [f"{where}.ckpt_path"] if node.get("ckpt_path") is not None else []
    node.pop("ckpt_path", None)
    for key, value in node.items():
        skipped += _drop_checkpoint_paths(value, f"{where}.{key}")
    return skipped


def build_for_weights(config, why):
    """`config.model` (or `config` itself, a model config) built for weights to be loaded into it
    whole: without reading the config's own ckpt_path entries, for the reason `why`, logged."""
    model_config = copy.deepcopy(config.model if "model" in config else config)
    skipped = _drop_checkpoint_paths(model_config, "model")
    if skipped:
        logger.info("Not reading %s: %s", ", ".join(skipped), why)
    return instantiate_from_config(model_config)


def load_model_from_config(config, ckpt, device="cpu", *, unsafe_pickle=False, random_weights=False, vae=None):
    """Build `config.model` and load the weights of checkpoint `ckpt` into it; returns it in eval mode on `device`.

    random_weights=True skips the checkpoint (for tests and dry runs) and says so loudly. The
    config's own ckpt_path entries are not read either way (_drop_checkpoint_paths). `vae`: a file
    or folder whose autoencoder replaces the checkpoint's (load_first_stage_weights).
    """
    if random_weights:
        model = build_for_weights(config, "random weights")
        logger.warning("THE MODEL HAS RANDOM WEIGHTS: no checkpoint loaded, outputs will be noise")
    elif ckpt is None:
        raise CheckpointError("No checkpoint given; pass the path of a .ckpt or .safetensors file")
    else:
        model, _ = build_with_weights(config, ckpt, unsafe_pickle=unsafe_pickle)
    if vae is not None:
        load_first_stage_weights(model, vae, unsafe_pickle=unsafe_pickle)
    return model.eval().to(device)


FIRST_STAGE_PREFIX = "first_stage_model."


def load_first_stage_weights(model, path, *, unsafe_pickle=False):
    """Replace the weights of the model's autoencoder by those in `path`, as SD users swap in a
    fine-tuned VAE (vae-ft-mse-840000-ema-pruned: the same latent space, another decoder).
    `path`: a VAE file in CompVis' names (encoder.*, decoder.*, with or without first_stage_model.;
    the training loss's loss.* entries are not used), a whole model's checkpoint (its autoencoder),
    a diffusers AutoencoderKL folder or weight file. Strict: a weight missing or of another shape
    is a CheckpointError."""
    first_stage = getattr(model, "first_stage_model", None)
    expected = first_stage.state_dict() if first_stage is not None else {}
    if not expected:
        raise CheckpointError(f"--vae {path}: this model has no autoencoder to replace (it samples in pixel space)")
    logger.info("Loading autoencoder weights from %s", path)
    sd = _first_stage_state_dict(os.fspath(path), unsafe_pickle)
    missing, mismatched = _misfits(sd, expected)
    if missing or mismatched:
        what = f"lacks {len(missing)} autoencoder weights (e.g. {_some(missing)})" if missing else \
            f"has {len(mismatched)} autoencoder weights of other shapes than this model's (e.g. {_some(mismatched)})"
        raise CheckpointError(f"--vae {path} {what}; is it an SD 1.x VAE (4 latent channels, 8x downsampling)?")
    unused = [k for k in sd if k not in expected and not k.startswith("loss.")]
    if unused:
        logger.info("%d keys of %s not used by the autoencoder: %s", len(unused), path, _some(unused))
    first_stage.load_state_dict({k: sd[k] for k in expected})


def _first_stage_state_dict(path, unsafe_pickle):
    if os.path.isdir(path):
        try:
            return read_vae_folder(path, lambda file: load_state_dict(file, unsafe_pickle=unsafe_pickle))
        except ValueError as e:
            raise CheckpointError(f"--vae {e}") from e
    sd = load_state_dict(path, unsafe_pickle=unsafe_pickle)
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):
        return {k[len(FIRST_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if any(".mid_block." in k for k in sd):  # diffusers' names, its weight file given alone
        return vae_state_dict(sd)
    return sd


@contextlib.contextmanager
def parameters_as_placeholders():
    """Modules built inside get placeholder parameters on the meta device: no memory and no random
    initialisation, for weights that a checkpoint is about to replace (accelerate's
    init_empty_weights, in a few lines). Building SD v1's 860 M parameters otherwise draws random
    numbers for seconds (10 s on 2 CPU cores) that loading overwrites, and holds a second copy of
    the model while the checkpoint is read. Buffers (the noise schedule) are computed as usual.
    It swaps torch.nn.Module.register_parameter and torch.nn.init's functions while it is open:
    build nothing else meanwhile, in another thread neither."""
    register = torch.nn.Module.register_parameter

    def register_placeholder(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skipping_placeholders(init):  # random init of a placeholder: nothing to do, and on the meta device
        return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    inits = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    torch.nn.Module.register_parameter = register_placeholder
    for name, init in inits.items():
        setattr(torch.nn.init, name, skipping_placeholders(init))
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        for name, init in inits.items():
            setattr(torch.nn.init, name, init)


# torch.nn.init's in-place initialisers; on the meta device some run as Python reference code,
# whose first use imports ~1.5 s of torch._refs, more than the whole build of a small model
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


def build_with_weights(config, ckpt, *, unsafe_pickle=False):
    """(model, global step): `config`'s model with the weights of `ckpt`, built on placeholders
    that the checkpoint's tensors replace (`parameters_as_placeholders`). A checkpoint that leaves
    some parameter unset (an optional one, kept as initialised) is loaded again into a model built
    the ordinary way."""
    why = "the checkpoint holds the whole model"
    with parameters_as_placeholders():
        model = build_for_weights(config, why)
    global_step = load_weights(model, ckpt, unsafe_pickle=unsafe_pickle)
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        logger.info("%s leaves %d tensors unset (e.g. %s): building the model with initialised weights",
                    ckpt, len(unset), _some(unset))
        model = build_for_weights(config, why)
        global_step = load_weights(model, ckpt, unsafe_pickle=unsafe_pickle)
    return model, global_step


def load_weights(model, ckpt, *, unsafe_pickle=False):
    """Load checkpoint file `ckpt` into `model` (apply_state_dict); returns the checkpoint's
    global step, None where it has none (safetensors, a bare state dict)."""
    logger.info("Loading model weights from %s", ckpt)
    checkpoint = read_checkpoint(ckpt, unsafe_pickle=unsafe_pickle, mapped=True)  # the model copies what it takes
    global_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    if global_step is not None:
        logger.info("Checkpoint global step: %s", global_step)
    apply_state_dict(model, state_dict_of(checkpoint, os.fspath(ckpt)), os.fspath(ckpt))
    return global_step
