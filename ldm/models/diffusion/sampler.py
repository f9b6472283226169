"""What the DDIM, PLMS and DPM-Solver samplers share: upstream's `sample` signature, checked once,
and the guided noise estimate. A sampler subclass says what it is (`min_steps`, `stochastic`) and
implements `make_schedule` and `sampling_loop`; classifier-free guidance is in guidance.py."""
import dataclasses
import logging
from typing import Any, Callable, Optional

import torch

from ldm.models.diffusion.guidance import check_conditioning_batch, guided_eps
from ldm.util import ModelError

logger = logging.getLogger(__name__)


def check_predicts_noise(parameterization, sampler="DDIM, PLMS and DPM-Solver"):
    """The fast samplers step with the model's output as the noise: an x0-predicting model (upstream
    accepted one and sampled noise from it) samples with its full chain only."""
    if parameterization != "eps":
        raise ModelError(f"{sampler} sample noise-predicting models (parameterization: eps); this one predicts "
                         f"{parameterization}: sample it with its full chain (model.sample, or "
                         "scripts/sample_diffusion.py -v)")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class SamplingOptions:
    """What a sampling loop is given besides the conditioning and its start: upstream's `sample`
    options, passed on as one value instead of thirteen keywords per loop."""
    guidance_scale: float = 1.
    uncond: Any = None                          # the unconditional conditioning (classifier-free guidance)
    mask: Optional[torch.Tensor] = None         # 1 where x0 is known (inpainting, reference anchors)
    x0: Optional[torch.Tensor] = None
    callback: Optional[Callable] = None         # callback(step index), after every step
    img_callback: Optional[Callable] = None     # img_callback(predicted x0, step index)
    quantize_x0: bool = False
    temperature: float = 1.                     # scales the step noise (eta > 0)
    noise_dropout: float = 0.
    score_corrector: Any = None
    corrector_kwargs: Optional[dict] = None
    log_every_t: int = 100                      # intermediates kept every this many steps
    verbose: bool = True

    def changed(self, *names):
        """Those of `names` set to other than their default (what a loop that cannot honour them
        refuses); an option whose default is None counts as set when it is not None."""
        fields = {f.name: f.default for f in dataclasses.fields(self)}
        unknown = [name for name in names if name not in fields]
        if unknown:  # a misspelt name would silently turn a refusal off
            raise ValueError(f"SamplingOptions has no option {unknown[0]!r}")
        return [name for name in names if (getattr(self, name) is not None if fields[name] is None
                                           else getattr(self, name) != fields[name])]


class Sampler:
    min_steps = 1        # fewest sampling steps the method can take
    stochastic = False   # whether eta (fresh noise at every step) applies; else eta must be 0

    def __init__(self, model, schedule="linear"):
        check_predicts_noise(getattr(model, "parameterization", "eps"), type(self).__name__)
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def register_buffer(self, name, attr):
        # Tensors follow the model (CPU, CUDA, ...); upstream forced CUDA here.
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.betas.device)
        setattr(self, name, attr)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0., mask=None, x0=None, temperature=1.,
               noise_dropout=0., score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1., unconditional_conditioning=None):
        """`S` steps from `x_T` (default: fresh noise) to (samples, intermediates): upstream's
        signature, whose **kwargs used to swallow misspelt options (now a TypeError).
        `normals_sequence` is upstream's and no sampler reads it, so it is refused, as are
        `corrector_kwargs` without the `score_corrector` they are for. `mask`/`x0` keep the known
        part of x0 (inpainting)."""
        check_conditioning_batch(conditioning, batch_size)
        if normals_sequence is not None:
            raise ValueError("normals_sequence is not used by any sampler (upstream ignored it): leave it out")
        if corrector_kwargs is not None and score_corrector is None:
            raise ValueError("corrector_kwargs are the score_corrector's arguments: pass a score_corrector too")
        if not self.min_steps <= S < self.ddpm_num_timesteps:
            raise ValueError(f"{type(self).__name__} takes {self.min_steps} to {self.ddpm_num_timesteps - 1} "
                             f"steps, got {S}")
        if eta != 0 and not self.stochastic:
            raise ValueError(f"{type(self).__name__} is deterministic: eta must be 0, got {eta}")
        if not 0 <= eta <= 1:  # above 1 the step's noise outweighs what is left of 1 - alpha: sqrt of < 0, NaN
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        logger.debug("%s: %d steps, data shape %s, eta %s", type(self).__name__, S, size, eta)
        x_T = torch.randn(size, device=self.model.betas.device) if x_T is None else x_T
        options = SamplingOptions(
            guidance_scale=unconditional_guidance_scale, uncond=unconditional_conditioning, mask=mask, x0=x0,
            callback=callback, img_callback=img_callback, quantize_x0=quantize_x0, temperature=temperature,
            noise_dropout=noise_dropout, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            log_every_t=log_every_t, verbose=verbose)
        return self.sampling_loop(conditioning, x_T, options)

    def model_timesteps(self, S):
        """The timesteps at which sampling `S` steps calls the model, found without calling it: the
        loop runs on one zero latent pixel with a zero noise estimate (what a step window is checked
        against before any image is sampled). The random state is restored: DDIM draws its eta
        noise even at eta 0, and the run that follows must draw what it would have drawn."""
        called = []

        def zero_estimate(x, t, *args, **kwargs):
            called.append(float(t[0]))
            return torch.zeros_like(x)

        device = self.model.betas.device
        self.noise_estimate = zero_estimate  # shadows the method for this one run
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.sample(S, 1, [1, 1, 1], x_T=torch.zeros(1, 1, 1, 1, device=device), verbose=False)
        finally:
            del self.noise_estimate
        return called

    def noise_estimate(self, x, t, cond, uncond, scale, score_corrector=None, corrector_kwargs=None):
        """The guided noise prediction at (x, t), corrected by `score_corrector` if given."""
        e_t = guided_eps(self.model, x, t, cond, uncond, scale)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, cond, **(corrector_kwargs or {}))
        return e_t

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        raise NotImplementedError

    def sampling_loop(self, cond, x_T, options: SamplingOptions):
        """(samples, intermediates) from x_T, on the schedule `make_schedule` set."""
        raise NotImplementedError
