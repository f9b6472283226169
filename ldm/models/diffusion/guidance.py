"""Helpers shared by the DDIM, PLMS and DPM-Solver samplers: classifier-free guidance and
conditioning checks."""
import logging

import torch

logger = logging.getLogger(__name__)


def guided_eps(model, x, t, cond, uncond, scale):
    """Noise prediction of ``model`` at (x, t), with classifier-free guidance.

    Returns ``model.apply_model(x, t, cond)`` when ``uncond is None or scale == 1``.
    Otherwise runs ONE batched ``apply_model`` call and returns
    ``e_uncond + scale * (e_cond - e_uncond)``.

    Batch layout of that call (other code, e.g. attention that shares keys/values between
    the images of a batch, relies on it): ``torch.cat([x, x])``, ``torch.cat([t, t])`` and
    ``cat([uncond, cond])`` - the FIRST half is the unconditional pass, the SECOND half the
    conditional one, and each half holds the same images in the same order (B each).

    ``cond``/``uncond`` are tensors, or dicts as used by hybrid/concat models
    (e.g. ``{"c_concat": [tensor], "c_crossattn": [tensor]}``); dict values that are lists are
    concatenated element-wise, tensors directly. Both must have the same structure.
    """
    if uncond is None or scale == 1.:
        return model.apply_model(x, t, cond)
    x_in = torch.cat([x, x])
    t_in = torch.cat([t, t])
    c_in = _cat_conditioning(uncond, cond)
    e_uncond, e_cond = model.apply_model(x_in, t_in, c_in).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def _cat_conditioning(uncond, cond):
    """Stack an unconditional and a conditional conditioning along the batch, uncond first."""
    if isinstance(cond, dict):
        return {key: _cat_conditioning(uncond[key], cond[key]) for key in cond}
    if isinstance(cond, (list, tuple)):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def check_conditioning_batch(conditioning, batch_size):
    """Warn (as upstream did) when the conditioning's batch size differs from ``batch_size``."""
    if conditioning is None:
        return
    if isinstance(conditioning, dict):
        first = conditioning[next(iter(conditioning))]
        n = (first[0] if isinstance(first, (list, tuple)) else first).shape[0]
    else:
        n = conditioning.shape[0]
    if n != batch_size:
        logger.warning("Got %d conditionings but batch-size is %d", n, batch_size)
