"""T2I-Adapter: steer Stable Diffusion with a spatial condition (edges, sketch, depth, pose, colour).

Design after TencentARC/T2I-Adapter (Mou et al. 2023, https://github.com/TencentARC/T2I-Adapter,
branch SD), re-implemented here. An adapter is a small conv net that turns a condition image
into one feature map per UNet resolution level; the UNet adds map `l` to its hidden state after
the last input block of level `l` (for SD v1: input_blocks 2, 5, 8, 11), before that state is
stored as a skip connection, so encoder and decoder both see it. The UNet itself is frozen and
unchanged; with no adapter set it runs exactly as before.

The layers are named as in the released checkpoints (`t2iadapter_*_sd14v1.pth`, bare state
dicts, sometimes with an `adapter.` prefix), so those load strictly:

    Adapter        conv_in, body.{k}.block1/block2 (+ body.{k}.in_conv where the width changes)
    LightAdapter   body.{level}.in_conv / body.{level}.body.{j}.block1/block2 / body.{level}.out_conv

The same adapters saved by diffusers (`T2IAdapter.save_pretrained`, e.g. the TencentARC/t2iadapter_*_sd14v1
repositories: a folder with config.json) group the blocks per level (`body.{level}.resnets.{j}`); they are
renamed into this layout on loading (`released_layout`).

Per-run state follows ldm/modules/consistency.py: one `AdapterInjection` object is set on the
UNet (`unet.adapter_residuals`) by `adapter_conditioning`, a forward pre-hook reads the
timestep to apply the `cond_tau` window, and the context manager restores the model in
`finally`. Nothing is threaded through forward signatures (gradient checkpointing forwards
positional arguments only).
"""
from __future__ import annotations

import enum
import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.diffusers_folder import MODEL_WEIGHTS, cache_snapshot, find_weight_file
from ldm.model_choice import in_repo
from ldm.modules.diffusionmodules.openaimodel import timestep_of_call, unet_of
from ldm.checkpoints import CONTROLNET_PREFIXES, CheckpointError, load_state_dict, save_safetensors

log = logging.getLogger(__name__)

SD_V1_CHANNELS = (320, 640, 1280, 1280)
# The adapter starts at the UNet's input resolution: f x f pixel patches become channels, f being
# the first stage's downsampling (8 for SD's VAE, 1 for a pixel-space model such as
# configs/embedded/procedural-t2i.yaml). The released adapters are all f = 8.
UNSHUFFLE = 8
PREFIX = "adapter."  # some released checkpoints were saved from the whole model
# safetensors header entry written by save_adapter: the key layout cannot tell f apart from the
# condition channels (conv_in takes cond_channels * f^2 inputs), so it is recorded beside it
UNSHUFFLE_METADATA = "t2i_adapter.unshuffle"


# --------------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------------

class AdapterResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv(k) plus identity, after an optional 2x average-pool and a
    k x k projection where the width changes. This is the released SD1.4 configuration of the
    official ResnetBlock (sk=True: identity skip, use_conv=False: pooling, no weights)."""

    def __init__(self, in_channels, out_channels, downsample, kernel_size=1):
        super().__init__()
        pad = kernel_size // 2
        self.down = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, pad) \
            if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, kernel_size, 1, pad)

    def forward(self, x):
        x = self.down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class Adapter(nn.Module):
    """The full T2I-Adapter: PixelUnshuffle(f) -> 3x3 conv_in -> one stage of residual blocks
    per UNet level; stage `l` (after the first) halves the resolution, and its output is the
    feature map for level `l`. f = `unshuffle` (8 for SD v1, 1 in pixel space)."""

    def __init__(self, channels=SD_V1_CHANNELS, cond_channels=3, num_res_blocks=2, kernel_size=1,
                 unshuffle=UNSHUFFLE):
        super().__init__()
        self.channels = tuple(channels)
        self.cond_channels = cond_channels
        self.num_res_blocks = num_res_blocks
        self.factor = unshuffle
        self.unshuffle = nn.PixelUnshuffle(unshuffle)  # no weights: the key layout is the same for every f
        self.conv_in = nn.Conv2d(cond_channels * unshuffle ** 2, channels[0], 3, 1, 1)
        # one flat list, as in the checkpoints: block k belongs to stage k // num_res_blocks
        self.body = nn.ModuleList(
            AdapterResBlock(channels[max(level - 1, 0)] if j == 0 else ch, ch,
                            downsample=(level > 0 and j == 0), kernel_size=kernel_size)
            for level, ch in enumerate(channels) for j in range(num_res_blocks))

    @property
    def downsampling(self) -> int:
        """Condition sides must be multiples of this: f times the stages' 2x poolings."""
        return self.factor * 2 ** (len(self.channels) - 1)

    @torch.no_grad()
    def zero_init_(self):
        """Make the features exactly zero (the adapter starts as 'no adapter'), yet trainable.

        Zeroes conv_in and every block's output conv (and the width projections' bias): the
        identity skips then carry zeros through every stage. conv_in gets gradients through
        those skips and block2 through relu(block1's bias) from the first step; block1 and the
        width projections' weights from the second, once block2 is no longer zero. Why: a randomly initialised adapter adds random features to a frozen
        model's hidden states, and a short run would spend its first steps undoing that damage.
        The key layout stays the released one (nothing is added)."""
        for conv in [self.conv_in] + [block.block2 for block in self.body]:
            conv.weight.zero_()
            conv.bias.zero_()
        for block in self.body:
            if block.in_conv is not None:
                block.in_conv.bias.zero_()
        return self

    def forward(self, cond):
        """cond: (B, cond_channels, H, W) in [0, 1] -> [(B, channels[l], H/f/2^l, W/f/2^l)]."""
        x = self.conv_in(self.unshuffle(cond))
        features = []
        for k, block in enumerate(self.body):
            x = block(x)
            if (k + 1) % self.num_res_blocks == 0:
                features.append(x)
        return features


class LightResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return x + self.block2(self.act(self.block1(x)))


class LightStage(nn.Module):
    """1x1 in to a quarter of the level's width, residual blocks, 1x1 out to the full width."""

    def __init__(self, in_channels, out_channels, num_res_blocks, downsample):
        super().__init__()
        inner = out_channels // 4
        self.down = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.in_conv = nn.Conv2d(in_channels, inner, 1)
        self.body = nn.Sequential(*(LightResBlock(inner) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(inner, out_channels, 1)

    def forward(self, x):
        return self.out_conv(self.body(self.in_conv(self.down(x))))


class LightAdapter(nn.Module):
    """The light T2I-Adapter (released for the colour palette): no conv_in, one narrow stage
    per level (`Adapter_light` upstream)."""

    def __init__(self, channels=SD_V1_CHANNELS, cond_channels=3, num_res_blocks=4, unshuffle=UNSHUFFLE):
        super().__init__()
        self.channels = tuple(channels)
        self.cond_channels = cond_channels
        self.num_res_blocks = num_res_blocks
        self.factor = unshuffle
        self.unshuffle = nn.PixelUnshuffle(unshuffle)
        ins = [cond_channels * unshuffle ** 2] + list(channels[:-1])
        self.body = nn.ModuleList(LightStage(i, o, num_res_blocks, downsample=level > 0)
                                  for level, (i, o) in enumerate(zip(ins, channels)))

    downsampling = Adapter.downsampling

    def forward(self, cond):
        x = self.unshuffle(cond)
        features = []
        for stage in self.body:
            x = stage(x)
            features.append(x)
        return features


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

class AdapterKind(str, enum.Enum):
    FULL = "full"    # `Adapter`: ResnetBlock stages (sketch, canny, depth, seg, keypose, openpose)
    LIGHT = "light"  # `LightAdapter`: the small colour adapter


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint holds, read from its key names and weight shapes."""
    kind: AdapterKind
    cond_channels: int     # 1 (sketch, canny) or 3
    channels: tuple        # output width per UNet level
    num_res_blocks: int
    kernel_size: int = 1   # full adapter only
    unshuffle: int = UNSHUFFLE  # the first stage's downsampling f the adapter was made for

    def __post_init__(self):
        object.__setattr__(self, "kind", AdapterKind(self.kind))

    def build(self) -> nn.Module:
        if self.kind is AdapterKind.LIGHT:
            return LightAdapter(self.channels, self.cond_channels, self.num_res_blocks, self.unshuffle)
        return Adapter(self.channels, self.cond_channels, self.num_res_blocks, self.kernel_size, self.unshuffle)

    def describe(self) -> dict:
        return {"kind": self.kind.value, "cond_channels": self.cond_channels, "channels": list(self.channels),
                "num_res_blocks": self.num_res_blocks, "unshuffle": self.unshuffle}


DIFFUSERS_TYPES = ("full_adapter", "light_adapter")  # SD 1.x's; full_adapter_xl pools at other levels


def strip_prefix(state_dict: dict) -> dict:
    """Drop the `adapter.` prefix that checkpoints saved from the whole model carry."""
    if state_dict and all(k.startswith(PREFIX) for k in state_dict):
        return {k[len(PREFIX):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _indices(state_dict, pattern):
    return sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))})


def released_layout(state_dict: dict) -> dict:
    """diffusers' key layout (prefix already stripped) renamed into the released one; other layouts
    are returned unchanged. diffusers groups a level's blocks, `body.{level}.resnets.{j}`: the full
    adapter's flat list holds block j of a level at `body.{level * blocks_per_level + j}` (where the
    level's width projection, diffusers' `body.{level}.in_conv`, sits too), the light adapter's
    stage at `body.{level}.body.{j}`."""
    blocks = _indices(state_dict, r"body\.\d+\.resnets\.(\d+)\..+")
    if not blocks:
        return state_dict
    light = any(k.startswith("body.0.out_conv.") for k in state_dict)
    per_level = 1 + max(blocks)
    renamed = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level, block, rest = int(m[1]), int(m[2]), m[3]
            key = f"body.{level}.body.{block}.{rest}" if light else f"body.{level * per_level + block}.{rest}"
        elif not light and (m := re.fullmatch(r"body\.(\d+)\.in_conv\.(.+)", key)):
            key = f"body.{int(m[1]) * per_level}.in_conv.{m[2]}"
        renamed[key] = value
    return renamed


def _cond_channels(in_channels, key, unshuffle):
    if in_channels % unshuffle ** 2:
        raise CheckpointError(f"{key} takes {in_channels} input channels, not a multiple of {unshuffle ** 2} "
                              f"(PixelUnshuffle({unshuffle})): not a T2I-Adapter layout this code knows")
    return in_channels // unshuffle ** 2


def detect_adapter(state_dict: dict, levels: int = 4, unshuffle: int = UNSHUFFLE) -> AdapterSpec:
    """The adapter type, condition channels and widths of a checkpoint (prefix already stripped).

    `levels` is the number of UNet resolution levels: the full adapter's blocks form one flat
    list, and where a stage keeps the width (1280 -> 1280 in SD v1) nothing in the keys marks
    the boundary, so the blocks are split evenly over the levels. `unshuffle`: the factor f
    of PixelUnshuffle, which the keys cannot tell (see load_adapter)."""
    try:
        return _detect(state_dict, levels, unshuffle)
    except KeyError as e:
        raise CheckpointError(f"incomplete T2I-Adapter checkpoint: no {e.args[0]}")


def _detect(state_dict, levels, unshuffle):
    if any(k.startswith("style_embedding") or k.startswith("transformer_layes") for k in state_dict):
        raise CheckpointError("this is a style adapter (CLIP image tokens); only spatial adapters are supported")
    if any(".skep." in k or ".down_opt.op." in k for k in state_dict):
        raise CheckpointError("adapter uses conv skips/strided-conv downsampling (sk=False or use_conv=True); "
                              "only the released SD1.4 layout (identity skips, average pooling) is supported")
    if "conv_in.weight" in state_dict:
        blocks = _indices(state_dict, r"body\.(\d+)\.block1\.weight")
        if not blocks or blocks != list(range(len(blocks))) or len(blocks) % levels:
            raise CheckpointError(f"adapter has {len(blocks)} residual blocks; expected a positive multiple of "
                                  f"{levels} (one stage per UNet level) numbered from 0")
        per_level = len(blocks) // levels
        widths = tuple(state_dict[f"body.{level * per_level}.block1.weight"].shape[0] for level in range(levels))
        cond_channels = _cond_channels(state_dict["conv_in.weight"].shape[1], "conv_in", unshuffle)
        return AdapterSpec(AdapterKind.FULL, cond_channels, widths, per_level,
                           kernel_size=state_dict["body.0.block2.weight"].shape[-1], unshuffle=unshuffle)
    if "body.0.out_conv.weight" in state_dict:
        stages = _indices(state_dict, r"body\.(\d+)\.out_conv\.weight")
        widths = tuple(state_dict[f"body.{i}.out_conv.weight"].shape[0] for i in stages)
        per_level = len(_indices(state_dict, r"body\.0\.body\.(\d+)\.block1\.weight"))
        cond_channels = _cond_channels(state_dict["body.0.in_conv.weight"].shape[1], "body.0.in_conv", unshuffle)
        return AdapterSpec(AdapterKind.LIGHT, cond_channels, widths, per_level, unshuffle=unshuffle)
    raise CheckpointError(f"not a T2I-Adapter checkpoint: no conv_in.weight or body.0.out_conv.weight "
                          f"({_what_it_is(state_dict)})")


def _what_it_is(state_dict):
    """The files most often passed as --adapter by mistake, where the keys tell; else some keys."""
    if any(k.startswith(CONTROLNET_PREFIXES) for k in state_dict):
        return "it looks like a ControlNet, which this repository does not run; T2I-Adapters steer the same conditions"
    if any(k.startswith("model.diffusion_model.") for k in state_dict):
        return "it looks like a model checkpoint: pass it as --ckpt"
    return f"keys: {', '.join(sorted(state_dict)[:3]) or 'none'}, ..."


def load_strict(module: nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict(strict=True), with a one-line CheckpointError naming what does not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)

    def some(keys):
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    problems = [f"{label}: {some(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise CheckpointError(f"adapter {source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def recorded_unshuffle(path) -> int | None:
    """The unshuffle factor save_adapter recorded in a .safetensors header, or None (released
    .pth files, other files; an unreadable file is reported by load_state_dict instead)."""
    if not str(path).endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            value = (f.metadata() or {}).get(UNSHUFFLE_METADATA)
    except Exception:  # not a readable safetensors file: load_state_dict gives the one-line error
        return None
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CheckpointError(f"adapter {path}: header entry {UNSHUFFLE_METADATA}={value!r} is not a positive "
                              f"integer")
    return int(value)


def resolve_unshuffle(path, recorded: int | None, expected: int | None) -> int:
    """The factor to build with: the recorded one, else the model's, else 8 (the released
    adapters). CheckpointError when the file was made for another first stage than the model."""
    if recorded is not None and expected is not None and recorded != expected:
        raise CheckpointError(f"adapter {path} was trained for a first-stage downsampling f={recorded} "
                              f"(PixelUnshuffle({recorded})) but this model has f={expected}: use an adapter "
                              f"made for this model (the embedded pixel-space model needs one trained with f=1)")
    return recorded or expected or UNSHUFFLE


def load_adapter(path, *, levels: int = 4, unshuffle: int | None = None, unsafe_pickle: bool = False) -> nn.Module:
    """Build the adapter a checkpoint describes and load it strictly, in eval mode on the CPU.

    `path`: a checkpoint file (released .pth, .safetensors, diffusers' weight file) or a diffusers
    T2IAdapter folder. `unshuffle`: the model's first-stage downsampling f, when known (checked
    against the factor recorded in the file's header or the folder's config; files without it -
    the released ones - are built with it, default 8). Raises CheckpointError (one line) for
    unreadable or unknown files."""
    weights, recorded = adapter_weights(path)
    factor = resolve_unshuffle(path, recorded, unshuffle)
    state_dict = released_layout(strip_prefix(load_state_dict(weights, unsafe_pickle=unsafe_pickle)))
    try:
        spec = detect_adapter(state_dict, levels, factor)
    except CheckpointError as e:  # which of several --adapter files
        raise CheckpointError(f"adapter {path}: {e}") from None
    adapter = spec.build()
    load_strict(adapter, state_dict, str(path))
    adapter.spec = spec
    log.info("adapter %s: %s", path, spec.describe())
    return adapter.eval().requires_grad_(False)


def adapter_weights(path) -> tuple:
    """(weight file, recorded unshuffle factor or None) of a checkpoint file or a diffusers folder
    (saved, or the Hugging Face cache's models--ORG--NAME)."""
    if not os.path.isdir(path):
        return path, recorded_unshuffle(path)
    path = cache_snapshot(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"adapter folder {path} has no readable config.json of a diffusers T2IAdapter ({e})")
    kind = config.get("adapter_type", "full_adapter")
    if kind not in DIFFUSERS_TYPES:
        raise CheckpointError(f"adapter {path} is a diffusers {kind}, not one of SD 1.x's "
                              f"({', '.join(DIFFUSERS_TYPES)})" + ("; it is for SDXL" if kind.endswith("_xl") else ""))
    weights = find_weight_file(path, [MODEL_WEIGHTS])
    if weights is None:
        raise CheckpointError(f"adapter folder {path} has no {MODEL_WEIGHTS}.safetensors (or .bin)")
    factor = config.get("downscale_factor")
    return weights, factor if isinstance(factor, int) and factor >= 1 else None


def save_adapter(adapter: nn.Module, path, metadata: dict | None = None) -> None:
    """Write the weights as .safetensors in the released key layout (no prefix), so load_adapter
    (and --adapter) read them like a released file; the unshuffle factor, which the keys do not
    show, goes into the header with `metadata` (str -> str). Never overwrites a file (save_safetensors)."""
    header = {UNSHUFFLE_METADATA: str(adapter.factor), **{k: str(v) for k, v in (metadata or {}).items()}}
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, path,
                     metadata=header)


def first_stage_factor(model) -> int:
    """f, the first stage's downsampling: 1 for IdentityFirstStage (pixel space), 2^(levels-1)
    for an autoencoder (8 for SD's VAE)."""
    first_stage = getattr(model, "first_stage_model", None)
    encoder = getattr(first_stage, "encoder", None)
    if first_stage is None or type(first_stage).__name__ == "IdentityFirstStage":
        return 1
    return 2 ** (encoder.num_resolutions - 1) if hasattr(encoder, "num_resolutions") else UNSHUFFLE


def adapter_for_model(model, cond_channels: int = 1, num_res_blocks: int = 2) -> Adapter:
    """A new full adapter whose features fit `model`'s UNet: one stage per UNet level with the
    level's width, and PixelUnshuffle(f) so that level 0 comes out at the UNet's input size."""
    unet = unet_of(model)
    return Adapter(unet_level_channels(unet), cond_channels, num_res_blocks, unshuffle=first_stage_factor(model))


# --------------------------------------------------------------------------------------------
# Where the features enter the UNet
# --------------------------------------------------------------------------------------------

def injection_sites(unet) -> list:
    """Indices of the input blocks after which the features of levels 0, 1, ... are added: the
    last block of each resolution level, i.e. the block before each Downsample and the last
    input block (SD v1 and the tiny config: 2, 5, 8, 11). Read from the structure, so it holds
    for any number of res blocks per level."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample

    blocks = list(unet.input_blocks)
    downsamples = [i for i, block in enumerate(blocks) if any(isinstance(m, Downsample) for m in block.modules())]
    return [i - 1 for i in downsamples] + [len(blocks) - 1]


def unet_level_channels(unet) -> tuple:
    """Width of the UNet's hidden state at each level, which the adapter's outputs must match."""
    return tuple(unet.model_channels * mult for mult in unet.channel_mult)


def check_adapter_fits(adapter, unet, source="adapter") -> None:
    """ValueError (one line) when the adapter was made for a UNet of other widths. `unet`: the
    UNetModel, or its level widths when the model is not built yet."""
    expected = tuple(unet) if isinstance(unet, (tuple, list)) else unet_level_channels(unet)
    if tuple(adapter.channels) != expected:
        raise ValueError(f"{source} produces features of widths {list(adapter.channels)} but this UNet's levels "
                         f"have {list(expected)} (an SD v1 adapter needs an SD v1 model)")


@dataclass(eq=False)
class AdapterInjection:
    """Adapter features for one sampling run, set on `UNetModel.adapter_residuals`.

    `features[l]`: (B, C_l, H_l, W_l), already scaled by each adapter's weight and summed over
    adapters. B is 1 (one condition for all images) or the number of images. The UNet batch
    may be a multiple of B: classifier-free guidance runs `[uncond; cond]` in one batch, and
    both halves get the same features. That is what the official code does (its batch-1
    features broadcast over the CFG batch) and what the released weights were tuned with: the
    structure is then part of both predictions, and guidance amplifies only the text.
    """
    features: list
    sites: dict            # input-block index -> level
    cond_tau: float = 1.0  # use the features during this first fraction of the trajectory
    num_timesteps: int = 1000
    active: bool = True    # set per UNet call by the pre-hook
    hook: object = field(default=None, repr=False)

    def __call__(self, block_index: int, h: torch.Tensor) -> torch.Tensor:
        level = self.sites.get(block_index)
        if level is None or not self.active:
            return h
        f = self.features[level]
        if f.shape[1:] != h.shape[1:]:
            raise ValueError(f"adapter features {tuple(f.shape[1:])} do not match the UNet's hidden state "
                             f"{tuple(h.shape[1:])} after input block {block_index}: the condition image "
                             f"must have the size of the generated image")
        if h.shape[0] % f.shape[0]:
            raise ValueError(f"adapter features for {f.shape[0]} images cannot be applied to a batch of "
                             f"{h.shape[0]}")
        return h + f.to(h.dtype).repeat(h.shape[0] // f.shape[0], 1, 1, 1)

    def start_unet_call(self, t: float) -> None:
        """Official rule: the first `cond_tau` fraction of the sampling steps. Read here from the
        timestep (progress 0 = noise, 1 = image), so it holds for every sampler, also DPM-Solver's
        continuous times; at a window edge it may differ from a step-count rule by one step."""
        self.active = 1.0 - t / self.num_timesteps <= self.cond_tau


def combine_features(adapters_and_inputs) -> list:
    """sum_i weight_i * adapter_i(cond_i), per level. `adapters_and_inputs`: (adapter, cond, weight)."""
    total = None
    for adapter, cond, weight in adapters_and_inputs:
        features = [weight * f for f in adapter(cond)]
        total = features if total is None else [a + b for a, b in zip(total, features, strict=True)]
    return total


def enable_adapter(model, features, cond_tau=1.0) -> AdapterInjection:
    """Set an AdapterInjection with `features` (one tensor per UNet level) on `model`'s UNet."""
    if not 0.0 < cond_tau <= 1.0:
        raise ValueError(f"cond_tau must be in (0, 1], got {cond_tau}")
    disable_adapter(model)
    unet = unet_of(model)
    sites = injection_sites(unet)
    if len(features) != len(sites):
        raise ValueError(f"{len(features)} adapter feature maps for a UNet with {len(sites)} levels")
    injection = AdapterInjection(list(features), {block: level for level, block in enumerate(sites)},
                                 cond_tau, getattr(model, "num_timesteps", 1000))

    def pre_hook(module, args, kwargs):
        injection.start_unet_call(timestep_of_call(args, kwargs))

    injection.hook = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    unet.adapter_residuals = injection
    return injection


def disable_adapter(model) -> None:
    unet = unet_of(model)
    injection = getattr(unet, "adapter_residuals", None)
    if injection is not None and injection.hook is not None:
        injection.hook.remove()
    unet.adapter_residuals = None


@contextmanager
def adapter_conditioning(model, features, cond_tau=1.0):
    """`with adapter_conditioning(model, features, tau): ...` - features added inside, the model
    restored in `finally`. `features=None` is a no-op, so callers need no branch."""
    if features is None:
        yield None
        return
    injection = enable_adapter(model, features, cond_tau)
    try:
        yield injection
    finally:
        disable_adapter(model)


# --------------------------------------------------------------------------------------------
# Command line (scripts/txt2img.py)
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class AdapterUse:
    """One --adapter with its condition images, loaded and checked."""
    ckpt: str
    files: list
    cond_type: str
    weight: float
    adapter: nn.Module
    conds: torch.Tensor  # (1 or n_samples, cond_channels, H, W) in [0, 1]

    def describe(self) -> dict:
        return {"ckpt": self.ckpt, "cond": self.files, "cond_type": self.cond_type, "weight": self.weight,
                **self.adapter.spec.describe()}


@dataclass(eq=False)
class AdapterRun:
    """All adapters of a run. `prepare` computes the summed features once, on the model's device;
    `conditioning(model, run, n)` applies them to each batch of n images."""
    uses: list
    cond_tau: float
    features: list = None

    def describe(self) -> dict:
        return {"cond_tau": self.cond_tau, "adapters": [use.describe() for use in self.uses]}

    def prepare(self, model, device) -> None:
        unet = unet_of(model)
        try:
            for use in self.uses:
                check_adapter_fits(use.adapter, unet, f"adapter {use.ckpt}")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        batch = max(use.conds.shape[0] for use in self.uses)
        # one condition for all images is expanded, so every adapter contributes (batch, ...) maps
        self.features = combine_features((use.adapter.to(device), use.conds.to(device).expand(batch, -1, -1, -1),
                                          use.weight) for use in self.uses)

    def batch_features(self, n: int, plain_first: int = 0) -> list:
        """Features for a batch of the first n images (the last prompt batch may be smaller), behind
        `plain_first` images that get none: --reference-image's anchor is the reference as it is, so
        no condition reshapes the keys/values the other images read from it."""
        return behind_plain_images([f[:n] for f in self.features], n, plain_first)


def behind_plain_images(features: list, n: int, plain_first: int) -> list:
    """Features (1 or n images per level) for a batch of n images behind `plain_first` that get none."""
    if not plain_first:
        return features
    return [torch.cat([f.new_zeros(plain_first, *f.shape[1:]), f.expand(n, -1, -1, -1)]) for f in features]


def conditioning(model, run: AdapterRun | None, n: int, plain_first: int = 0):
    """adapter_conditioning for a batch of n images behind `plain_first` images without adapter
    features, or a no-op without adapters."""
    if run is None:
        return adapter_conditioning(model, None)
    return adapter_conditioning(model, run.batch_features(n, plain_first), run.cond_tau)


def add_arguments(parser):
    from ldm.modules.adapter_conditions import COND_TYPES

    group = parser.add_argument_group(
        "T2I-Adapter (steer the layout with an edge map, sketch, depth, pose or palette); "
        "repeat --adapter/--cond/--cond-type[/--adapter-weight] to combine adapters")
    group.add_argument("--adapter", action="append", metavar="CKPT", type=in_repo,
                       help="T2I-Adapter checkpoint (e.g. t2iadapter_canny_sd14v1.pth or .safetensors), or a "
                            "diffusers T2IAdapter folder (config.json and its weights)")
    group.add_argument("--cond", action="append", nargs="+", metavar="IMAGE|DIR", type=in_repo,
                       help="condition image(s) for that adapter: one for all images, or one per image "
                            "(files or a folder; as many as --n_samples); same size as --W x --H")
    group.add_argument("--cond-type", action="append", choices=sorted(COND_TYPES),
                       help="how to turn the image into the adapter's input: canny and color preprocess a "
                            "photo; sketch, depth, seg, keypose, openpose take ready-made maps; passthrough "
                            "feeds any map as grey or RGB")
    group.add_argument("--adapter-weight", action="append", type=float, metavar="W",
                       help="scale of that adapter's features (default 1.0)")
    group.add_argument("--cond-tau", type=float, metavar="TAU",
                       help="use the adapters during the first TAU fraction of the sampling trajectory "
                            "(0 = noise, 1 = image; img2img starts at 1 - strength), in (0, 1] "
                            "(default 1.0: all steps)")


def _unet_widths(config_path):
    """The level widths of the config's UNet, or None when the config is unusual."""
    try:
        from omegaconf import OmegaConf
        params = OmegaConf.load(config_path).model.params.unet_config.params
        return tuple(params.model_channels * mult for mult in params.channel_mult)
    except Exception:  # an unusual config: the widths are checked again once the model is built
        return None


def run_from_arguments(opt, parser, n_samples: int, width: int, height: int,
                       size_hint: str | None = None) -> AdapterRun | None:
    """The AdapterRun the flags ask for, or None. Loads the adapters and condition images on the
    CPU; every problem ends in one parser.error line. `size_hint`: how the user changes the
    output size, for the error when a condition image has another size."""
    from ldm.modules.adapter_conditions import condition_batch, condition_files

    given = [flag for flag, value in (("--cond", opt.cond), ("--cond-type", opt.cond_type),
                                      ("--adapter-weight", opt.adapter_weight), ("--cond-tau", opt.cond_tau))
             if value is not None]
    if not opt.adapter:
        if given:
            parser.error(f"{', '.join(given)} {'takes' if len(given) == 1 else 'take'} effect only with "
                         f"--adapter CKPT; add it")
        return None
    n = len(opt.adapter)
    weights = opt.adapter_weight or [1.0] * n
    for flag, values in (("--cond", opt.cond), ("--cond-type", opt.cond_type), ("--adapter-weight", weights)):
        if values is None or len(values) != n:
            parser.error(f"{n} --adapter given but {len(values or [])} {flag}: give one {flag} per --adapter, "
                         f"in the same order")
    if not all(math.isfinite(w) for w in weights):
        parser.error(f"--adapter-weight must be finite numbers, got {', '.join(map(str, weights))}")
    cond_tau = 1.0 if opt.cond_tau is None else opt.cond_tau
    if not 0.0 < cond_tau <= 1.0:
        parser.error(f"--cond-tau must be in (0, 1], got {cond_tau}")
    widths = _unet_widths(opt.config)
    factor = getattr(opt, "f", None)  # --f: the first stage's downsampling, which the adapter must share
    uses = []
    for ckpt, entries, cond_type, weight in zip(opt.adapter, opt.cond, opt.cond_type, weights):
        try:
            if not os.path.exists(ckpt):
                raise ValueError(f"adapter checkpoint not found: {ckpt}")
            adapter = load_adapter(ckpt, levels=len(widths) if widths else 4, unshuffle=factor,
                                   unsafe_pickle=getattr(opt, "unsafe_pickle", False))
            if widths:
                check_adapter_fits(adapter, widths, f"adapter {ckpt}")
            files = condition_files(entries)
            if len(files) not in (1, n_samples):
                raise ValueError(f"{len(files)} condition images for adapter {ckpt}: give one image for all "
                                 f"samples or exactly --n_samples ({n_samples})")
            conds = condition_batch(files, cond_type, adapter.cond_channels, width, height, size_hint,
                                    adapter.downsampling, opt.display_scale)
        except (CheckpointError, ValueError) as e:
            parser.error(str(e))
        uses.append(AdapterUse(ckpt, files, cond_type, weight, adapter, conds))
    return AdapterRun(uses, cond_tau)
