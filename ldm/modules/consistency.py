"""Consistent self-attention: make the images of one batch show the same object, without training.

Why this works (task.md, question 1)
------------------------------------
In every transformer block of SD's UNet, `attn1` is *self*-attention: each latent pixel (query)
gathers appearance from the pixels (keys/values) of its own image. That is where an image
agrees with itself - the left eye matches the right eye, all four chair legs share one wood.
If a pixel may also read the keys/values of the *other* images in the batch, those images
become part of "itself": the colour of the chair, the shape of the face are pulled towards
what the other images are drawing, and the batch settles on one appearance. The queries stay
per image, so each image still asks its own questions at its own positions: layout and pose
can differ while appearance is shared. In anchor mode, the default, every image reads only the
first image (the anchor, or the image a user picks), which itself is computed as without
sharing: the batch takes the anchor's appearance instead of averaging everyone's, and less of
the other images' backgrounds and layouts leaks in.

Cross-attention (`attn2`, the text) is left alone: it is the only way the prompt enters the
UNet, and changing it would change *what* is drawn, not make the images agree on *how*.

Classifier-free guidance runs `[uncond; cond]` in one batch (see
ldm/models/diffusion/guidance.py). Sharing stays inside each half: an unconditional image
reading conditional keys would leak the prompt into the unconditional estimate, and guidance
(`e_u + s·(e_c - e_u)`) would then amplify the wrong difference.

Which layers (question 4) is a choice by UNet resolution level, not by token count, so it holds
at any image size: `outer` = full latent resolution (64² at 512 px), `middle` = half (32²),
`inner` = quarter (16²) plus the middle block (8²). See CONSISTENCY_NOTES.md for measurements.

Design: the attention module owns the weights; a `SharedKV` policy object decides what each
image attends to. One policy instance is set on the chosen self-attention layers by
`enable_consistent_attention` and removed by `disable_consistent_attention` (or use the
`consistent_attention` context manager, which restores the model in `finally`). No globals,
nothing is threaded through `forward` signatures (gradient checkpointing forwards positional
arguments only, a keyword mode would get lost), and the model with no policy set is exactly
the plain model. Gradients through a policy (training, guidance) are exact under gradient
checkpointing where it reads the same in every call (modes all and anchor over the whole
trajectory); a step window, sample mode or subject masks follow the UNet call, which the
recomputation in the backward pass comes after, so there it is an error (attention.NOT_RECOMPUTABLE).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ldm.modules.attention import rounds_by_batch_size
from ldm.modules.diffusionmodules.openaimodel import timestep_of_call, unet_of
from ldm.modules.consistency_subject import SubjectMasks, parse_subjects, subject_token_mask, tokenizer_of

log = logging.getLogger(__name__)


class Group(str, enum.Enum):
    """UNet resolution groups of self-attention layers."""
    OUTER = "outer"    # level 0: full latent resolution
    MIDDLE = "middle"  # level 1: half resolution
    INNER = "inner"    # level >= 2 and the middle block


class Blocks(str, enum.Enum):
    """Which side of the UNet shares: the encoder (input blocks), the decoder (output blocks) or both.
    The middle block sits between the two and shares whenever `inner` is enabled."""
    ENCODER = "encoder"
    DECODER = "decoder"
    BOTH = "both"


class Side(str, enum.Enum):
    """Where a self-attention layer sits in the UNet."""
    ENCODER = "encoder"
    MIDDLE = "middle"
    DECODER = "decoder"


class ShareMode(str, enum.Enum):
    ALL = "all"        # every image reads the tokens of all images of its half: O(N²)
    ANCHOR = "anchor"  # every image reads itself + the first k images; anchors stay exact: O(N)
    SAMPLE = "sample"  # every image reads itself + a random fraction of the others' tokens


class CfgPolicy(str, enum.Enum):
    BOTH = "both"  # uncond and cond halves each share within themselves
    COND = "cond"  # only the cond half shares; uncond runs plain, so guidance amplifies the shared look


def _enum_choices(enum_cls):
    return [member.value for member in enum_cls]


GROUP_CHOICES = _enum_choices(Group)
BLOCK_CHOICES = _enum_choices(Blocks)
MODE_CHOICES = _enum_choices(ShareMode)
CFG_CHOICES = _enum_choices(CfgPolicy)


class SettingError(ValueError):
    """A ConsistentAttentionConfig field has a value it cannot take; `field` names it, so the
    command line can say which flag to change."""

    def __init__(self, field_name, message):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class ConsistentAttentionConfig:
    """What the user chose. Validated once, here.

    The defaults are `--consistent-attn`'s, chosen from the consistency benchmark on the shipped
    model (CONSISTENCY_NOTES.md, question 4): the middle group does the work and inner costs
    nothing; anchor mode narrows a batch's colours more than mode all on the same batches, keeps
    the scenes more varied (an image reads one other image, not N-1, so less of their
    backgrounds and layouts leaks in) and costs O(N), where mode all costs O(N²)."""
    groups: frozenset = frozenset({Group.MIDDLE, Group.INNER})
    blocks: Blocks = Blocks.BOTH
    mode: ShareMode = ShareMode.ANCHOR
    n_anchors: int | None = None  # anchor mode: how many anchors (default: len(anchor_images), else 1)
    anchor_images: tuple = ()     # anchor mode: their positions in each batch, from 0 (default: the first n_anchors)
    sample_rate: float = 0.5
    window: tuple = (0.0, 1.0)  # fraction of the trajectory, 0 = pure noise, 1 = clean image
    cfg: CfgPolicy = CfgPolicy.BOTH
    seed: int = 0
    subjects: tuple = ()  # words whose cross-attention masks limit what is read from other images
    adain: bool = False   # StyleAligned: other images' q/k take the anchor's per-channel mean/std

    def __post_init__(self):
        object.__setattr__(self, "groups", frozenset(Group(g) for g in self.groups))
        object.__setattr__(self, "blocks", Blocks(self.blocks))
        object.__setattr__(self, "mode", ShareMode(self.mode))
        object.__setattr__(self, "cfg", CfgPolicy(self.cfg))
        object.__setattr__(self, "window", tuple(float(w) for w in self.window))
        object.__setattr__(self, "subjects", tuple(self.subjects))
        object.__setattr__(self, "adain", bool(self.adain))
        object.__setattr__(self, "anchor_images", tuple(int(i) for i in self.anchor_images))
        if self.n_anchors is None:
            object.__setattr__(self, "n_anchors", len(self.anchor_images) or 1)
        if any(not isinstance(w, str) or not w.strip() for w in self.subjects):
            raise SettingError("subjects", f"subject words must be non-empty strings, got {list(self.subjects)}")
        if not self.groups:
            raise SettingError("groups", "no attention group selected: choose from " + ", ".join(GROUP_CHOICES))
        if self.n_anchors < 1:
            raise SettingError("n_anchors", f"anchor count must be >= 1, got {self.n_anchors}")
        if self.anchor_images:
            if self.mode is not ShareMode.ANCHOR:
                raise SettingError("anchor_images", f"anchor images are for anchor mode, not mode {self.mode.value}")
            if min(self.anchor_images) < 0 or len(set(self.anchor_images)) != len(self.anchor_images):
                raise SettingError("anchor_images", f"anchor images must be distinct batch positions (0 = the first "
                                                    f"image), got {list(self.anchor_images)}")
            if len(self.anchor_images) != self.n_anchors:
                raise SettingError("anchor_images", f"{len(self.anchor_images)} anchor image(s) "
                                                    f"{list(self.anchor_images)} but {self.n_anchors} anchors asked "
                                                    f"for: give one position per anchor")
        if not 0.0 < self.sample_rate <= 1.0:
            raise SettingError("sample_rate", f"sample rate must be in (0, 1], got {self.sample_rate}")
        start, end = self.window
        if not 0.0 <= start < end <= 1.0:
            raise SettingError("window", f"step window must satisfy 0 <= start < end <= 1, got {start}:{end}")

    def describe(self) -> dict:
        """Plain-data form, for logs and PNG metadata."""
        return {"groups": sorted(g.value for g in self.groups), "blocks": self.blocks.value,
                "mode": self.mode.value, "n_anchors": self.n_anchors, "anchor_images": list(self.anchor_images),
                "sample_rate": self.sample_rate,
                "window": list(self.window), "cfg": self.cfg.value, "seed": self.seed,
                "subjects": list(self.subjects), "adain": self.adain}

    @property
    def reads_the_timestep(self) -> bool:
        """Whether what a layer reads depends on the UNet call's timestep: a step window narrower
        than the whole trajectory, or sample mode (its draws are seeded by the timestep)."""
        return self.window != (0.0, 1.0) or self.mode is ShareMode.SAMPLE

    def anchor_positions(self, n: int) -> list:
        """Where the anchors stand in a group of `n` images: the chosen ones, else the first
        n_anchors (all n images when the group is smaller, as `anchor_attention` takes them)."""
        return list(self.anchor_images) or list(range(min(self.n_anchors, n)))


def parse_groups(text: str) -> frozenset:
    """'outer,middle' -> {Group.OUTER, Group.MIDDLE}; 'all' -> every group."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return frozenset(Group)
    unknown = [n for n in names if n not in GROUP_CHOICES]
    if unknown or not names:
        raise ValueError(f"unknown attention group(s) {unknown or [text]}: use a comma-separated "
                         f"subset of {', '.join(GROUP_CHOICES)} (or 'all')")
    return frozenset(Group(n) for n in names)


def parse_window(text: str) -> tuple:
    """'0:0.6' -> (0.0, 0.6): share during the first 60 % of the trajectory."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"step window must look like START:END with fractions, e.g. 0:0.6, got {text!r}")
    return start, end


# --------------------------------------------------------------------------------------------
# The policy: which keys/values each image's queries read
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class SharedKV:
    """Attention over the keys/values of several images. Set on `CrossAttention.kv_sharing`.

    The batch is read as consecutive groups of `images_per_group` images (one group per CFG
    half: the batch is `[uncond; cond]`, or a single group when guidance is off or the halves
    run separately). Images never read across groups.

    With `subject` (consistency_subject.SubjectMasks) an image reads another image's tokens only
    inside that image's subject mask; the same (conditional) masks serve both CFG halves.
    """
    config: ConsistentAttentionConfig
    images_per_group: int
    active: bool = True  # set per UNet call from the step window
    calls: int = 0         # UNet calls so far, and how many of them were inside the window
    active_calls: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    hook: object = None  # the UNet pre-hook that sets `active`; removed on disable
    subject: object = None  # SubjectMasks, or None: other images are read everywhere
    order: AnchorsFirst | None = field(init=False)  # chosen anchors that are not the first images

    def __post_init__(self):
        self.order = anchors_first(self.config, self.images_per_group)

    @property
    def recomputable(self) -> bool:
        """Whether gradient checkpointing may recompute a layer with this policy in the backward
        pass: not where what it reads depends on the UNet call (attention.NOT_RECOMPUTABLE)."""
        return not self.config.reads_the_timestep and self.subject is None

    def __call__(self, q, k, v, attend, mask=None):
        """q, k, v: (B, nh, T, hs), B = groups · images_per_group. Returns (B, nh, T, hs)."""
        n = self.images_per_group
        if not self.active or n == 1:
            return attend(q, k, v, mask)
        if mask is not None:
            raise NotImplementedError("shared keys/values with an attention mask")
        readable = None
        if self.subject is not None:
            readable = self.subject.masks_for(q.shape[2])  # (n, T) bool
            if readable is None:  # first UNet call: no maps yet, so nothing is shared
                return attend(q, k, v)
        return share_per_cfg_group(q, k, v, attend, n, self.config.cfg,
                                   lambda q, k, v, groups, plain: self._share(q, k, v, attend, readable, plain),
                                   plain_anchors=self.config.mode is ShareMode.ANCHOR)

    def _share(self, q, k, v, attend, readable=None, plain=None):
        """q, k, v: (G, N, nh, T, hs); `readable`: (N, T) bool, the tokens of each image that the
        OTHER images may read, or None (all); `plain`: the groups' rows of the plain call, or None
        (see `share_per_cfg_group`)."""
        order = self.order
        if order is None:
            return self._share_in_order(q, k, v, attend, readable, plain)
        readable = None if readable is None else order.apply(readable, dim=0)
        q, k, v, plain = (None if t is None else order.apply(t) for t in (q, k, v, plain))
        return order.undo(self._share_in_order(q, k, v, attend, readable, plain))

    def _share_in_order(self, q, k, v, attend, readable=None, plain=None):
        mode = self.config.mode
        if self.config.adain:
            keep = self.config.n_anchors if mode is ShareMode.ANCHOR else 1
            q, k = adain_to_anchor(q, keep), adain_to_anchor(k, keep)
        if readable is None:
            if mode is ShareMode.ALL:
                return joint_attention(q, k, v, attend)
            if mode is ShareMode.ANCHOR:
                return anchor_attention(q, k, v, attend, self.config.n_anchors, plain)
            return sampled_attention(q, k, v, attend, self.config.sample_rate, self.generator)
        readable = readable.to(q.device)
        if mode is ShareMode.ANCHOR:
            return masked_anchor_attention(q, k, v, attend, self.config.n_anchors, readable, plain)
        if mode is ShareMode.SAMPLE:
            readable = readable & _to_device(sampled_tokens(q.shape[1], q.shape[3], self.config.sample_rate,
                                                            self.generator), q.device)
        return masked_joint_attention(q, k, v, attend, readable)


class AnchorsFirst:
    """A group's images reordered so that the chosen anchors come first, and back again.

    Anchor mode, AdaIN and a recorded reference take the anchors to be the first images of each
    group; anchors a user chose elsewhere in the batch (`anchor_images`, e.g. the image of a plain
    batch whose look they like) are brought there around those functions. An anchor keeps its
    batch position, so its start noise and step noise, and its attention is plain: it comes out
    exactly as that image of the batch sampled without sharing, and the others take its look."""

    def __init__(self, positions, n):
        if max(positions) >= n:
            raise ValueError(f"anchor image {max(positions)} is not in a batch of {n} images "
                             f"(positions 0 to {n - 1})")
        self.order = list(positions) + [i for i in range(n) if i not in positions]
        self.inverse = sorted(range(n), key=self.order.__getitem__)
        self._indices = {}  # (device, inverse) -> index tensor: copied to a GPU once, not per layer

    def _index(self, device, inverse):
        key = (str(device), inverse)
        if key not in self._indices:
            self._indices[key] = _to_device(torch.tensor(self.inverse if inverse else self.order), device)
        return self._indices[key]

    def apply(self, t, dim=1):
        """Images along `dim` (the N of (G, N, nh, T, hs) by default) in anchors-first order."""
        return self._gather(t, dim, inverse=False)

    def undo(self, t, dim=1):
        return self._gather(t, dim, inverse=True)

    def _gather(self, t, dim, inverse):
        # in t's own memory layout: reductions over a reordered copy (AdaIN's statistics, the
        # kernels) then add up in the same order as over the batch itself, to the last bit
        out, index = torch.empty_like(t), self._index(t.device, inverse)
        if t.requires_grad and torch.is_grad_enabled():  # autograd takes no out=: one copy more
            return out.copy_(torch.index_select(t, dim, index))
        return torch.index_select(t, dim, index, out=out)


def anchors_first(config: ConsistentAttentionConfig, n: int) -> AnchorsFirst | None:
    """The reordering that anchor mode with `config` needs in a group of `n` images, or None
    where its anchors are the first images already (the default)."""
    positions = config.anchor_positions(n) if config.mode is ShareMode.ANCHOR else []
    if positions == list(range(len(positions))):
        return None
    return AnchorsFirst(positions, n)


def split_groups(t, n):
    """(B, ...) -> (B/n, n, ...): the batch as its CFG groups of n images."""
    if t.shape[0] % n:
        raise ValueError(f"batch of {t.shape[0]} is not a whole number of groups of {n} images; "
                         f"enable consistent attention with the number of images per CFG half")
    return t.reshape(t.shape[0] // n, n, *t.shape[1:])


def share_per_cfg_group(q, k, v, attend, n, cfg: CfgPolicy, share, plain_anchors=False):
    """Attention over a batch of CFG groups of `n` images, q, k, v: (B, nh, T, hs) -> (B, nh, T, hs).

    `share(q, k, v, groups, plain)` attends within each group of (G, n, nh, T, hs), `groups` being
    which of the batch's groups it was given (a slice), `plain` their rows of the plain call or
    None. With `CfgPolicy.COND` and a `[uncond; cond]` batch, the unconditional group is plain
    attention and only the conditional one shares.

    Images that must come out exactly as without sharing (the unconditional group here, the
    anchors of `share` where `plain_anchors`) can be attended in a smaller call of their own where
    the kernel computes every image alike at any batch size (the CPU's). On a GPU it does not
    (`rounds_by_batch_size`), so `attend(q, k, v)` runs over the whole batch, the very call the
    plain model makes, and those images are its rows; where there are none (--scale 1 runs the
    cond group alone, and it shares), that call is not made."""
    B = q.shape[0]
    cond_only = cfg is CfgPolicy.COND and B == 2 * n
    groups = slice(1, 2) if cond_only else slice(None)
    from_plain_call = (cond_only or plain_anchors) and rounds_by_batch_size(attend, q.device)
    plain = split_groups(attend(q, k, v), n) if from_plain_call else None  # the plain model's own call
    q, k, v = (split_groups(t, n) for t in (q, k, v))  # (G, N, nh, T, hs)
    out = share(q[groups], k[groups], v[groups], groups, None if plain is None else plain[groups])
    if cond_only:
        uncond = plain[:1] if plain is not None else attend(q[0], k[0], v[0])[None]
        out = torch.cat([uncond, out])
    return out.reshape(B, *out.shape[2:])


def _fold(t):
    """(G, N, nh, T, hs) -> (G, nh, N·T, hs): the images of a group become one token sequence."""
    G, N, nh, T, hs = t.shape
    return t.transpose(1, 2).reshape(G, nh, N * T, hs)


def _unfold(t, N):
    """(G, nh, N·T, hs) -> (G, N, nh, T, hs)."""
    G, nh, NT, hs = t.shape
    return t.reshape(G, nh, N, NT // N, hs).transpose(1, 2)


def joint_attention(q, k, v, attend):
    """Every image reads all tokens of its group. Folding the images into one sequence lets the
    fused kernel do it without ever materialising the (N·T)² score matrix."""
    N = q.shape[1]
    return _unfold(attend(_fold(q), _fold(k), _fold(v)), N)


def anchor_attention(q, k, v, attend, n_anchors, plain=None):
    """The first `n_anchors` images of a group are computed exactly as without sharing; every
    other image reads its own tokens plus the anchors' tokens. Cost grows O(N), and the anchors
    fix one appearance the rest of the batch follows.

    `plain`: the group's rows of the plain call, for a kernel that rounds by batch size (see
    `share_per_cfg_group`); the anchors are then its rows, and the anchors read too (their rows
    dropped), so that the readers' call has the shape of a batch reading recorded anchors
    (consistency_reference.py) and reading them back is exact too."""
    return _anchors_and_readers(q, k, v, attend, n_anchors, plain, lambda q_, k_, v_, a: read_with_anchors(
        q_, k_, v_, attend, k[:, :a], v[:, :a]))


def _anchors_and_readers(q, k, v, attend, n_anchors, plain, read):
    """What anchor mode's two variants share: the first `n_anchors` images plain (their rows of
    `plain`, else attended alone), the others from `read(q, k, v, a)`, the images given reading
    the first `a`. With `plain` the anchors are given to `read` too and their rows dropped (see
    `anchor_attention`)."""
    a = min(n_anchors, q.shape[1])
    anchors = plain[:, :a] if plain is not None else _attend_each(q[:, :a], k[:, :a], v[:, :a], attend)
    if a == q.shape[1]:
        return anchors
    first = 0 if plain is not None else a  # the first image that reads
    readers = read(q[:, first:], k[:, first:], v[:, first:], a)
    return torch.cat([anchors, readers[:, a - first:]], dim=1)


def _attend_each(q, k, v, attend):
    """Plain attention of every image of (G, N, nh, T, hs) to itself."""
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # (G·N, nh, T, hs)
    return attend(flat(q), flat(k), flat(v)).reshape(q.shape)


def read_with_anchors(q, k, v, attend, anchor_k, anchor_v):
    """Every image reads its own tokens plus all tokens of the anchors of its group.
    q, k, v: (G, N, nh, T, hs); anchor_k, anchor_v: (G, a, nh, T, hs), from the batch (anchor
    mode) or from a recorded reference (consistency_reference.py): one code path for both, so
    that a reference read back gives exactly what in-batch anchors give."""
    G, N, nh, T, hs = q.shape
    with_anchors = lambda t, anchors: torch.cat(
        [t, _fold(anchors)[:, None].expand(G, N, nh, anchors.shape[1] * T, hs)], dim=3)  # (G, N, nh, (1+a)T, hs)
    flat = lambda t: t.reshape(G * N, *t.shape[2:])
    out = attend(flat(q), flat(with_anchors(k, anchor_k)), flat(with_anchors(v, anchor_v)))
    return out.reshape(G, N, nh, T, hs)


def channel_stats(t, eps=1e-5):
    """Per-image, per-channel mean and std over the tokens of (G, N, nh, T, hs), in float32:
    (G, N, nh, 1, hs) each. Population variance: a layer with a single token (SD's 8x8 middle
    block at 64 px) stays finite."""
    t = t.float()
    return t.mean(dim=3, keepdim=True), (t.var(dim=3, keepdim=True, correction=0) + eps).sqrt()


def adain_to(t, mean, std):
    """StyleAligned's AdaIN: every image of t (G, N, nh, T, hs) renormalised to the per-channel
    `mean` and `std` (G, 1, nh, 1, hs) of a reference image, so its queries ask, and its keys
    answer, in the reference's statistics (the reference's style)."""
    t_mean, t_std = channel_stats(t)
    return ((t.float() - t_mean) / t_std * std + mean).to(t.dtype)


def adain_to_anchor(t, keep=1):
    """`adain_to` the first image's statistics, for every image from index `keep` on. The first
    `keep` images are returned untouched: the anchor normalised to itself would only gain
    rounding, and anchor mode promises that all its anchors are computed as without sharing."""
    if keep >= t.shape[1]:  # all anchors (a run's first batch of --share-anchors N): nothing to renormalise
        return t
    mean, std = channel_stats(t[:, :1])
    return torch.cat([t[:, :keep], adain_to(t[:, keep:], mean, std)], dim=1)


def read_masked(q, k, v, attend, sources, source_k, source_v, readable):
    """Every reader image reads all its own tokens plus the `readable` tokens of its sources.

    q, k, v: (G, R, nh, T, hs), the readers' own; source_k, source_v: (G, S, nh, T, hs), the images
    that may be read; sources: (R, s) long, which of them reader r reads; readable: (S, T) bool.
    Keys outside the masks are excluded with a boolean key mask (-inf before the softmax: exactly
    zero weight). Every query row keeps its own T keys allowed, so no row is fully masked (no NaN).

    Memory: each reader gets its own copy of its sources' K/V, R·(1+s)·T tokens in all: linear in
    the readers for a fixed number of sources (anchors, a reference). Every other image as a
    source would be N² images' K/V; `masked_joint_attention` reads a shared sequence instead."""
    G, R, nh, T, hs = q.shape
    with_sources = lambda own, src: torch.cat(
        [own, src[:, sources].transpose(2, 3).reshape(G, R, nh, -1, hs)], dim=3)  # (G, R, nh, (1+s)T, hs)
    allowed = torch.cat([torch.ones(R, T, dtype=torch.bool, device=q.device), readable[sources].reshape(R, -1)], 1)
    flat = lambda t: t.reshape(G * R, *t.shape[2:])
    out = attend(flat(q), flat(with_sources(k, source_k)), flat(with_sources(v, source_v)), allowed.repeat(G, 1))
    return out.reshape(G, R, nh, T, hs)


def masked_joint_attention(q, k, v, attend, readable):
    """`joint_attention` where another image's tokens are read only where `readable` (N, T) is True.

    One attention call per reader image, all over the same folded sequence of the group's N·T
    keys, with a key mask: its own block whole, the others' where readable. `read_masked` with the
    other N-1 images as sources gives the same result in one call but copies them for every
    reader, N² images' K/V per layer (~0.7 GB at SD's 64² level, N=8, fp16); here it is the N of
    `joint_attention`. The mask depends only on the reader, never on the query token, so the
    (N·T)² mask of a single folded call (1 GiB there) is not needed either. Measured on CPU
    (docs/benchmarks.md): faster too, fewer bytes written outweigh N calls instead of one."""
    G, N, nh, T, hs = q.shape
    keys, values = _fold(k), _fold(v)                                                 # (G, nh, N·T, hs)
    own = torch.eye(N, dtype=torch.bool, device=q.device).repeat_interleave(T, dim=1)  # (N, N·T)
    allowed = own | readable.reshape(1, N * T)                                        # row r: what image r reads
    return torch.stack([attend(q[:, r], keys, values, allowed[r].expand(G, -1)) for r in range(N)], dim=1)


def masked_anchor_attention(q, k, v, attend, n_anchors, readable, plain=None):
    """`anchor_attention` where the anchors' tokens are read only where `readable` (N, T) is True;
    the anchors themselves stay exact (`plain` as there)."""
    return _anchors_and_readers(q, k, v, attend, n_anchors, plain, lambda q_, k_, v_, a: read_masked(
        q_, k_, v_, attend, torch.arange(a, device=q.device).expand(q_.shape[1], a), k[:, :a], v[:, :a],
        readable[:a]))


def sampled_tokens(N, T, rate, generator):
    """(N, T) bool: a random `rate` fraction of each image's tokens, as `sampled_attention` draws them."""
    m = max(1, round(rate * T))
    picked = torch.rand(N, T, generator=generator).argsort(dim=1)[:, :m]
    return torch.zeros(N, T, dtype=torch.bool).scatter_(1, picked, True)


def sampled_attention(q, k, v, attend, rate, generator):
    """StoryDiffusion's consistent self-attention: every image reads its own tokens plus a random
    `rate` fraction of each other image's tokens (one random subset per image, layer and UNet call,
    the same for every reader and both CFG halves). rate=1 reads everything, like `joint_attention`.

    Each image's keys are gathered in ONE indexing op from the group's token sequence (own tokens,
    then the picked tokens of the other images in image order). Building them image by image
    (a gather per image, then a (N, N-1, m) pool, then a concatenation) wrote O(N²·m) temporaries
    and launched O(N) kernels per layer; the one gather writes only the keys SDPA reads. Those are
    still one sequence per reader, (N, T + (N-1)m) tokens: O(N²·m), where modes all and anchor hold
    O(N·T) (docs/benchmarks.md). A masked joint call would hold O(N·T) but compute as mode all.
    """
    G, N, nh, T, hs = q.shape
    m = max(1, round(rate * T))
    # Drawn on the CPU generator, so a seed gives the same tokens on every device.
    picked = torch.rand(N, T, generator=generator).argsort(dim=1)[:, :m]  # (N, m)
    index = _sample_index(_to_device(picked, k.device), N, T)              # (N, L), L = T + (N-1)m

    def keys_of(t):
        tokens = _token_major(t)                                          # (G, N·T, nh, hs)
        L = index.shape[1]
        return tokens[:, index.flatten()].reshape(G * N, L, nh, hs).transpose(1, 2)  # (G·N, nh, L, hs)

    return attend(q.reshape(G * N, nh, T, hs), keys_of(k), keys_of(v)).reshape(G, N, nh, T, hs)


def _sample_index(picked, N, T):
    """(N, T + (N-1)·m) positions in a group's token sequence (image j's token i at j·T + i):
    row i = image i's own tokens, then the picked tokens of every other image, in image order."""
    own = torch.arange(N * T, device=picked.device).view(N, T)
    pool = picked + own[:, :1]                                            # (N, m), shifted to image j's tokens
    return torch.cat([own, pool[_others(N, picked.device)].flatten(1)], dim=1)


def _others(N, device):
    """(N, N-1): row i lists the images other than i, in order. Built on `device`: a host tensor
    copied per layer would make the CPU wait for the GPU (see `_to_device`)."""
    i, j = torch.arange(N, device=device)[:, None], torch.arange(N - 1, device=device)[None]
    return j + (j >= i)


def _token_major(t):
    """(G, N, nh, T, hs) -> (G, N·T, nh, hs). `CrossAttention` hands over views of its linear
    layers' (B, T, nh·hs) outputs, for which this is a free view (no copy)."""
    G, N, nh, T, hs = t.shape
    return t.transpose(2, 3).reshape(G, N * T, nh, hs)


def _to_device(t, device):
    """Host tensor to `device` without stalling the GPU: `.to("cuda")` of pageable memory waits
    for everything queued on the stream, which per attention layer left the GPU idle while the
    CPU caught up. From pinned memory the copy is queued like any kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Where the self-attention layers are, and switching the policy on and off
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionSite:
    """One self-attention layer of the UNet and its place in it."""
    name: str    # module path, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    side: Side
    level: int   # 0 = full latent resolution, 1 = half, ...

    @property
    def group(self) -> Group:
        if self.side is Side.MIDDLE or self.level >= 2:
            return Group.INNER
        return Group.OUTER if self.level == 0 else Group.MIDDLE

    def selected_by(self, config: ConsistentAttentionConfig) -> bool:
        if self.group not in config.groups:
            return False
        return self.side is Side.MIDDLE or config.blocks is Blocks.BOTH or config.blocks.value == self.side.value


def self_attention_sites(model):
    """[(AttentionSite, CrossAttention)] for every `attn1` of the UNet, in forward order.

    The resolution level is found by walking the blocks and counting the resamplers before each
    one, so it follows the UNet's structure, not a token count that changes with image size."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = unet_of(model)

    def sites_in(block, prefix, side, level):
        for name, module in block.named_modules(prefix=prefix):
            if isinstance(module, SpatialTransformer):
                for i, tb in enumerate(module.transformer_blocks):
                    yield AttentionSite(f"{name}.transformer_blocks.{i}.attn1", side, level), tb.attn1

    def has(block, kind):
        return any(isinstance(m, kind) for m in block.modules())

    sites, level = [], 0
    for i, block in enumerate(unet.input_blocks):
        sites += sites_in(block, f"input_blocks.{i}", Side.ENCODER, level)
        level += has(block, Downsample)
    sites += sites_in(unet.middle_block, "middle_block", Side.MIDDLE, level)
    for i, block in enumerate(unet.output_blocks):
        sites += sites_in(block, f"output_blocks.{i}", Side.DECODER, level)
        level -= has(block, Upsample)
    total = sum(isinstance(m, SpatialTransformer) and len(m.transformer_blocks) for m in unet.modules())
    if len(sites) != total:  # a layer outside the three block lists would escape every group
        raise RuntimeError(f"found {len(sites)} of the UNet's {total} self-attention layers in its input, middle "
                           f"and output blocks; this UNet layout is not supported")
    return sites


def selected_sites(model, config: ConsistentAttentionConfig):
    """The [(AttentionSite, CrossAttention)] that `config` shares; none at all is an error."""
    sites = self_attention_sites(model)
    selected = [(site, attn) for site, attn in sites if site.selected_by(config)]
    if not selected:
        asked = sorted(g.value for g in config.groups)
        held = sorted({site.group.value for site, _ in sites}, key=GROUP_CHOICES.index)
        raise ValueError(f"this UNet has no self-attention layer in groups {', '.join(asked)} with blocks "
                         f"{config.blocks.value}; its layers are in groups {', '.join(held) or '(none)'}")
    return selected


def cross_attention_layers(model):
    """Every `attn2` (the text cross-attention) of the UNet, in forward order."""
    from ldm.modules.attention import BasicTransformerBlock
    return [block.attn2 for block in unet_of(model).modules() if isinstance(block, BasicTransformerBlock)]


def enable_consistent_attention(model, config: ConsistentAttentionConfig, images_per_group: int, *,
                                prompts=None, subject_tokens=None) -> SharedKV:
    """Set one SharedKV policy on the selected self-attention layers of `model`'s UNet.

    `images_per_group`: images per CFG half (the user's batch size). Returns the policy; the
    step window is applied by a forward pre-hook on the UNet that reads the timestep.
    With `config.subjects`, the subject's token positions come from `prompts` (one per image,
    found with the model's tokenizer) or are given as `subject_tokens` ((N, context) bool, for
    a bare UNet); a `SubjectMasks` observer is then set on every cross-attention layer."""
    if images_per_group < 1:
        raise ValueError(f"images_per_group must be >= 1, got {images_per_group}")
    disable_consistent_attention(model)
    unet = unet_of(model)
    policy = SharedKV(config, images_per_group)
    selected = selected_sites(model, config)
    policy.subject = subject_masks_for(model, config, images_per_group, prompts, subject_tokens)
    if policy.subject is not None:
        for attn in cross_attention_layers(model):
            attn.observer = policy.subject
    for _, attn in selected:
        attn.kv_sharing = policy
    num_timesteps = getattr(model, "num_timesteps", 1000)
    policy.hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: _start_unet_call(policy, args, kwargs, num_timesteps), with_kwargs=True)
    log.debug("consistent attention on %d of %d self-attention layers: %s",
             len(selected), len(self_attention_sites(model)), config.describe())
    return policy


def subject_masks_for(model, config, images_per_group, prompts=None, subject_tokens=None):
    """The SubjectMasks observer that `config.subjects` asks for, or None without subjects. The
    subject's token positions come from `prompts` or are given as `subject_tokens`."""
    if not config.subjects:
        return None
    if subject_tokens is None:
        subject_tokens = subject_tokens_in(model, config, prompts)
    return SubjectMasks(subject_tokens.bool(), images_per_group)


def subject_tokens_in(model, config, prompts):
    """(len(prompts), context) bool: where the model's tokenizer puts `config.subjects` in each prompt."""
    if prompts is None:
        raise ValueError("subject masks need the prompts (one per image) or subject_tokens")
    tokenizer, max_length = tokenizer_of(model)
    return subject_token_mask(tokenizer, prompts, config.subjects, max_length)


def _start_unet_call(policy: SharedKV, args, kwargs, num_timesteps):
    """Once per UNet call: is this step inside the window, and a fresh, reproducible draw of the
    sampled tokens. Progress 0 is pure noise, 1 the clean image; layout and identity form early.
    Subject maps gathered in the previous call become this call's masks.

    Reading the timestep's value (`int(tensor)`) makes the CPU wait until the GPU has finished
    everything queued before it, so it is read only when something depends on it: a step window
    narrower than the whole trajectory, or sample mode (whose draws are seeded by the timestep so
    that a seed gives the same tokens with every sampler). The default, the whole trajectory with
    mode all or anchor, never waits, which also keeps the UNet call free of host syncs (CUDA
    graphs, torch.compile without graph breaks)."""
    config = policy.config
    if policy.subject is not None:
        policy.subject.start_call()
    if not config.reads_the_timestep:
        policy.active = True  # every t in [0, num_timesteps] is inside the whole trajectory
    else:
        t = timestep_of_call(args, kwargs)
        policy.active = in_window(config, t, num_timesteps)
        policy.generator.manual_seed(config.seed * 100_003 + int(t))
    policy.calls += 1
    policy.active_calls += policy.active


def in_window(config: ConsistentAttentionConfig, t: float, num_timesteps: int) -> bool:
    start, end = config.window
    return start <= 1.0 - t / num_timesteps <= end


def disable_consistent_attention(model) -> None:
    """Back to plain self-attention everywhere, and no observer on cross-attention."""
    for module in unet_of(model).modules():
        policy = getattr(module, "kv_sharing", None)
        if policy is not None:
            if policy.hook is not None:
                policy.hook.remove()  # idempotent: layers may share one hook
            module.kv_sharing = None
        if getattr(module, "observer", None) is not None:
            module.observer = None


@contextmanager
def consistent_attention(model, config: ConsistentAttentionConfig | None, images_per_group: int, *,
                         prompts=None, subject_tokens=None):
    """`with consistent_attention(model, cfg, n): ...` - enabled inside, restored in `finally`.
    `config=None` is a no-op, so callers need no branch. `prompts`/`subject_tokens`: see
    `enable_consistent_attention` (needed with `config.subjects` only)."""
    if config is None:
        yield None
        return
    policy = enable_consistent_attention(model, config, images_per_group, prompts=prompts,
                                         subject_tokens=subject_tokens)
    try:
        yield policy
    finally:
        disable_consistent_attention(model)
    if policy.calls and not policy.active_calls and policy.images_per_group > 1:
        log.warning("no sampling step fell inside the step window %s:%s, so nothing was shared; widen "
                    "--share-window or take more --ddim_steps", *config.window)


# --------------------------------------------------------------------------------------------
# Command line (shared by scripts/txt2img.py and scripts/img2img.py)
# --------------------------------------------------------------------------------------------


def add_arguments(parser):
    defaults = ConsistentAttentionConfig()
    group = parser.add_argument_group("consistent attention (images of a batch share self-attention keys/values)")
    group.add_argument("--consistent-attn", action="store_true",
                       help="make the images of each batch consistent (same object, face, style); in anchor "
                            "mode every later batch of the run (--n_iter, --from-file) follows the first "
                            "batch's anchors too; defaults: groups %s, mode %s"
                            % (",".join(sorted(g.value for g in defaults.groups)), defaults.mode.value))
    group.add_argument("--share-groups", metavar="GROUPS",
                       help="comma-separated UNet resolution groups that share: "
                            f"{', '.join(GROUP_CHOICES)} or all")
    group.add_argument("--share-blocks", choices=BLOCK_CHOICES,
                       help="share in the encoder (input blocks), the decoder (output blocks) or both")
    group.add_argument("--share-mode", choices=MODE_CHOICES,
                       help="anchor: every image reads K anchor images (the first K, or --anchor-images), "
                            "which stay exactly as without sharing (cost O(N)); all: every image reads every "
                            "image of the batch (cost O(N²)); "
                            f"sample: a random fraction of the other images' tokens (default: {defaults.mode.value})")
    group.add_argument("--share-anchors", type=int, metavar="K", help="anchor images for --share-mode anchor")
    group.add_argument("--anchor-images", metavar="I[,J...]",
                       help="which images of the batch are the anchors, by position from 0 (the grid's row, "
                            "left to right; default: the first K): with the same --seed, image I comes out "
                            "exactly as without sharing and the others take its look")
    group.add_argument("--share-rate", type=float, metavar="R",
                       help="fraction of each other image's tokens read in --share-mode sample, in (0, 1]")
    group.add_argument("--share-window", metavar="START:END",
                       help="share only during this fraction of the sampling trajectory, 0 = noise, "
                            "1 = image (e.g. 0:0.6)")
    group.add_argument("--share-cfg", choices=CFG_CHOICES,
                       help="both: uncond and cond halves share, each within itself; cond: only the cond half")
    group.add_argument("--subject", action="append", metavar="WORD",
                       help="read the other images only where they show this word (its cross-attention map "
                            "in each image, from the previous step); every prompt must contain it (with "
                            "--write-reference: the recorded batch's prompts). Repeat it or give a comma list "
                            "for several subjects; backgrounds then stay free")
    group.add_argument("--share-adain", action="store_true", default=None,
                       help="StyleAligned AdaIN: in sharing layers, give every image's queries and keys the "
                            "per-channel mean/std of the first image of the batch, in anchor mode of the first "
                            "anchor (the anchors stay unchanged)")


def config_from_arguments(opt, parser, images_per_batch):
    """The ConsistentAttentionConfig the flags ask for, or None. Bad values end in parser.error."""
    given = given_share_flags(opt)
    if not opt.consistent_attn:
        # with a reference (consistency_reference.py) the --share-* flags are checked there
        with_reference = getattr(opt, "write_reference", None) or getattr(opt, "read_reference", None)
        if given and not with_reference:
            parser.error(f"{', '.join(given)} {'takes' if len(given) == 1 else 'take'} effect only with "
                         f"--consistent-attn; add it")
        return None
    chosen_mode = ShareMode(opt.share_mode or ConsistentAttentionConfig.mode)
    for flag, value, mode in (("--share-anchors", opt.share_anchors, ShareMode.ANCHOR),
                              ("--anchor-images", opt.anchor_images, ShareMode.ANCHOR),
                              ("--share-rate", opt.share_rate, ShareMode.SAMPLE)):
        if value is not None and chosen_mode is not mode:
            parser.error(f"{flag} applies to --share-mode {mode.value}; add that or drop {flag}")
    config = config_from_share_flags(opt, parser)
    check_anchor_images(parser, config, images_per_batch)
    # in anchor mode the later batches of a run read the first batch's anchors (RunAnchors in
    # consistency_reference.py), so a run of one-image batches has something to share too: the
    # way to consistent images on a GPU that holds one at a time
    run_of_batches = config.mode is ShareMode.ANCHOR and (
        getattr(opt, "n_iter", 1) > 1 or getattr(opt, "from_file", None) is not None)
    if images_per_batch == 1 and not run_of_batches:  # after the checks: a typo is an error with any batch size
        log.warning("--consistent-attn with a single image per batch: nothing to share, sampling normally "
                    "(use --n_samples 2 or more, or --n_iter 2 or more in anchor mode: the later batches then "
                    "read the first one's anchor)")
        return None
    if config.mode is ShareMode.ANCHOR and config.n_anchors > images_per_batch:
        parser.error(f"--share-anchors {config.n_anchors}: the anchors are images of the batch, which holds "
                     f"{images_per_batch}: use at most {images_per_batch} or a larger --n_samples")
    return config


def check_anchors_leave_readers(parser, opt, images, batches):
    """One error line where anchor mode would make every image of the run an anchor, so that nothing
    is shared: a run of a single batch of `images` images with as many anchors or more. Checked once
    the prompts are read: --from-file decides how many batches there are, and may give fewer images
    than --n_samples. In a run of several batches the later ones read the anchors."""
    config = opt.consistency
    if config is None or config.mode is not ShareMode.ANCHOR or batches > 1 or config.n_anchors < images:
        return
    anchors = f"--anchor-images {opt.anchor_images}" if opt.anchor_images else f"--share-anchors {config.n_anchors}"
    parser.error(f"{anchors} with {images} images per batch leaves no image to read the anchors: use fewer "
                 f"anchors, a larger --n_samples (more lines with --from-file), or --n_iter 2 or more (the later "
                 f"batches read them)")


def anchors_of_first_batch(config, images):
    """`config` with no more anchors than the run's first batch of `images` images (--from-file
    with fewer lines than --share-anchors): that batch is all anchors, as anchor_attention makes
    it, and the PNG metadata says so; a warning says what was asked."""
    if config is None or config.mode is not ShareMode.ANCHOR or config.anchor_images or config.n_anchors <= images:
        return config
    log.warning("--share-anchors %d: the first batch has %d image(s); they are the anchors", config.n_anchors, images)
    return dataclasses.replace(config, n_anchors=images)


def check_anchor_images(parser, config, images):
    """One error line where --anchor-images names a position outside a batch of `images` images."""
    if config is not None and config.anchor_images and max(config.anchor_images) >= images:
        parser.error(f"--anchor-images {max(config.anchor_images)}: the batch has {images} image(s), at positions "
                     f"0 to {images - 1}; choose one of those or take a larger --n_samples")


def parse_positions(text: str) -> tuple:
    """'2,5' -> (2, 5): batch positions, counted from 0."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"anchor images are batch positions from 0, like 2 or 2,5; got {text!r}") from None


# option -> (the ConsistentAttentionConfig field it sets, the parser of its text; None: argparse typed it)
SHARE_FLAGS = {"share_groups": ("groups", parse_groups), "share_blocks": ("blocks", None),
               "share_mode": ("mode", None), "share_anchors": ("n_anchors", None),
               "anchor_images": ("anchor_images", parse_positions), "share_rate": ("sample_rate", None),
               "share_window": ("window", parse_window), "share_cfg": ("cfg", None),
               "subject": ("subjects", parse_subjects), "share_adain": ("adain", None)}


def flag_name(option):
    """'share_groups' -> '--share-groups'."""
    return f"--{option.replace('_', '-')}"


FLAG_OF_FIELD = {field_name: flag_name(name) for name, (field_name, _) in SHARE_FLAGS.items()}


def given_share_flags(opt):
    return [flag_name(name) for name in SHARE_FLAGS if getattr(opt, name) is not None]


def config_from_share_flags(opt, parser):
    """The ConsistentAttentionConfig of the --share-* flags (defaults for those not given); a bad
    value is one error line naming its flag."""
    chosen = {"seed": getattr(opt, "seed", 0)}
    for name, (field_name, parse) in SHARE_FLAGS.items():
        value = getattr(opt, name)
        if value is None:
            continue
        try:
            chosen[field_name] = parse(value) if parse else value
        except ValueError as err:
            parser.error(f"{flag_name(name)}: {err}")
    if opt.anchor_images is not None and opt.share_anchors is not None \
            and opt.share_anchors != len(chosen["anchor_images"]):
        parser.error(f"--anchor-images names {len(chosen['anchor_images'])} image(s), --share-anchors "
                     f"{opt.share_anchors}: drop --share-anchors, the anchors are the images named")
    try:
        return ConsistentAttentionConfig(**chosen)
    except SettingError as err:
        parser.error(f"{FLAG_OF_FIELD[err.field]}: {err}")


__all__ = [
    # settings
    "Group", "Blocks", "Side", "ShareMode", "CfgPolicy", "SettingError", "ConsistentAttentionConfig", "parse_groups",
    "parse_window",
    # the policy and the attention it computes
    "SharedKV", "AnchorsFirst", "anchors_first", "split_groups", "share_per_cfg_group", "joint_attention",
    "anchor_attention", "read_with_anchors", "channel_stats", "adain_to", "adain_to_anchor", "read_masked",
    "masked_joint_attention", "masked_anchor_attention", "sampled_tokens", "sampled_attention",
    # where the layers are, switching it on and off
    "AttentionSite", "self_attention_sites", "selected_sites", "cross_attention_layers",
    "enable_consistent_attention", "subject_masks_for", "subject_tokens_in", "in_window",
    "disable_consistent_attention", "consistent_attention", "unet_of",
    # command line
    "add_arguments", "config_from_arguments", "check_anchors_leave_readers", "check_anchor_images", "parse_positions",
    "given_share_flags", "config_from_share_flags",
]
