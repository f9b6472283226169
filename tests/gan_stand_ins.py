"""Stand-ins for taming-transformers' LPIPS (pretrained VGG weights, not downloadable here) and
its discriminator, so that upstream's real adversarial losses train in tests. Config targets:
`gan_stand_ins.LPIPSWithDiscriminator` and `gan_stand_ins.VQLPIPSWithDiscriminator` (with the
tests folder on the path)."""
from contextlib import contextmanager

import torch
from torch import nn

from ldm.modules.losses import contperceptual, vqperceptual


class NoPerceptualLoss(nn.Module):
    def forward(self, inputs, reconstructions):
        return torch.zeros(inputs.shape[0], 1, 1, 1, device=inputs.device)


class TinyDiscriminator(nn.Sequential):
    """NLayerDiscriminator's signature, two convolutions: per-pixel logits."""
    def __init__(self, input_nc, n_layers, use_actnorm, ndf=8):
        super().__init__(nn.Conv2d(input_nc, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))


@contextmanager
def stand_in_gan_parts(module):
    real = module.import_taming_gan_parts
    module.import_taming_gan_parts = lambda: (NoPerceptualLoss, TinyDiscriminator, lambda m: None)
    try:
        yield
    finally:
        module.import_taming_gan_parts = real


class LPIPSWithDiscriminator(contperceptual.LPIPSWithDiscriminator):
    def __init__(self, **kwargs):
        with stand_in_gan_parts(contperceptual):
            super().__init__(**kwargs)


class VQLPIPSWithDiscriminator(vqperceptual.VQLPIPSWithDiscriminator):
    def __init__(self, **kwargs):
        with stand_in_gan_parts(vqperceptual):
            super().__init__(**kwargs)
