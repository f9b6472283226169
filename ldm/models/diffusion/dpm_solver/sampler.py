"""SAMPLING ONLY."""

import logging

import torch

from ldm.models.diffusion.guidance import check_conditioning_batch, guided_eps
from .dpm_solver import NoiseScheduleVP, model_wrapper, DPM_Solver

logger = logging.getLogger(__name__)


class DPMSolverSampler(object):
    def __init__(self, model, **kwargs):
        super().__init__()
        self.model = model
        to_torch = lambda x: x.clone().detach().to(torch.float32).to(model.device)
        self.register_buffer('alphas_cumprod', to_torch(model.alphas_cumprod))

    def register_buffer(self, name, attr):
        # Tensors follow the model (CPU, CUDA, ...); upstream forced CUDA here.
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.betas.device)
        setattr(self, name, attr)

    @torch.no_grad()
    def sample(self,
               S,
               batch_size,
               shape,
               conditioning=None,
               callback=None,
               normals_sequence=None,
               img_callback=None,
               quantize_x0=False,
               eta=0.,
               mask=None,
               x0=None,
               temperature=1.,
               noise_dropout=0.,
               score_corrector=None,
               corrector_kwargs=None,
               verbose=True,
               x_T=None,
               log_every_t=100,
               unconditional_guidance_scale=1.,
               unconditional_conditioning=None,
               # this has to come in the same format as the conditioning, # e.g. as encoded tokens, ...
               **kwargs
               ):
        check_conditioning_batch(conditioning, batch_size)

        # sampling
        C, H, W = shape
        size = (batch_size, C, H, W)

        logger.debug('Data shape for DPM-Solver sampling is %s, sampling steps %d', size, S)

        device = self.model.betas.device
        if x_T is None:
            img = torch.randn(size, device=device)
        else:
            img = x_T

        ns = NoiseScheduleVP('discrete', alphas_cumprod=self.alphas_cumprod)

        # Guidance happens in guided_eps (shared with DDIM/PLMS), so the wrapper only converts
        # DPM-Solver's continuous time to the model's timestep ("uncond" = no extra guidance).
        model_fn = model_wrapper(
            lambda x, t: guided_eps(self.model, x, t, conditioning,
                                    unconditional_conditioning, unconditional_guidance_scale),
            ns,
            model_type="noise",
            guidance_type="uncond",
        )

        dpm_solver = DPM_Solver(model_fn, ns, predict_x0=True, thresholding=False)
        x = dpm_solver.sample(img, steps=S, skip_type="time_uniform", method="multistep", order=2, lower_order_final=True)

        return x.to(device), None
