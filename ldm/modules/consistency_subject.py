"""Subject masks for consistent attention (ConsiStory-style subject-driven self-attention).

Plain sharing (consistency.py) lets an image read *all* tokens of the other images, so their
backgrounds and layouts are pulled together along with the subject. Here an image still reads
all of its own tokens, but another image's tokens only where that image shows the subject.

Where the subject is comes from cross-attention, read-only. In `attn2` every latent pixel
attends to the prompt's tokens; the share of its attention that lands on the subject word's
tokens says how much that pixel "is" the subject. `SubjectMasks` is set as the `observer` of
every cross-attention layer: it is shown the layer's queries and text keys, recomputes
softmax(q·kᵀ·scale) over all text tokens on its side (77 keys: cheap) and keeps the mass on the
subject tokens. The layer's output is computed exactly as without it (tested bit-for-bit).

Per UNet call the maps are averaged over heads and over the layers of each token resolution,
for the conditional images only (the unconditional prompt has no subject word; its half of the
batch uses the conditional masks, image for image, so both halves of guidance share the same
pixels). Each image's map is min-max normalised and cut with Otsu's threshold: the map is
bimodal (subject vs. rest) and Otsu puts the cut in the valley between the modes whatever the
subject's size, where a cut at the mean drifts into the background for small subjects and into
the subject for large ones.

Timing: a block's self-attention runs before its cross-attention, so the masks of one UNet call
are used by the sharing of the NEXT call (ConsiStory also uses the previous step's maps). The
first call has no masks and shares nothing: at pure noise the maps say nothing yet, and an
unmasked first step would pull the backgrounds together at the moment the layout forms.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

OTSU_LEVELS = 64  # candidate thresholds on the normalised map: finer than any map needs


class SubjectNotInPrompt(ValueError):
    """A --subject word does not occur in a prompt (so its image would have no subject mask)."""


def parse_subjects(values) -> tuple:
    """['chair', 'dog, cat'] (repeated flags, comma lists) -> ('chair', 'dog', 'cat')."""
    words = tuple(w.strip() for value in values or () for w in value.split(","))
    if any(not w for w in words):
        raise ValueError(f"empty subject word in {list(values)}: pass --subject WORD (or a comma list without gaps)")
    return words


def tokenizer_of(model):
    """The Hugging Face tokenizer of the model's text encoder, and its context length."""
    encoder = getattr(model, "cond_stage_model", None)
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        raise SubjectNotInPrompt("--subject needs a text encoder with a tokenizer (the CLIP text encoder of "
                                 "Stable Diffusion configs); this model's cond stage has none")
    return tokenizer, getattr(encoder, "max_length", 77)


def subject_token_mask(tokenizer, prompts, subjects, max_length) -> torch.Tensor:
    """(len(prompts), max_length) bool: True at the text tokens of the subject words, prompt by prompt.

    Positions are found with the model's own tokenizer, since per-image prompts put a word at a
    different token index in every prompt, and a word can be several BPE tokens. A word is found
    as a whole word (CLIP's BPE marks word ends): "chair" is not in "two chairs"."""
    mask = torch.zeros(len(prompts), max_length, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        for word in subjects:
            word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            starts = [s for s in range(len(ids) - len(word_ids) + 1) if ids[s:s + len(word_ids)] == word_ids]
            if not word_ids or not starts:
                raise SubjectNotInPrompt(
                    f"--subject {word!r} is not a word of prompt {i + 1} {prompt!r} (within its first "
                    f"{max_length} tokens): put the word in every prompt, or drop --subject")
            for s in starts:
                mask[i, s:s + len(word_ids)] = True
    return mask


def otsu_masks(maps: torch.Tensor, levels: int = OTSU_LEVELS) -> torch.Tensor:
    """(N, T) float maps -> (N, T) bool: per image, min-max normalised and cut at Otsu's threshold
    (the cut maximising the between-class variance). A flat map, which localises nothing, gives
    all True: that image is then shared as without masks."""
    low, high = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    x = ((maps - low) / (high - low).clamp_min(1e-12))[:, None, :]     # (N, 1, T) in [0, 1]
    cuts = torch.arange(1, levels, device=maps.device, dtype=x.dtype)[None, :, None] / levels  # (1, K, 1)
    above = x > cuts                                                   # (N, K, T)
    w1 = above.float().mean(2)
    w0 = 1 - w1
    mean1 = (x * above).sum(2) / above.sum(2).clamp_min(1)
    mean0 = (x * ~above).sum(2) / (~above).sum(2).clamp_min(1)
    between = w0 * w1 * (mean1 - mean0) ** 2                            # (N, K)
    best = between.argmax(1)
    masks = above[torch.arange(len(maps)), best]                        # (N, T)
    flat = between.amax(1) <= 0
    masks[flat] = True
    return masks


@dataclass(eq=False)
class SubjectMasks:
    """Observer of the cross-attention layers; gives the self-attention sharing its masks.

    `tokens`: (N, L) bool, the subject's text token positions in each image's prompt. Call order
    per UNet call: `start_call()` (from the UNet pre-hook) turns the maps gathered in the previous
    call into masks, then the layers run: self-attention asks `masks_for(T)`, cross-attention calls
    the observer, which adds to this call's maps."""
    tokens: torch.Tensor
    images_per_group: int
    masks: dict = field(default_factory=dict)    # tokens per image -> (N, T) bool, from the previous call
    maps: dict = field(default_factory=dict)     # tokens per image -> (N, T) float, the previous call's maps
    _sums: dict = field(default_factory=dict)    # this call: tokens -> [sum of maps, layer count]

    def __post_init__(self):
        if self.tokens.ndim != 2 or self.tokens.shape[0] != self.images_per_group:
            raise ValueError(f"subject tokens must be ({self.images_per_group}, context length), "
                             f"got {tuple(self.tokens.shape)}")

    def __call__(self, q, k, scale):
        """q: (B, nh, T, hs) image queries, k: (B, nh, L, hs) text keys of one cross-attention layer."""
        n, B = self.images_per_group, q.shape[0]
        if B % n:
            raise ValueError(f"batch of {B} is not a whole number of groups of {n} images")
        # [uncond; cond] or cond alone: the conditional images are the last n
        q, k = q[B - n:].float(), k[B - n:].float()
        tokens = self.tokens.to(q.device, q.dtype)                     # (n, L)
        if tokens.shape[1] != k.shape[2]:
            raise ValueError(f"subject tokens for a context of {tokens.shape[1]}, the layer reads {k.shape[2]}")
        # in float32 even under fp16 autocast (which would cast the matmuls back): the maps of
        # 16 layers are summed and thresholded, and fp16 rounding would move the Otsu cut (the meta
        # device, on which scripts/benchmark_attention.py counts FLOPs, has no autocast to leave)
        with nullcontext() if q.is_meta else torch.autocast(q.device.type, enabled=False):
            probs = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)     # (n, nh, T, L)
            mass = torch.einsum("bhtl,bl->bt", probs, tokens) / q.shape[1]  # subject share, mean over heads
        total = self._sums.setdefault(q.shape[2], [torch.zeros_like(mass), 0])
        total[0] += mass
        total[1] += 1

    def start_call(self):
        """Turn the maps of the call that just ended into the masks of the next one."""
        if self._sums:
            self.maps = {T: total / count for T, (total, count) in self._sums.items()}
            self.masks = {T: otsu_masks(m) for T, m in self.maps.items()}
            self._sums = {}
            if log.isEnabledFor(logging.DEBUG):  # reading the coverage waits for the GPU
                log.debug("subject masks cover %s of the tokens per resolution",
                          {T: round(float(m.float().mean()), 3) for T, m in self.masks.items()})

    def masks_for(self, tokens_per_image: int):
        """(N, T) bool of the previous call at this resolution, or None (first call: no masks yet)."""
        return self.masks.get(tokens_per_image)


__all__ = ["SubjectNotInPrompt", "SubjectMasks", "parse_subjects", "tokenizer_of", "subject_token_mask",
           "otsu_masks"]
