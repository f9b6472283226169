"""Training a T2I-Adapter for a frozen text-to-image model (scripts/train_adapter.py).

The recipe of T2I-Adapter (Mou et al. 2023, sec. 3.4): the diffusion model is frozen, only the
adapter learns, with the model's own denoising loss; the adapter's features are added to the
UNet's hidden states as at sampling time (ldm.modules.adapters.adapter_conditioning), so what is
trained is exactly what txt2img runs.

Timesteps are drawn *cubically*, t = (1 - u^3) * T with u ~ U(0, 1), instead of uniformly:
the layout of an image is decided in the early, noisy steps (large t), so that is where a
structure condition must be learned; the cubic draw puts 3/4 of the mass above t = T/2
(P(t/T > 1/2) = 0.5^(1/3) = 0.79, mean t/T = 3/4). The same formula is used by the upstream
adapter training scripts (diffusers' train_t2i_adapter_sdxl.py: 1 - u**3, floor, clamp).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ldm.modules.adapters import adapter_conditioning
from ldm.modules.ema import warm_up_decay

TIMESTEP_SAMPLING = ("cubic", "uniform")


def sample_timesteps(n: int, num_timesteps: int, sampling: str = "cubic", device=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """n integer timesteps in [0, num_timesteps): cubic (t = floor((1 - u^3) T), the T2I-Adapter
    schedule, biased to the noisy end) or uniform (the base model's training)."""
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling {sampling!r}; expected one of {TIMESTEP_SAMPLING}")
    u = torch.rand(n, device=device, generator=generator)
    if sampling == "cubic":
        u = 1.0 - u ** 3
    return (u * num_timesteps).long().clamp_(0, num_timesteps - 1)


def images_of(batch, device) -> torch.Tensor:
    """The data's HxWxC images in [-1, 1] as (B, C, H, W) on `device` (what LatentDiffusion.get_input does)."""
    return batch["image"].to(device).permute(0, 3, 1, 2).contiguous().float()


@torch.no_grad()
def encode_batch(model, batch, device):
    """(x0, text context, condition) of a data batch, all without gradients: the first stage and
    the text encoder are frozen, so nothing upstream of the adapter needs a graph."""
    x0 = model.get_first_stage_encoding(model.encode_first_stage(images_of(batch, device)))
    context = model.get_learned_conditioning(list(batch["caption"]))
    return x0, context, batch["cond"].to(device).float()


def diffusion_loss(model, adapter, x0, context, cond, t, noise) -> torch.Tensor:
    """The model's simple loss (MSE to the noise for eps-prediction, to x0 for x0-prediction) with
    the adapter's features of `cond` added to the UNet. adapter=None: the frozen model alone."""
    x_t = model.q_sample(x0, t, noise)
    features = adapter(cond) if adapter is not None else None
    with adapter_conditioning(model, features):
        prediction = model.apply_model(x_t, t, context)
    target = noise if model.parameterization == "eps" else x0
    return F.mse_loss(prediction.float(), target.float())


class AdapterEMA:
    """Exponential moving average of the adapter's weights, with LitEma's warm-up
    decay = min(decay, (1 + n) / (10 + n)): a short run is not dominated by its first steps
    (at n = 2000 the effective decay is 0.9955, a horizon of ~220 steps)."""

    def __init__(self, adapter, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(adapter).eval().requires_grad_(False)

    @property
    def current_decay(self) -> float:
        """The decay of the latest update: below the one asked for until (1 + n) / (10 + n) passes it
        (0.999 only after ~9000 updates)."""
        return warm_up_decay(self.decay, self.updates)

    @torch.no_grad()
    def update(self, adapter) -> None:
        self.updates += 1
        decay = self.current_decay
        for mine, theirs in zip(self.shadow.parameters(), adapter.parameters()):
            mine.lerp_(theirs, 1.0 - decay)
