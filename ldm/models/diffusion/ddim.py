"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"). PLMS (plms.py) is
DDIM's update with a multistep noise estimate, so it reuses this class's schedule, loop and update;
the `sample` signature and the guided noise estimate are shared with DPM-Solver (sampler.py)."""

import logging

import torch
import numpy as np
from tqdm import tqdm

from ldm.models.diffusion.sampler import Sampler, SamplingOptions
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps, noise_like, \
    extract_into_tensor

logger = logging.getLogger(__name__)


class DDIMSampler(Sampler):
    stochastic = True  # eta > 0 adds fresh noise at every step (eta = 1: DDPM's ancestral sampling)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=ddim_discretize, num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps,verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, 'alphas have to be defined for each timestep'
        # ddim sampling parameters
        ddim_sigmas, ddim_alphas, ddim_alphas_prev = make_ddim_sampling_parameters(alphacums=alphas_cumprod.cpu(),
                                                                                   ddim_timesteps=self.ddim_timesteps,
                                                                                   eta=ddim_eta,verbose=verbose)
        self.register_buffer('ddim_sigmas', ddim_sigmas)
        self.register_buffer('ddim_alphas', ddim_alphas)
        self.register_buffer('ddim_alphas_prev', ddim_alphas_prev)
        self.register_buffer('ddim_sqrt_one_minus_alphas', torch.sqrt(1. - ddim_alphas))

    @torch.no_grad()
    def sampling_loop(self, cond, x_T, options, t_start=None):
        """From x_T, at schedule step t_start - 1 (None: the last), down the schedule; `denoise_step`
        is what DDIM and PLMS do differently."""
        o = options
        device = self.model.betas.device
        b = x_T.shape[0]
        img = x_T

        intermediates = {'x_inter': [img], 'pred_x0': [img]}
        time_range = np.flip(self.ddim_timesteps[:t_start])
        total_steps = len(time_range)
        logger.debug("Running %s with %d timesteps", type(self).__name__, total_steps)

        eps = lambda x, t: self.noise_estimate(x, t, cond, o.uncond, o.guidance_scale, o.score_corrector,
                                               o.corrector_kwargs)
        fresh, known_noise = rows_to_noise(o.mask, b), known_part_generator(o.mask, device)
        update = lambda x, e_t, index: self.ddim_update(x, e_t, index, o.quantize_x0, o.temperature, o.noise_dropout,
                                                        fresh)
        history = []  # earlier noise estimates, for multistep methods (PLMS)
        iterator = tqdm(time_range, desc=type(self).__name__, total=total_steps, disable=not o.verbose)
        for i, step in enumerate(iterator):
            index = total_steps - i - 1
            ts = torch.full((b,), step, device=device, dtype=torch.long)
            ts_next = torch.full((b,), time_range[min(i + 1, len(time_range) - 1)], device=device, dtype=torch.long)

            img = self.keep_known(img, ts, o.mask, o.x0, known_noise)
            img, pred_x0 = self.denoise_step(img, ts, ts_next, index, eps, update, history)
            if o.callback: o.callback(i)
            if o.img_callback: o.img_callback(pred_x0, i)

            if index % o.log_every_t == 0 or index == total_steps - 1:
                intermediates['x_inter'].append(img)
                intermediates['pred_x0'].append(pred_x0)

        return img, intermediates

    def keep_known(self, x, t, mask, x0, generator=None):
        """x with its known part (mask 1) replaced by x0 noised to timestep t: upstream's inpainting
        replacement, before each step (also how --reference-image keeps its anchor at the reference).
        The noise comes from `generator` (`known_part_generator`)."""
        if mask is None:
            return x
        assert x0 is not None
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.model.q_sample(x0, t, noise=noise) * mask + (1. - mask) * x

    def denoise_step(self, x, t, t_next, index, eps, update, history):
        """One DDIM step: x_{t-1} and the predicted x_0 from the noise estimate at (x, t)."""
        return update(x, eps(x, t), index)

    def ddim_update(self, x, e_t, index, quantize_denoised=False, temperature=1., noise_dropout=0., fresh=None):
        """x_{t-1} and the predicted x_0, from x_t and the noise estimate e_t at schedule step `index`;
        step noise for the images `fresh` only (`rows_to_noise`; None: all)."""
        b, device = x.shape[0], x.device
        # the parameters of schedule step `index`, one per image
        a_t = torch.full((b, 1, 1, 1), self.ddim_alphas[index], device=device)
        a_prev = torch.full((b, 1, 1, 1), self.ddim_alphas_prev[index], device=device)
        sigma_t = torch.full((b, 1, 1, 1), self.ddim_sigmas[index], device=device)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), self.ddim_sqrt_one_minus_alphas[index], device=device)

        # current prediction for x_0
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        if self.model.clip_denoised:
            # Pixel-space data lies in [-1, 1]. On the deterministic (eta = 0) path an error in x_0
            # is never re-noised away: a small model's overshoot on saturated colours stays as
            # pixel noise in the final image. Clip x_0 and re-derive the noise from it (as GLIDE
            # does), so x_{t-1} stays on the DDIM line between x_t and the clipped x_0.
            pred_x0 = pred_x0.clamp(-1., 1.)
            e_t = (x - a_t.sqrt() * pred_x0) / sqrt_one_minus_at
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        # direction pointing to x_t
        dir_xt = (1. - a_prev - sigma_t**2).sqrt() * e_t
        if fresh is None:
            noise = self.step_noise(x.shape, device, index)
        else:  # the others are replaced before the next step
            noise = torch.zeros(x.shape, device=device)
            noise[fresh] = self.step_noise((len(fresh), *x.shape[1:]), device, index)
        noise = sigma_t * noise * temperature
        if noise_dropout > 0.:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0

    def step_noise(self, shape, device, index):
        """The fresh noise of schedule step `index` (scaled by eta's sigma; drawn at eta 0 too, as
        upstream did): from the global generator. scripts/consistency_benchmark.py draws it per image."""
        return noise_like(shape, device)

    @torch.no_grad()
    def stochastic_encode(self, x0, t, noise=None):
        """x0 noised to DDIM schedule step `t` (an index per image, not a timestep) in one jump:
        fast, but decoding does not reconstruct x0 exactly."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (extract_into_tensor(torch.sqrt(self.ddim_alphas), t, x0.shape) * x0 +
                extract_into_tensor(self.ddim_sqrt_one_minus_alphas, t, x0.shape) * noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               verbose=True, mask=None, x0=None):
        """Denoise `x_latent`, noised to schedule step t_start - 1 (`stochastic_encode`), down the
        first t_start steps: img2img's half of the sampling loop, with this sampler's steps (a
        PLMSSampler's are PLMS's); `mask`/`x0` as in `sample`."""
        options = SamplingOptions(guidance_scale=unconditional_guidance_scale, uncond=unconditional_conditioning,
                                  mask=mask, x0=x0, verbose=verbose)
        latents, _ = self.sampling_loop(cond, x_latent, options, t_start)
        return latents


# A batch with known images (--reference-image's anchors, mask 1 all over) must sample its other
# images exactly as the same batch without them: with the same seed, what a reference changes in
# them is then what the images read from it, not other random numbers. So the known images draw
# no step noise (they are replaced before every step anyway), and the noise that keeps them at the
# reference comes from a generator of their own, not from the global one the step noise comes from.

def rows_to_noise(mask, n):
    """The images of a batch of `n` that need DDIM's step noise: those not known all over. None: all."""
    if mask is None or mask.shape[0] != n:
        return None
    fresh = (mask.reshape(n, -1) < 1).any(1)
    return None if fresh.all() else fresh.nonzero().squeeze(1)


def known_part_generator(mask, device):
    """The generator of the noise that keeps a known part at x0's noise level (`keep_known`), seeded
    from the global one's state without advancing it (so it follows the run's seed); None without a mask."""
    if mask is None:
        return None
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(2**62, ()))
    return torch.Generator(device).manual_seed(seed)
