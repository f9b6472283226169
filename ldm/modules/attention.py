import torch
import torch.nn.functional as F
from torch import nn, einsum
from einops import rearrange

from ldm.modules.diffusionmodules.util import checkpoint, recomputing, zero_module
from ldm.util import default, exists


# feedforward
class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = nn.Sequential(
            nn.Linear(dim, inner_dim),
            nn.GELU()
        ) if not glu else GEGLU(dim, inner_dim)

        self.net = nn.Sequential(
            project_in,
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim_out)
        )

    def forward(self, x):
        return self.net(x)


def Normalize(in_channels):
    return torch.nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class LinearAttention(nn.Module):
    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias = False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(x)
        q, k, v = rearrange(qkv, 'b (qkv heads c) h w -> qkv b heads c (h w)', heads = self.heads, qkv=3)
        k = k.softmax(dim=-1)  
        context = torch.einsum('bhdn,bhen->bhde', k, v)
        out = torch.einsum('bhde,bhdn->bhen', context, q)
        out = rearrange(out, 'b heads c (h w) -> b (heads c) h w', heads=self.heads, h=h, w=w)
        return self.to_out(out)


def einsum_attention(q, k, v, mask=None):
    """Upstream's attention, kept as the readable reference for `sdpa_attention`.

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs); mask: (B, Tk) bool, True = may attend.
    Computed exactly as upstream did, on (B·nh, T, hs), so that with this backend the model is
    bit-for-bit upstream's. It materialises the (B·nh, Tq, Tk) score matrix, which is what makes
    512² batches run out of memory; the tests check that both backends agree within fp tolerance.
    """
    B, nh = q.shape[:2]
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B·nh, T, hs)
    sim = einsum('b i d, b j d -> b i j', q, k) * q.shape[-1] ** -0.5
    if exists(mask):
        sim.masked_fill_(~mask.repeat_interleave(nh, dim=0)[:, None, :], -torch.finfo(sim.dtype).max)
    # attention, what we cannot get enough of
    out = einsum('b i j, b j d -> b i d', sim.softmax(dim=-1), v)
    return out.unflatten(0, (B, nh))


def sdpa_attention(q, k, v, mask=None):
    """Same contract as `einsum_attention`, on PyTorch's fused kernels (flash / memory-efficient)."""
    attn_mask = mask[:, None, None, :] if exists(mask) else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "einsum": einsum_attention}


def rounds_by_batch_size(attend, device) -> bool:
    """Whether `attend` on `device` may give an image's attention other last bits in a call with
    another batch size. PyTorch's CPU SDPA computes every (image, head) alike at any batch size
    (its blocks follow the token counts); GPU kernels divide their work by it (FlashAttention
    splits the keys when batch x heads leaves SMs idle, and sums the pieces in another order).
    Any other kernel is assumed to. Consistent attention keeps its exact images exact by it
    (ldm/modules/consistency.py, `share_per_cfg_group`)."""
    return not (device.type == "cpu" and attend is sdpa_attention)


def set_attention_backend(model, backend):
    """Switch every CrossAttention of `model` to `backend` ("sdpa" or "einsum"); returns the count."""
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        layer.attend = ATTENTION_BACKENDS[backend]
    return len(layers)


# Sampling takes no gradients, so its blocks are never recomputed; this is for gradients taken
# through a policy (training, guidance) with the UNet's use_checkpoint on.
NOT_RECOMPUTABLE = ("gradient checkpointing recomputes this self-attention layer in the backward pass, after the "
                    "UNet call it ran in, and its sharing follows that call (a step window, sample mode's token "
                    "draws, subject masks or a reference's step): take gradients through it with the UNet's "
                    "use_checkpoint off")


class CrossAttention(nn.Module):
    """Multi-head attention of SD's transformer blocks.

    `attn1` of each block is self-attention (`context is None`: the image attends to itself),
    `attn2` is cross-attention (the image attends to the text tokens). For consistent batches a
    `SharedKV` policy can be set on self-attention layers (`kv_sharing`, see
    ldm/modules/consistency.py); it only decides *which* keys/values each image reads, the layer
    keeps owning the weights. Cross-attention never consults it.

    Cross-attention layers may carry an `observer` (ldm/modules/consistency_subject.py): it is
    shown the layer's queries and text keys, to locate a subject word in each image, and has no
    way to change what the layer returns.
    """
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0., backend="sdpa"):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)

        self.scale = dim_head ** -0.5
        self.heads = heads
        self.attend = ATTENTION_BACKENDS[backend]
        self.kv_sharing = None  # a SharedKV policy, or None for plain attention
        self.observer = None    # reads cross-attention's q/k (subject masks); None: nobody looks

        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)

        self.to_out = nn.Sequential(
            nn.Linear(inner_dim, query_dim),
            nn.Dropout(dropout)
        )

    def forward(self, x, context=None, mask=None):
        is_self_attention = context is None
        q = self.to_q(x)
        context = default(context, x)
        k = self.to_k(context)
        v = self.to_v(context)
        q, k, v = (rearrange(t, 'b n (h d) -> b h n d', h=self.heads) for t in (q, k, v))  # (B, nh, T, hs)

        if not is_self_attention and self.observer is not None:
            # Read-only: the observer recomputes the text attention maps from q/k on its side;
            # the output below is computed exactly as without it.
            self.observer(q, k, self.scale)
        if is_self_attention and self.kv_sharing is not None:
            # Consistent batches: let each image's queries also read other images' keys/values.
            # Only here, where an image looks at itself; the text pathway (attn2) stays exact.
            if recomputing() and not getattr(self.kv_sharing, "recomputable", False):
                raise RuntimeError(NOT_RECOMPUTABLE)
            out = self.kv_sharing(q, k, v, self.attend, mask)
        else:
            out = self.attend(q, k, v, mask)
        return self.to_out(rearrange(out, 'b h n d -> b n (h d)'))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0., context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)  # is a self-attention
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim,
                                    heads=n_heads, dim_head=d_head, dropout=dropout)  # is self-attn if context is none
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """
    Transformer block for image-like data.
    First, project the input (aka embedding)
    and reshape to b, t, d.
    Then apply standard transformer action.
    Finally, reshape to image
    `use_checkpoint`: recompute the blocks in the backward pass instead of keeping their
    activations. The UNet passes its own `use_checkpoint`; upstream always checkpointed here,
    whatever the config said, which cost small models like the embedded one training time for
    memory they do not need (measured in docs/benchmarks.md).
    """
    def __init__(self, in_channels, n_heads, d_head,
                 depth=1, dropout=0., context_dim=None, use_checkpoint=True):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)

        self.proj_in = nn.Conv2d(in_channels,
                                 inner_dim,
                                 kernel_size=1,
                                 stride=1,
                                 padding=0)

        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                   checkpoint=use_checkpoint)
                for d in range(depth)]
        )

        self.proj_out = zero_module(nn.Conv2d(inner_dim,
                                              in_channels,
                                              kernel_size=1,
                                              stride=1,
                                              padding=0))

    def forward(self, x, context=None):
        # note: if no context is given, cross-attention defaults to self-attention
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = self.proj_in(x)
        x = rearrange(x, 'b c h w -> b (h w) c')
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = rearrange(x, 'b (h w) c -> b c h w', h=h, w=w)
        x = self.proj_out(x)
        return x + x_in