"""Vector quantiser used by ldm.models.autoencoder.VQModel.

Replaces the dependency on taming-transformers (CompVis/taming-transformers,
taming/modules/vqvae/quantize.py, MIT licence, Copyright (c) 2020 Patrick Esser, Robin
Rombach and Björn Ommer), of which ldm only used ``VectorQuantizer2``. This module keeps
that class's constructor, ``forward`` return value, ``get_codebook_entry`` and parameter /
buffer names (``embedding.weight``, ``used``), so VQ checkpoints trained with taming load
unchanged.
"""
import logging

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange

logger = logging.getLogger(__name__)


class VectorQuantizer2(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    ``legacy=True`` reproduces the original (swapped) weighting of the commitment term:
    loss = ||sg[z_q] - z||² + beta·||z_q - sg[z]||².
    ``remap`` is an optional .npy file of codebook indices actually in use; indices are then
    expressed in that reduced index space (unknown ones: ``unknown_index`` = "random",
    "extra" or an integer).
    """

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random",
                 sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape

        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)

        self.remap = remap
        if remap is None:
            self.re_embed = n_e
        else:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            logger.info("Remapping %d indices to %d indices; using %s for unknown indices.",
                        self.n_e, self.re_embed, self.unknown_index)

    def remap_to_used(self, inds):
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        match = inds[:, :, None] == used[None, None, :]
        new = match.long().argmax(-1)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds):
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # the "extra" token maps back to entry 0
            inds = inds.masked_fill(inds >= used.shape[0], 0)
        return used[inds].reshape(shape)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        # temp / rescale_logits / return_logits only exist for interface compatibility with
        # taming's Gumbel quantiser.
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer2 does not support temp, rescale_logits or return_logits")
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        z_flat = z.view(-1, self.e_dim)
        codebook = self.embedding.weight
        # squared distances ||z - e||² = ||z||² + ||e||² - 2 z·e
        distances = (z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * z_flat @ codebook.t())
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape)

        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term

        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        # (perplexity, one-hot encodings) are not computed; kept as None for the tuple layout.
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape):
        """Codebook vectors for ``indices``; ``shape`` = (batch, height, width, channel) or None."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
