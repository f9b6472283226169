# adopted from
# https://github.com/openai/improved-diffusion/blob/main/improved_diffusion/gaussian_diffusion.py
# and
# https://github.com/lucidrains/denoising-diffusion-pytorch/blob/7706bdfc6f527f58d33f84b7b522e61e6e3164b3/denoising_diffusion_pytorch/denoising_diffusion_pytorch.py
# and
# https://github.com/openai/guided-diffusion/blob/0ba878e517b276c45d1195eb29f6f5f72659a05b/guided_diffusion/nn.py
#
# thanks!


import contextvars
import functools
import logging
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
import numpy as np
from einops import repeat


logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = 1000  # of the training noise schedule, where a config leaves model.params.timesteps out


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    if schedule == "linear":
        betas = (
                torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
        )

    elif schedule == "cosine":
        timesteps = (
                torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        )
        alphas = timesteps / (1 + cosine_s) * np.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = np.clip(betas, a_min=0, a_max=0.999)

    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """The ``num_ddim_timesteps`` DDPM timesteps (1-based) a DDIM/PLMS sampler visits, ascending.

    'uniform' spaces them evenly: step i is floor(i * T / n), so for step counts dividing T
    this equals upstream's range(0, T, T // n); for other counts (3, 9, 27 with T = 1000)
    it still gives exactly n distinct steps instead of n + 1.
    """
    # the +1 below shifts the steps to 1..T: T steps would end at timestep T, past the schedule
    if not 1 <= num_ddim_timesteps < num_ddpm_timesteps:
        raise ValueError(f"number of sampling steps must be between 1 and {num_ddpm_timesteps - 1}, "
                         f"got {num_ddim_timesteps}")
    # upstream's other method, 'quad', is gone: it gave repeated steps (49 distinct of 50), and
    # nothing passed it
    if ddim_discr_method != 'uniform':
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    ddim_timesteps = np.arange(num_ddim_timesteps) * num_ddpm_timesteps // num_ddim_timesteps

    # add one to get the final alpha values right (the ones from first scale to data during sampling)
    steps_out = ddim_timesteps + 1
    if verbose:
        logger.debug("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    # select alphas for computing the variance schedule
    alphacums = torch.as_tensor(alphacums)
    ddim_timesteps = torch.as_tensor(ddim_timesteps)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = torch.cat([alphacums[:1], alphacums[ddim_timesteps[:-1]]])

    # according the the formula provided in https://arxiv.org/abs/2010.02502
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        logger.debug("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        logger.debug("For eta=%s the sigma_t schedule of the ddim sampler is %s", eta, sigmas)
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def checkpoint(func, inputs, params, flag):
    """
    Evaluate a function without caching intermediate activations, allowing for
    reduced memory at the expense of extra compute in the backward pass.
    :param func: the function to evaluate.
    :param inputs: the argument sequence to pass to `func`.
    :param params: unused; kept for upstream signature compatibility (non-reentrant
                   checkpointing tracks the parameters `func` uses by itself).
    :param flag: if False, disable gradient checkpointing.
    """
    if flag and torch.is_grad_enabled():
        # marks the recomputation (`recomputing`); torch.compile traces only its own context functions
        marked = {} if torch.compiler.is_compiling() else {"context_fn": lambda: (nullcontext(), _recomputation())}
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False, **marked)
    return func(*inputs)


_RECOMPUTING = contextvars.ContextVar("recomputing", default=False)


def recomputing() -> bool:
    """Whether this runs in `checkpoint`'s recomputation of a function, in the backward pass: after
    the forward pass has gone on, so state that one model call sets for the layers it runs (a
    step window, a draw of tokens) may belong to a later call by then. Never under torch.compile,
    which neither marks it nor traces a context variable."""
    return not torch.compiler.is_compiling() and _RECOMPUTING.get()


@contextmanager
def _recomputation():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


@functools.lru_cache(maxsize=None)
def timestep_frequencies(half, max_period, device):
    """The embedding's `half` frequencies, computed on the CPU as upstream computed them (the same
    float32 values on every device) and copied to `device` once, not at every UNet call: a
    host-to-device copy synchronises the stream, which CUDA graph capture refuses. Made outside
    inference mode, so that a model that sampled under it can still train."""
    with torch.inference_mode(False):
        return torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device)


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """
    Create sinusoidal timestep embeddings.
    :param timesteps: a 1-D Tensor of N indices, one per batch element.
                      These may be fractional.
    :param dim: the dimension of the output.
    :param max_period: controls the minimum frequency of the embeddings.
    :return: an [N x dim] Tensor of positional embeddings.
    """
    if not repeat_only:
        half = dim // 2
        freqs = timestep_frequencies(half, max_period, timesteps.device)
        args = timesteps[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    else:
        embedding = repeat(timesteps, 'b -> b d', d=dim)
    return embedding


def zero_module(module):
    """
    Zero out the parameters of a module and return it.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


def normalization(channels):
    """
    Make a standard normalization layer.
    :param channels: number of input channels.
    :return: an nn.Module for normalization.
    """
    return GroupNorm32(32, channels)


# PyTorch 1.7 has SiLU, but we support PyTorch 1.5.
class SiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        # Statistics in float32 as upstream, and the affine parameters with them: group_norm wants
        # one dtype, so a UNet converted with .half() / .to(torch.bfloat16) would fail otherwise.
        # For float32 parameters .float() returns them as they are: nothing changes there.
        weight, bias = (p.float() if p is not None else None for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)

def conv_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D, or 3D convolution module.
    """
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    elif dims == 2:
        return nn.Conv2d(*args, **kwargs)
    elif dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs):
    """
    Create a linear module.
    """
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """
    Create a 1D, 2D, or 3D average pooling module.
    """
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    elif dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    elif dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def noise_like(shape, device, repeat=False):
    repeat_noise = lambda: torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    noise = lambda: torch.randn(shape, device=device)
    return repeat_noise() if repeat else noise()