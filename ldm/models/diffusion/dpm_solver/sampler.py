"""DPM-Solver++ (Lu et al. 2022), second-order multistep, behind the samplers' shared `sample`."""
import torch

from ldm.models.diffusion.sampler import Sampler
from .dpm_solver import NoiseScheduleVP, DPM_Solver


class DPMSolverSampler(Sampler):
    min_steps = 2  # order 2: the first step is first order, the rest use the previous one too (and under
                   # 15 steps the last is first order again: DPM_Solver.sample)

    def __init__(self, model, schedule="linear"):
        super().__init__(model, schedule)
        to_torch = lambda x: x.clone().detach().to(torch.float32).to(model.device)
        self.register_buffer('alphas_cumprod', to_torch(model.alphas_cumprod))

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        # the solver places its own steps (uniform in time); only their number is given
        self.steps = ddim_num_steps

    @torch.no_grad()
    def sampling_loop(self, cond, x_T, options):
        """Returns (samples, None): no intermediates. DDIM/PLMS options it cannot honour are refused.
        `mask`/`x0`: the model sees the known part (mask 1) as x0 noised to each call's level."""
        refused = options.changed("callback", "img_callback", "quantize_x0", "temperature", "noise_dropout",
                                  "score_corrector")
        if refused:
            raise ValueError(f"DPMSolverSampler does not support {', '.join(refused)} (use DDIMSampler)")
        ns = NoiseScheduleVP(self.alphas_cumprod)
        # Guidance happens in noise_estimate (shared with DDIM/PLMS); the solver's continuous time
        # becomes the model's timestep here.
        model_fn = lambda x, t: self.noise_estimate(x, ns.model_time(t), cond, options.uncond,
                                                    options.guidance_scale)
        if options.mask is not None:
            model_fn = with_known_part(model_fn, ns, options.mask, options.x0)
        # A pixel-space model's x_0 is clipped to [-1, 1] as in DDIM (ddim.py says why). Not the
        # solver's own dynamic thresholding: rescaling the early, wide x_0 greys the small model's images.
        solver = ClippedDPMSolver if self.model.clip_denoised else DPM_Solver
        x = solver(model_fn, ns).sample(x_T, steps=self.steps)
        return x.to(self.model.betas.device), None


def with_known_part(model_fn, ns, mask, x0):
    """model_fn whose input has its known part (mask 1) replaced by x0 noised to the solver's level
    at t, with fresh noise per call: DDIM's mask/x0 replacement (ddim.py, `keep_known`), made on
    the model's input because the solver's multistep state is not the sampler's to overwrite. What
    the other images read of the known part (shared attention, --reference-image) is then the same
    as under DDIM; the known part's own output follows the model's predictions of x0."""
    assert x0 is not None

    def known_model_fn(x, t_continuous):
        level = lambda f: f(t_continuous).reshape(-1, 1, 1, 1)
        noised = level(ns.marginal_alpha) * x0 + level(ns.marginal_std) * torch.randn_like(x0)
        return model_fn(noised * mask + (1. - mask) * x, t_continuous)
    return known_model_fn


class ClippedDPMSolver(DPM_Solver):
    """DPM-Solver++ whose data prediction x_0 is clipped to the pixels' [-1, 1]."""

    def data_prediction_fn(self, x, t):
        return super().data_prediction_fn(x, t).clamp(-1., 1.)
