"""Stable Diffusion 1.x weights saved as a diffusers pipeline folder, read into this repository's layout.

Many users have SD 1.x as a diffusers folder (a `save_pretrained` pipeline, or a snapshot of the
Hugging Face cache): `unet/`, `vae/` and `text_encoder/`, each with its own weight file, named
after diffusers' modules. The networks are the same as CompVis' (diffusers' conversion scripts
go both ways), only the names and the VAE attention's weight shapes differ, so this module renames
the tensors into the single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`) and the usual strict loading takes over: a weight the config
needs and the folder lacks is still an error, nothing is built from diffusers' classes and
diffusers itself is not needed.

The block indices are derived from the keys (how many levels, how many res-blocks per level,
which decoder levels hold attention), so the renaming holds for any UNet of SD 1.x's shape,
the tiny test config's too. SD 2.x (OpenCLIP text encoder) is not handled: its text keys do not
match and loading says which weights are missing.
"""
from __future__ import annotations

import json
import os
import re

COMPONENTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model.transformer."}
# preferred first: full precision before a variant, safetensors before pickles
MODEL_WEIGHTS = "diffusion_pytorch_model"  # diffusers' file name for a saved model's weights (unet, vae, adapter)
WEIGHT_FILES = {"unet": MODEL_WEIGHTS, "vae": MODEL_WEIGHTS, "text_encoder": "model"}
VARIANTS = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")
LEGACY_TEXT_ENCODER_FILE = "pytorch_model"  # transformers' name for .bin weights

UNET_RENAMES = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
UNET_RESNET_RENAMES = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                       "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
                       "conv_shortcut.": "skip_connection."}
VAE_ATTENTION_RENAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
                         "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}  # older diffusers


# a diffusers folder holding one module says which in its config.json; the ones passed as --ckpt most often
SINGLE_MODULES = {"T2IAdapter": "a T2I-Adapter, not a model: txt2img, img2img and adapter_benchmark take it as "
                                "--adapter",
                  "ControlNetModel": "a ControlNet, which this repository does not run",
                  "UNet2DConditionModel": "one part of a pipeline: pass the pipeline folder itself",
                  "AutoencoderKL": "one part of a pipeline: pass the pipeline folder itself"}


def weight_files(folder) -> dict:
    """{component: its weight file}; ValueError (one line) for a folder that is not a complete pipeline.
    A repository folder of the Hugging Face cache (models--ORG--NAME) stands for the snapshot its
    refs/main names, as it does for diffusers."""
    folder = cache_snapshot(folder)
    if not os.path.isdir(os.path.join(folder, "unet")):
        kind = SINGLE_MODULES.get(_class_name(folder))
        raise ValueError(f"{folder} is a folder without unet/{f' ({kind})' if kind else ''}: pass a checkpoint "
                         f"file, or a diffusers pipeline folder (unet/, vae/, text_encoder/)")
    return {component: weight_file(folder, component) for component in COMPONENTS}


def cache_snapshot(folder):
    """`folder`, or the snapshot that refs/main names where `folder` is a repository folder of the
    Hugging Face cache (refs/, snapshots/, blobs/: the weights are in snapshots/<commit>/)."""
    ref = os.path.join(folder, "refs", "main")
    if os.path.isdir(os.path.join(folder, "unet")) or not os.path.isfile(ref):
        return folder
    with open(ref) as f:
        return os.path.join(folder, "snapshots", f.read().strip())


def _class_name(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def weight_file(folder, component) -> str:
    """The weight file of one component folder; ValueError (one line) when there is none."""
    names = [WEIGHT_FILES[component]] + ([LEGACY_TEXT_ENCODER_FILE] if component == "text_encoder" else [])
    found = find_weight_file(os.path.join(folder, component), names)
    if found:
        return found
    candidates = [name + suffix for suffix in VARIANTS for name in names]
    if any(name.endswith(".index.json") for name in _listdir(os.path.join(folder, component))):
        raise ValueError(f"{folder}/{component} holds sharded weights, which are not supported: save the "
                         f"pipeline unsharded, or convert it to one file with diffusers' conversion script")
    raise ValueError(f"{folder} is not a complete diffusers pipeline folder: no {component} weights "
                     f"({', '.join(candidates[:2])}, ...) in {component}/")


def find_weight_file(directory, names) -> str | None:
    """The first of `names` with one of VARIANTS' suffixes (in VARIANTS' order of preference) that is
    a file in `directory`, or None: diffusers' name for the weights of one saved module."""
    for path in (os.path.join(directory, name + suffix) for suffix in VARIANTS for name in names):
        if os.path.isfile(path):
            return path
    return None


def _listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []


def read_pipeline_folder(folder, load) -> dict:
    """The pipeline's UNet, VAE and text-encoder weights as one state dict in the single-file layout.
    `load(path)` reads one weight file into {name: tensor}."""
    state = {}
    for component, path in weight_files(folder).items():
        tensors = load(path)
        prefix = COMPONENTS[component]
        rename = {"unet": unet_state_dict, "vae": vae_state_dict, "text_encoder": dict}[component]
        state.update({prefix + key: value for key, value in rename(tensors).items()})
    return state


def read_vae_folder(folder, load) -> dict:
    """The autoencoder of a diffusers AutoencoderKL folder (its own, e.g. sd-vae-ft-mse; a pipeline's,
    whose vae/ it uses; or the Hugging Face cache's models--ORG--NAME) in AutoencoderKL's names."""
    folder = cache_snapshot(folder)
    if os.path.isdir(os.path.join(folder, "vae")):
        folder = os.path.join(folder, "vae")
    path = find_weight_file(folder, [MODEL_WEIGHTS])
    if path is None:
        raise ValueError(f"{folder} holds no diffusers autoencoder weights ({MODEL_WEIGHTS}.safetensors "
                         f"or .bin)")
    return vae_state_dict(load(path))


def _count(keys, pattern):
    """1 + the largest number the first group of `pattern` matches among `keys` (0 for none)."""
    numbers = [int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m]
    return 1 + max(numbers) if numbers else 0


def unet_state_dict(tensors) -> dict:
    """diffusers' UNet2DConditionModel names -> UNetModel's (openaimodel.py).

    UNetModel numbers its blocks in one sequence: input block 0 is conv_in, then per level its
    res-blocks (each with its transformer, where the level has attention) and a downsampler;
    output blocks hold one res-block each (+ transformer, + the level's upsampler after the last)."""
    keys = list(tensors)
    per_level = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.") + 1  # res-blocks + the downsampler slot
    up_with_attention = {int(m.group(1)) for m in map(re.compile(r"up_blocks\.(\d+)\.attentions\.").match, keys) if m}

    def rename(key):
        for old, new in UNET_RENAMES.items():
            if key.startswith(old):
                return new + key[len(old):]
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, level, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if part == "downsamplers":  # its conv is the Downsample's `op`
                return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            if part == "upsamplers":  # after the level's last res-block, and its transformer if it has one
                position = 2 if level in up_with_attention else 1
                return f"output_blocks.{level * per_level + per_level - 1}.{position}.{rest}"
            block = 1 + level * per_level + j if side == "down" else level * per_level + j
            kind = "input_blocks" if side == "down" else "output_blocks"
            return f"{kind}.{block}.{0 if part == 'resnets' else 1}.{_resnet(rest) if part == 'resnets' else rest}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            part, j, rest = m.groups()
            if part == "resnets":  # res-block, transformer, res-block
                return f"middle_block.{2 * int(j)}.{_resnet(rest)}"
            return f"middle_block.1.{rest}"
        return key  # anything else keeps its name; strict loading reports what does not fit

    return {rename(key): value for key, value in tensors.items()}


def _resnet(rest):
    for old, new in UNET_RESNET_RENAMES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def vae_state_dict(tensors) -> dict:
    """diffusers' AutoencoderKL names -> AutoencoderKL's (autoencoder.py, model.py's Encoder/Decoder).

    The decoder's levels run the other way (diffusers' up_blocks.0 is the lowest resolution,
    model.py's up.0 the highest), and the mid-block attention's projections are 1x1 convolutions
    there, linear layers in diffusers: (out, in) weights become (out, in, 1, 1)."""
    levels = _count(list(tensors), r"decoder\.up_blocks\.(\d+)\.")

    def rename(key):
        key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            coder, side, level, part, j, rest = m.groups()
            level = int(level) if side == "down" else levels - 1 - int(level)
            if part == "resnets":
                return f"{coder}.{side}.{level}.block.{j}.{rest}"
            return f"{coder}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            coder, part, j, rest = m.groups()
            if part == "resnets":
                return f"{coder}.mid.block_{int(j) + 1}.{rest}"
            for old, new in VAE_ATTENTION_RENAMES.items():
                if rest.startswith(old):
                    return f"{coder}.mid.attn_1.{new}{rest[len(old):]}"
        return key

    renamed = {rename(key): value for key, value in tensors.items()}
    return {key: value[:, :, None, None] if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2
            else value for key, value in renamed.items()}
