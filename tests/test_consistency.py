"""Invariants of consistent self-attention (ldm/modules/consistency.py), checked bit-exactly on the
tiny UNet (same attention layout as SD v1, random weights) on CPU."""
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention import CrossAttention, einsum_attention, sdpa_attention
from ldm.modules.consistency import (
    CfgPolicy, ConsistentAttentionConfig, Group, Blocks, SharedKV, ShareMode, anchor_attention,
    consistent_attention, disable_consistent_attention, enable_consistent_attention,
    joint_attention, parse_groups, parse_window, sampled_attention, self_attention_sites)
from ldm.util import instantiate_from_config
from conftest import FULL_CONFIG as FULL, TINY_CONFIG as TINY, count_ops, fill_zero_weights_

MODES = [ShareMode.ALL, ShareMode.ANCHOR, ShareMode.SAMPLE]
ALL_GROUPS = frozenset(Group)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    cfg = OmegaConf.load(TINY).model.params.unet_config
    model = instantiate_from_config(cfg).eval()
    fill_zero_weights_(model)  # let attention/adapters reach the output
    return model


def inputs(batch, seed=0, t=500):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 77, 32, generator=g)
    return x, torch.full((batch,), t), context


def run(unet, x, t, c, config=None, images_per_group=None):
    with torch.no_grad(), consistent_attention(unet, config, images_per_group or x.shape[0]):
        return unet(x, t, context=c)


def config(**kw):
    kw.setdefault("groups", ALL_GROUPS)
    return ConsistentAttentionConfig(**kw)


# --- the attention kernels -------------------------------------------------------------------

def test_sdpa_matches_einsum_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, 50, 16, generator=g) for _ in range(3))
    mask = torch.rand(3, 50, generator=g) > 0.3
    torch.testing.assert_close(sdpa_attention(q, k, v), einsum_attention(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), einsum_attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context_dim", [None, 32])
def test_crossattention_backends_agree(context_dim):
    torch.manual_seed(0)
    sdpa = CrossAttention(64, context_dim=context_dim, heads=4, dim_head=16)
    ref = CrossAttention(64, context_dim=context_dim, heads=4, dim_head=16, backend="einsum")
    ref.load_state_dict(sdpa.state_dict())
    x, c = torch.randn(2, 30, 64), torch.randn(2, 7, context_dim or 64)
    torch.testing.assert_close(sdpa(x, context=c), ref(x, context=c), rtol=1e-5, atol=1e-5)
    if context_dim is None:
        torch.testing.assert_close(sdpa(x), ref(x), rtol=1e-5, atol=1e-5)


def test_joint_attention_reads_all_images_of_the_group():
    # reference: for each image, plain attention over the concatenated tokens of its group
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 2, 10, 8, generator=g) for _ in range(3))  # (G, N, nh, T, hs)
    out = joint_attention(q, k, v, einsum_attention)
    for gi in range(2):
        keys = torch.cat(list(k[gi]), dim=1)[None]  # (1, nh, N·T, hs)
        vals = torch.cat(list(v[gi]), dim=1)[None]
        for n in range(3):
            expected = einsum_attention(q[gi, n][None], keys, vals)[0]
            torch.testing.assert_close(out[gi, n], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("from_plain_call", [False, True], ids=["anchors-alone", "anchors-from-the-plain-call"])
def test_anchor_attention_reads_self_and_anchors(from_plain_call):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2, 6, 8, generator=g) for _ in range(3))
    plain = einsum_attention(*(t.flatten(0, 1) for t in (q, k, v))).unflatten(0, (1, 4)) if from_plain_call else None
    out = anchor_attention(q, k, v, einsum_attention, n_anchors=2, plain=plain)
    for n in range(4):
        readable = [n] if n < 2 else [n, 0, 1]
        keys = torch.cat([k[0, j] for j in readable], dim=1)[None]
        vals = torch.cat([v[0, j] for j in readable], dim=1)[None]
        torch.testing.assert_close(out[0, n], einsum_attention(q[0, n][None], keys, vals)[0],
                                   rtol=1e-5, atol=1e-5)


def test_sampling_everything_equals_joint_attention():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 2, 10, 8, generator=g) for _ in range(3))
    full = sampled_attention(q, k, v, einsum_attention, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, joint_attention(q, k, v, einsum_attention), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 2, 16, 8, generator=g) for _ in range(3))
    draw = lambda seed: sampled_attention(q, k, v, sdpa_attention, 0.25, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def reference_sampled_attention(q, k, v, attend, rate, generator):
    """sampled_attention written the straightforward way: image by image, keys listed explicitly."""
    G, N, nh, T, hs = q.shape
    m = max(1, round(rate * T))
    picked = torch.rand(N, T, generator=generator).argsort(dim=1)[:, :m]
    out = torch.empty_like(q)
    for g in range(G):
        for i in range(N):
            keys = [k[g, i]] + [k[g, j][:, picked[j]] for j in range(N) if j != i]
            vals = [v[g, i]] + [v[g, j][:, picked[j]] for j in range(N) if j != i]
            out[g, i] = attend(q[g, i][None], torch.cat(keys, dim=1)[None], torch.cat(vals, dim=1)[None])[0]
    return out


def as_linear_output_views(G, N, nh, T, hs, seed):
    """q, k, v laid out as CrossAttention passes them: views of a (B, T, nh·hs) linear output."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(G * N, T, nh * hs, generator=g).view(G * N, T, nh, hs).transpose(1, 2)
            .reshape(G, N, nh, T, hs) for _ in range(3)]


@pytest.mark.parametrize("attend", [einsum_attention, sdpa_attention])
@pytest.mark.parametrize("G,N,T,rate", [(2, 4, 64, 0.25), (1, 3, 50, 0.5), (2, 2, 33, 0.1), (1, 5, 16, 1.0)])
@pytest.mark.parametrize("contiguous", [False, True])
def test_sampled_attention_matches_the_straightforward_reference(attend, G, N, T, rate, contiguous):
    q, k, v = as_linear_output_views(G, N, 2, T, 8, seed=6)
    if contiguous:  # another memory layout: the gather then copies, the result is the same
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ours = sampled_attention(q, k, v, attend, rate, torch.Generator().manual_seed(11))
    expected = reference_sampled_attention(q, k, v, attend, rate, torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_sampled_attention_launches_the_same_kernels_for_any_batch():
    # one gather per tensor, not one per image: the op count must not grow with N
    counts = []
    for N in (2, 8):
        q, k, v = as_linear_output_views(1, N, 2, 16, 8, seed=0)
        ops, _ = count_ops(lambda: sampled_attention(q, k, v, sdpa_attention, 0.5, torch.Generator().manual_seed(0)))
        counts.append(ops)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("mode,window,reads", [(ShareMode.ALL, (0.0, 1.0), False),
                                               (ShareMode.ANCHOR, (0.0, 1.0), False),
                                               (ShareMode.ALL, (0.0, 0.6), True),
                                               (ShareMode.SAMPLE, (0.0, 1.0), True)])
def test_timestep_value_is_read_only_when_needed(unet, monkeypatch, mode, window, reads):
    # int(t) of a GPU tensor waits for the GPU; the default settings must not need it
    import ldm.modules.consistency as consistency
    read = []
    real = consistency.timestep_of_call
    monkeypatch.setattr(consistency, "timestep_of_call", lambda *a: read.append(1) or real(*a))
    x, t, c = inputs(2)
    shared = run(unet, x, t, c, config(mode=mode, window=window))
    assert bool(read) == reads
    assert not torch.equal(shared, run(unet, x, t, c))  # t=500 is inside every window here


# --- where the layers are --------------------------------------------------------------------

def count_groups(sites):
    counts = {}
    for site, _ in sites:
        counts[(site.group.value, site.side)] = counts.get((site.group.value, site.side), 0) + 1
    return counts


SD_V1_LAYOUT = {("outer", "encoder"): 2, ("outer", "decoder"): 3,
                ("middle", "encoder"): 2, ("middle", "decoder"): 3,
                ("inner", "encoder"): 2, ("inner", "middle"): 1, ("inner", "decoder"): 3}


def test_groups_of_the_full_sd_v1_unet():
    cfg = OmegaConf.load(FULL).model.params.unet_config
    with torch.device("meta"):
        full = instantiate_from_config(cfg)
    assert count_groups(self_attention_sites(full)) == SD_V1_LAYOUT


def test_tiny_unet_has_the_sd_v1_layout(unet):
    assert count_groups(self_attention_sites(unet)) == SD_V1_LAYOUT


def test_the_groups_are_the_resolution_levels_outer_the_finest(unet):
    """What each group's layers attend over, told by the token counts they see (16² latent): the
    counts above cannot tell outer from middle, SD v1 having as many layers in each."""
    seen = {}

    def record(site):
        return lambda module, args, output: seen.setdefault(site.group, set()).add(args[0].shape[1])

    hooks = [attn.register_forward_hook(record(site)) for site, attn in self_attention_sites(unet)]
    try:
        run(unet, *inputs(1))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {Group.OUTER: {16 * 16}, Group.MIDDLE: {8 * 8}, Group.INNER: {4 * 4, 2 * 2}}


@pytest.mark.parametrize("groups,blocks", [({"outer"}, "both"), ({"middle", "inner"}, "decoder"),
                                           ({"inner"}, "encoder")])
def test_enable_selects_exactly_the_chosen_layers(unet, groups, blocks):
    cfg = ConsistentAttentionConfig(groups=groups, blocks=blocks)
    policy = enable_consistent_attention(unet, cfg, 2)
    try:
        for site, attn in self_attention_sites(unet):
            chosen = site.group.value in groups and (site.side == "middle" or blocks in ("both", site.side))
            assert (attn.kv_sharing is policy) == chosen, site
        for name, module in unet.named_modules():  # cross-attention never gets a policy
            if name.endswith("attn2"):
                assert module.kv_sharing is None
    finally:
        disable_consistent_attention(unet)
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(unet))
    assert not unet._forward_pre_hooks


# --- invariants on the whole UNet --------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_single_image_is_exactly_vanilla(unet, mode):
    x, t, c = inputs(1)
    assert torch.equal(run(unet, x, t, c, config(mode=mode)), run(unet, x, t, c))


@pytest.mark.parametrize("mode", MODES)
def test_sharing_changes_a_batch(unet, mode):
    x, t, c = inputs(4)
    shared, plain = run(unet, x, t, c, config(mode=mode)), run(unet, x, t, c)
    assert (shared[1:] - plain[1:]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_what_each_mode_reads(unet, mode):
    """all: every image reads every other, image 0 too; anchor: images read image 0 only, which
    stays plain; sample: every image reads part of every other. Told apart by which outputs move
    when image 1's latent changes."""
    x, t, c = inputs(4)
    moved = x.clone()
    moved[1] += 0.5
    cfg = config(mode=mode)
    shared, shared_moved, plain = run(unet, x, t, c, cfg), run(unet, moved, t, c, cfg), run(unet, x, t, c)
    assert torch.equal(shared[0], plain[0]) == (mode is ShareMode.ANCHOR)
    reads_image_1 = [not torch.equal(shared[i], shared_moved[i]) for i in (0, 2, 3)]
    assert reads_image_1 == ([False] * 3 if mode is ShareMode.ANCHOR else [True] * 3)


def test_sample_mode_draws_its_tokens_from_the_seed_and_the_timestep(unet):
    """The policy reseeds its generator per UNet call from (seed, t): the same seed gives the same
    images whatever ran before, another seed other ones."""
    x, _, c = inputs(3)
    t500, t900 = torch.full((3,), 500), torch.full((3,), 900)

    def calls(seed, timesteps):
        with torch.no_grad(), consistent_attention(unet, config(mode=ShareMode.SAMPLE, seed=seed), 3):
            return [unet(x, t, context=c) for t in timesteps][-1]

    alone = calls(1, [t500])
    assert torch.equal(calls(1, [t900, t500]), alone)
    assert not torch.equal(calls(2, [t500]), alone)


def test_disabled_model_is_exactly_the_plain_model(unet):
    x, t, c = inputs(3)
    before = run(unet, x, t, c)
    run(unet, x, t, c, config())  # enable, run, disable
    assert torch.equal(run(unet, x, t, c), before)


def test_only_self_attention_consults_the_policy():
    torch.manual_seed(0)
    attn = CrossAttention(64, heads=4, dim_head=16)
    x, c = torch.randn(4, 30, 64), torch.randn(4, 7, 64)
    plain_cross, plain_self = attn(x, context=c), attn(x)
    attn.kv_sharing = SharedKV(config(), images_per_group=4)
    assert torch.equal(attn(x, context=c), plain_cross)  # a context is given: cross-attention, exact
    assert not torch.equal(attn(x), plain_self)          # context is None: self-attention shares
    attn.kv_sharing = lambda q, k, v, attend, mask=None: attend(q, k, v, mask)  # a policy of one's own
    assert torch.equal(attn(x), plain_self)


@pytest.mark.parametrize("settings", [dict(mode=m) for m in MODES] + [dict(anchor_images=(2,))],
                         ids=[m.value for m in MODES] + ["anchor-image-2"])
def test_cfg_halves_never_mix(unet, settings):
    n = 3
    x, t, c = inputs(2 * n)
    x2, _, c2 = inputs(2 * n, seed=9)
    cfg = config(**settings)
    base = run(unet, x, t, c, cfg, n)
    # new content in the cond half: the uncond half is untouched, and vice versa
    cond_changed = run(unet, torch.cat([x[:n], x2[n:]]), t, torch.cat([c[:n], c2[n:]]), cfg, n)
    uncond_changed = run(unet, torch.cat([x2[:n], x[n:]]), t, torch.cat([c2[:n], c[n:]]), cfg, n)
    assert torch.equal(cond_changed[:n], base[:n])
    assert torch.equal(uncond_changed[n:], base[n:])
    plain = run(unet, x, t, c)  # and each half did share: not trivially untouched
    assert not torch.equal(base[:n], plain[:n]) and not torch.equal(base[n:], plain[n:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [4, 8])
def test_share_cfg_cond_makes_the_plain_call_only_for_a_plain_uncond_half(mode, batch):
    """On a kernel that rounds by batch size (a GPU's), --share-cfg cond takes the uncond half from
    the plain model's own call over the batch; with --scale 1 (a batch of one group) there is no
    uncond half, and outside anchor mode that call was made and thrown away."""
    calls = []

    def recording_attention(q, k, v, mask=None):
        calls.append((q.shape[0], k.shape[2]))  # the plain call: the whole batch, each image's 16 keys
        return sdpa_attention(q, k, v, mask)

    q, k, v = torch.randn(3, batch, 2, 16, 8).unbind(0)
    SharedKV(config(mode=mode, cfg=CfgPolicy.COND), images_per_group=4)(q, k, v, recording_attention)
    assert calls.count((batch, 16)) == (1 if batch == 8 or mode is ShareMode.ANCHOR else 0), calls


def test_adain_with_every_image_an_anchor_renormalises_nothing_and_warns_nothing():
    """A run's first batch of --share-anchors N is all anchors: torch warned about the variance of
    the empty rest."""
    q, k, v = torch.randn(3, 2, 2, 16, 8).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = SharedKV(config(mode=ShareMode.ANCHOR, n_anchors=2, adain=True), 2)(q, k, v, sdpa_attention)
    assert torch.equal(out, sdpa_attention(q, k, v))


@pytest.mark.parametrize("mode", MODES)
def test_halves_run_separately_equal_the_batched_halves(unet, mode):
    n = 3
    x, t, c = inputs(2 * n)
    cfg = config(mode=mode)
    batched = run(unet, x, t, c, cfg, n)
    for half in (slice(0, n), slice(n, 2 * n)):
        # not bit-exact: CPU kernels block differently for batch 3 and 6, the plain model too
        separate = run(unet, x[half], t[half], c[half], cfg, n)
        torch.testing.assert_close(separate, batched[half], rtol=1e-4, atol=1e-4)
        assert (separate - run(unet, x[half], t[half], c[half])).abs().max() > 1e-3  # and it did share


def test_cond_only_policy_leaves_uncond_half_plain(unet):
    n = 3
    x, t, c = inputs(2 * n)
    out = run(unet, x, t, c, config(cfg=CfgPolicy.COND), n)
    plain = run(unet, x, t, c)
    assert torch.equal(out[:n], plain[:n])
    assert not torch.equal(out[n:], plain[n:])


@pytest.mark.parametrize("n_anchors", [1, 2])
def test_anchor_images_are_exactly_vanilla(unet, n_anchors):
    n = 4
    x, t, c = inputs(2 * n)
    out = run(unet, x, t, c, config(mode=ShareMode.ANCHOR, n_anchors=n_anchors), n)
    plain = run(unet, x, t, c)
    for half in (0, n):
        assert torch.equal(out[half:half + n_anchors], plain[half:half + n_anchors])
        assert not torch.equal(out[half + n_anchors:half + n], plain[half + n_anchors:half + n])


@pytest.mark.parametrize("anchor_images", [(2,), (3, 1)])
def test_chosen_anchor_images_are_exactly_vanilla_and_equal_the_first_anchors_of_a_reordered_batch(
        unet, anchor_images):
    n = 4
    x, t, c = inputs(2 * n)
    out = run(unet, x, t, c, config(mode=ShareMode.ANCHOR, anchor_images=anchor_images), n)
    plain = run(unet, x, t, c)
    others = [i for i in range(n) if i not in anchor_images]
    for half in (0, n):
        anchors, readers = [half + i for i in anchor_images], [half + i for i in others]
        assert torch.equal(out[anchors], plain[anchors])
        assert not torch.equal(out[readers], plain[readers])
    # the same as the default anchors (the first images) on a batch with the chosen ones moved first
    order = [half + i for half in (0, n) for i in [*anchor_images, *others]]
    first = run(unet, x[order], t[order], c[order], config(mode=ShareMode.ANCHOR, n_anchors=len(anchor_images)), n)
    assert torch.equal(out[order], first)


def test_anchor_image_0_is_the_default_anchor(unet):
    x, t, c = inputs(6)
    assert torch.equal(run(unet, x, t, c, config(anchor_images=(0,)), 3), run(unet, x, t, c, config(), 3))
    assert SharedKV(config(anchor_images=(0, 1)), 4).order is None  # nothing to reorder, nothing copied
    with pytest.raises(ValueError, match="not in a batch of 3 images"):
        SharedKV(config(anchor_images=(3,)), 3)


def with_gradients(unet, x, t, c, cfg, n, **kw):
    """(outputs, the gradient of their squares' sum by x) of one UNet call with `cfg` shared."""
    x = x.clone().requires_grad_(True)
    with consistent_attention(unet, cfg, n, **kw):
        out = unet(x, t, context=c)
        out.square().sum().backward()
    return out.detach(), x.grad


@pytest.fixture(scope="module")
def unet_without_checkpointing(unet):
    model = instantiate_from_config(OmegaConf.load(TINY).model.params.unet_config).eval()
    model.load_state_dict(unet.state_dict())
    assert any(m.checkpoint for m in unet.modules() if hasattr(m, "checkpoint"))  # the fixture recomputes
    for module in model.modules():
        if hasattr(module, "checkpoint"):
            module.checkpoint = False
    return model


@pytest.mark.parametrize("settings", [dict(anchor_images=(1,)), dict(mode=ShareMode.ALL), dict()],
                         ids=["anchor-image-1", "all", "anchor"])
def test_gradients_through_sharing_are_the_same_with_gradient_checkpointing(unet, unet_without_checkpointing,
                                                                             settings):
    """A chosen anchor's reordering was an out= op, which autograd refuses; checkpointing recomputes
    these modes exactly, so it changes no gradient."""
    n = 3
    x, t, c = inputs(2 * n)
    out, grad = with_gradients(unet, x, t, c, config(**settings), n)
    assert torch.equal(out, run(unet, x, t, c, config(**settings), n))
    reference_out, reference_grad = with_gradients(unet_without_checkpointing, x, t, c, config(**settings), n)
    assert torch.equal(out, reference_out)
    assert torch.equal(grad, reference_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("settings", [dict(mode=ShareMode.SAMPLE), dict(window=(0.0, 0.6)), dict(subjects=("a",))],
                         ids=["sample", "window", "subjects"])
def test_gradient_checkpointing_refuses_to_recompute_sharing_that_follows_the_unet_call(
        unet, unet_without_checkpointing, settings):
    """The recomputation runs after the call: sample mode drew other tokens there (other gradients,
    silently) and subject masks had changed (torch's CheckpointError)."""
    n = 3
    x, t, c = inputs(2 * n)
    tokens = torch.zeros(n, 77, dtype=torch.bool)
    tokens[:, 2] = True
    kw = dict(subject_tokens=tokens) if "subjects" in settings else {}
    with pytest.raises(RuntimeError, match="take gradients through it with the UNet's use_checkpoint off"):
        with_gradients(unet, x, t, c, config(**settings), n, **kw)
    _, grad = with_gradients(unet_without_checkpointing, x, t, c, config(**settings), n, **kw)
    assert grad.abs().sum() > 0
    assert all(m.kv_sharing is None for m in unet.modules() if isinstance(m, CrossAttention))


def test_step_window(unet):
    cfg = config(window=(0.0, 0.5))  # only the noisier half of the trajectory
    x, t_early, c = inputs(3, t=900)  # progress 0.1: inside
    _, t_late, _ = inputs(3, t=100)   # progress 0.9: outside
    assert not torch.equal(run(unet, x, t_early, c, cfg), run(unet, x, t_early, c))
    assert torch.equal(run(unet, x, t_late, c, cfg), run(unet, x, t_late, c))


def test_a_window_that_no_unet_call_reaches_warns_that_nothing_was_shared(unet, caplog):
    x, t, c = inputs(3, t=100)  # progress 0.9
    with caplog.at_level("WARNING", logger="ldm.modules.consistency"):
        assert torch.equal(run(unet, x, t, c, config(window=(0.0, 0.5))), run(unet, x, t, c))
    assert "nothing was shared" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.modules.consistency"):
        run(unet, x, t, c, config(window=(0.5, 1.0)))
    assert "nothing was shared" not in caplog.text


def test_batch_must_hold_whole_groups(unet):
    x, t, c = inputs(3)
    with pytest.raises(ValueError, match="whole number of groups"):
        run(unet, x, t, c, config(), images_per_group=2)
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(unet))  # restored


# --- configuration -----------------------------------------------------------------------------

def test_parsing_and_validation():
    assert parse_groups("outer, inner") == {Group.OUTER, Group.INNER}
    assert parse_groups("all") == ALL_GROUPS
    assert parse_window("0:0.6") == (0.0, 0.6)
    for bad in ["outer,nope", ""]:
        with pytest.raises(ValueError, match="group"):
            parse_groups(bad)
    with pytest.raises(ValueError, match="START:END"):
        parse_window("0.6")
    with pytest.raises(ValueError, match="window"):
        ConsistentAttentionConfig(window=(0.7, 0.2))
    with pytest.raises(ValueError, match="sample rate"):
        ConsistentAttentionConfig(sample_rate=0)
    with pytest.raises(ValueError, match="anchor"):
        ConsistentAttentionConfig(n_anchors=0)
    with pytest.raises(ValueError):
        ConsistentAttentionConfig(mode="everything")
    assert ConsistentAttentionConfig(blocks="decoder").blocks is Blocks.DECODER


def upstream_crossattention_forward(self, x, context=None):
    """CrossAttention.forward as upstream (veandoer/sd ea73eb0) wrote it, for the parity test."""
    from einops import rearrange
    h = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    k, v = self.to_k(context), self.to_v(context)
    q, k, v = map(lambda t: rearrange(t, 'b n (h d) -> (b h) n d', h=h), (q, k, v))
    sim = torch.einsum('b i d, b j d -> b i j', q, k) * self.scale
    attn = sim.softmax(dim=-1)
    out = torch.einsum('b i j, b j d -> b i d', attn, v)
    out = rearrange(out, '(b h) n d -> b n (h d)', h=h)
    return self.to_out(out)


@pytest.mark.parametrize("backend,exact", [("einsum", True), ("sdpa", False)])
def test_plain_attention_matches_upstream(backend, exact):
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16, backend=backend)
    x, c = torch.randn(2, 30, 64), torch.randn(2, 7, 32)
    ours, theirs = attn(x, context=c), upstream_crossattention_forward(attn, x, context=c)
    if exact:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def parse_cli(argv, images=4):
    """The config the flags give for a run of one batch of `images` images, checked as txt2img and
    img2img check it (the anchors' readers once the prompts are read, ldm.script_helpers)."""
    import argparse
    from ldm.modules.consistency import add_arguments, check_anchors_leave_readers, config_from_arguments
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    add_arguments(parser)
    opt = parser.parse_args(argv)
    opt.consistency = config_from_arguments(opt, parser, images)
    check_anchors_leave_readers(parser, opt, images, batches=1)
    return opt.consistency


def test_cli_flags_build_the_config():
    assert parse_cli([]) is None
    default = parse_cli(["--consistent-attn"])
    assert default == ConsistentAttentionConfig(seed=42)
    # the defaults README.md and CONSISTENCY_NOTES.md state (and measured there)
    assert (default.mode, default.n_anchors, default.groups) == (ShareMode.ANCHOR, 1, {Group.MIDDLE, Group.INNER})
    assert parse_cli(["--consistent-attn", "--share-anchors", "2"]).n_anchors == 2  # no --share-mode needed
    chosen = parse_cli(["--consistent-attn", "--anchor-images", "2,0"])
    assert (chosen.anchor_images, chosen.n_anchors) == ((2, 0), 2)
    assert parse_cli(["--consistent-attn", "--anchor-images", "3", "--share-anchors", "1"]).anchor_images == (3,)
    cfg = parse_cli(["--consistent-attn", "--share-groups", "outer", "--share-mode", "anchor",
                     "--share-anchors", "2", "--share-window", "0:0.6", "--share-cfg", "cond",
                     "--share-blocks", "decoder"])
    assert cfg == ConsistentAttentionConfig(groups={"outer"}, mode="anchor", n_anchors=2, window=(0, 0.6),
                                            cfg="cond", blocks="decoder", seed=42)
    assert parse_cli(["--consistent-attn"], images=1) is None  # nothing to share: plain sampling


@pytest.mark.parametrize("argv,message", [
    (["--share-mode", "anchor"], "--share-mode takes effect only with --consistent-attn"),
    (["--consistent-attn", "--share-groups", "outer,sideways"], "--share-groups: unknown attention group"),
    (["--consistent-attn", "--share-window", "0.8:0.2"], "--share-window: step window"),
    (["--consistent-attn", "--share-mode", "sample", "--share-rate", "1.5"], "--share-rate: sample rate"),
    (["--consistent-attn", "--share-mode", "everything"], "invalid choice"),
    # never silently ignored: a flag of another mode, or anchors that leave nobody to read them
    (["--consistent-attn", "--share-rate", "0.3"], "--share-rate applies to --share-mode sample"),
    (["--consistent-attn", "--share-mode", "all", "--share-anchors", "2"],
     "--share-anchors applies to --share-mode anchor"),
    (["--consistent-attn", "--share-mode", "anchor", "--share-anchors", "4"], "--share-anchors 4 with 4 images"),
    (["--consistent-attn", "--anchor-images", "4"], "--anchor-images 4: the batch has 4 image(s), at positions 0 to 3"),
    (["--consistent-attn", "--anchor-images", "0,1,2,3"], "--anchor-images 0,1,2,3 with 4 images per batch leaves no "
                                                          "image"),  # the flag given, not the count it implies
    (["--consistent-attn", "--anchor-images", "1,1"], "--anchor-images: anchor images must be distinct batch positions"),
    (["--consistent-attn", "--anchor-images", "-1"], "distinct batch positions"),
    (["--consistent-attn", "--anchor-images", "first"], "batch positions from 0, like 2 or 2,5"),
    (["--consistent-attn", "--anchor-images", "1", "--share-anchors", "2"], "drop --share-anchors"),
    (["--consistent-attn", "--share-mode", "sample", "--anchor-images", "1"],
     "--anchor-images applies to --share-mode anchor"),
    (["--anchor-images", "1"], "--anchor-images takes effect only with --consistent-attn"),
    # one image has nothing to share, but a bad flag is still an error, not hidden by the warning
    (["--consistent-attn", "--share-anchors", "0", "--share-mode", "anchor", "IMAGES=1"], "--share-anchors: anchor count must be >= 1"),
    (["--consistent-attn", "--share-rate", "0.3", "IMAGES=1"], "--share-rate applies to --share-mode sample"),
])
def test_cli_rejects_bad_flags_with_one_line(argv, message, capsys):
    images = 1 if "IMAGES=1" in argv else 4
    with pytest.raises(SystemExit) as exit_info:
        parse_cli([a for a in argv if a != "IMAGES=1"], images=images)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
