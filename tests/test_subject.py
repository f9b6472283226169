"""Subject masks (ldm/modules/consistency_subject.py) and StyleAligned AdaIN in consistent attention:
read-only cross-attention maps, masked reading of other images, CFG halves, anchors, on the tiny UNet (CPU)."""
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, count_ops, fill_zero_weights_
from ldm.modules.attention import CrossAttention, einsum_attention, sdpa_attention
from ldm.modules.consistency import (ConsistentAttentionConfig, Group, SharedKV, adain_to_anchor,
                                     consistent_attention, cross_attention_layers, joint_attention,
                                     masked_anchor_attention, masked_joint_attention, self_attention_sites)
from ldm.modules.consistency_subject import (SubjectMasks, SubjectNotInPrompt, otsu_masks, parse_subjects,
                                             subject_token_mask)
from ldm.modules.encoders.modules import build_clip_tokenizer, clip_tokenizer_from_config
from ldm.util import instantiate_from_config

SUBJECT = ConsistentAttentionConfig(groups=frozenset(Group), mode="all", subjects=("chair",))  # masked joint attention


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model.params.unet_config).eval()
    return fill_zero_weights_(model)


def inputs(batch, seed=0, t=500):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), t), torch.randn(batch, 77, 32, generator=g)


def tokens(n, positions=(2, 3)):
    mask = torch.zeros(n, 77, dtype=torch.bool)
    mask[:, list(positions)] = True
    return mask


def calls(unet, batches, config=SUBJECT, n=None):
    """UNet outputs of consecutive calls inside one sharing context (masks flow call to call)."""
    n = n or batches[0][0].shape[0]
    with torch.no_grad(), consistent_attention(unet, config, n, subject_tokens=tokens(n)) as policy:
        return [unet(x, t, context=c) for x, t, c in batches], policy


def plain(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, context=c)


# --- masks come from cross-attention, which stays exact -----------------------------------------

def test_observer_leaves_cross_attention_bit_exact():
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    x, c = torch.randn(4, 30, 64), torch.randn(4, 7, 32)
    before = attn(x, context=c)
    observer = SubjectMasks(torch.tensor([[0, 1, 1, 0, 0, 0, 0]] * 2, dtype=torch.bool), images_per_group=2)
    attn.observer = observer
    assert torch.equal(attn(x, context=c), before)
    assert set(observer._sums) == {30} and observer._sums[30][1] == 1  # and it did look: one 30-token map


def test_unet_cross_attention_outputs_are_bit_exact_with_the_observer(unet):
    x, t, c = inputs(4)
    recorded = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: recorded.setdefault(i, []).append(out))
             for i, layer in enumerate(cross_attention_layers(unet))]
    try:
        plain_out = plain(unet, x, t, c)
        (observed_out,), policy = calls(unet, [(x, t, c)], n=2)  # 2 per half: a [uncond; cond] batch
    finally:
        for hook in hooks:
            hook.remove()
    assert len(recorded) == 16  # SD v1's 16 transformer blocks
    for outputs in recorded.values():
        assert torch.equal(outputs[0], outputs[1])
    # the first call has no masks yet and shares nothing: the whole UNet is the plain one
    assert torch.equal(observed_out, plain_out)
    policy.subject.start_call()
    assert sorted(policy.subject.masks) == [1, 4, 16, 64]  # one mask per token resolution, 8² latent
    assert all(m.shape == (2, T) and m.dtype == torch.bool for T, m in policy.subject.masks.items())
    assert all(layer.observer is None for layer in cross_attention_layers(unet))  # restored


def test_maps_find_the_pixels_that_attend_to_the_subject_token():
    # 2 images of 4x4 tokens; text token 1 is the subject; image 0's left half, image 1's top row
    # query it, everything else queries token 0
    subject_key, other_key = torch.tensor([8.0, 0.0]), torch.tensor([0.0, 8.0])
    k = torch.stack([other_key, subject_key, other_key])[None, None].expand(2, 1, 3, 2)
    where = torch.zeros(2, 16, dtype=torch.bool)
    where[0, [0, 1, 4, 5, 8, 9, 12, 13]] = True
    where[1, :4] = True
    q = torch.where(where[:, None, :, None], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    observer = SubjectMasks(torch.tensor([[False, True, False]] * 2), images_per_group=2)
    uncond = torch.randn(2, 1, 16, 2)  # the uncond half of a [uncond; cond] batch is ignored
    observer(torch.cat([uncond, q]), torch.cat([k, k]), scale=1.0)
    observer(torch.cat([uncond, q]), torch.cat([k, k]), scale=1.0)  # a second layer, same resolution
    assert observer.masks_for(16) is None  # used from the next call on
    observer.start_call()
    assert torch.equal(observer.masks_for(16), where)


def test_maps_stay_float32_under_autocast():
    # CPU autocast stands in for CUDA's: both would run the maps' matmuls in half precision
    q, k = torch.randn(4, 2, 16, 8), torch.randn(4, 2, 3, 8)
    observer = SubjectMasks(torch.tensor([[False, True, False]] * 2), images_per_group=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        observer(q, k, scale=8 ** -0.5)
    observer.start_call()
    exact = SubjectMasks(observer.tokens, images_per_group=2)
    exact(q, k, scale=8 ** -0.5)
    exact.start_call()
    assert observer.maps[16].dtype == torch.float32
    assert torch.equal(observer.maps[16], exact.maps[16])


def test_otsu_keeps_a_small_subject_and_a_flat_map_shares_everything():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 64, generator=g) * 0.3  # background noise
    maps[0, :3] += 0.7                           # a 3-token subject
    maps[1] = 0.5
    masks = otsu_masks(maps)
    assert masks[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert masks[1].all()


# --- masked reading of the other images -------------------------------------------------------

def qkv(G=1, N=3, nh=2, T=8, hs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(G, N, nh, T, hs, generator=g) for _ in range(3)]


@pytest.mark.parametrize("attend", [einsum_attention, sdpa_attention])
def test_other_images_background_tokens_get_zero_weight(attend):
    q, k, v = qkv()
    readable = torch.zeros(3, 8, dtype=torch.bool)
    readable[1, :3] = True  # image 1 shows the subject at tokens 0-2; image 2 nowhere
    readable[0, 5:] = True
    out = masked_joint_attention(q, k, v, attend, readable)
    background = ~readable[1]
    k2, v2 = k.clone(), v.clone()
    k2[:, 1, :, background] += 5.0  # change image 1 outside its subject...
    v2[:, 1, :, background] -= 3.0
    k2[:, 2] *= -2.0                 # ...and all of image 2
    v2[:, 2] += 1.0
    out2 = masked_joint_attention(q, k2, v2, attend, readable)
    assert torch.equal(out2[:, 0], out[:, 0])  # image 0 never saw those tokens: exactly zero weight
    k3 = k.clone()
    k3[:, 1, :, :3] += 5.0                     # image 1's subject: image 0 reads it
    assert not torch.equal(masked_joint_attention(q, k3, v, attend, readable)[:, 0], out[:, 0])
    k4 = k.clone()
    k4[:, 0, :, 0] += 5.0                      # its own background: an image reads all of itself
    assert not torch.equal(masked_joint_attention(q, k4, v, attend, readable)[:, 0], out[:, 0])


def test_masked_reading_is_attention_over_own_and_subject_tokens():
    q, k, v = qkv(G=2)
    readable = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    out = masked_joint_attention(q, k, v, einsum_attention, readable)
    for g in range(2):
        for i in range(3):
            keys = torch.cat([k[g, i]] + [k[g, j][:, readable[j]] for j in range(3) if j != i], dim=1)
            vals = torch.cat([v[g, i]] + [v[g, j][:, readable[j]] for j in range(3) if j != i], dim=1)
            torch.testing.assert_close(out[g, i], einsum_attention(q[g, i][None], keys[None], vals[None])[0],
                                       rtol=1e-5, atol=1e-5)
    everything = torch.ones(3, 8, dtype=torch.bool)
    torch.testing.assert_close(masked_joint_attention(q, k, v, sdpa_attention, everything),
                               joint_attention(q, k, v, sdpa_attention), rtol=1e-5, atol=1e-5)
    nothing = torch.zeros(3, 8, dtype=torch.bool)  # every row still has its own keys: no NaN, plain attention
    alone = masked_joint_attention(q, k, v, sdpa_attention, nothing)
    flat = lambda t: t.flatten(0, 1)
    torch.testing.assert_close(flat(alone), sdpa_attention(flat(q), flat(k), flat(v)), rtol=1e-5, atol=1e-5)


def test_masked_reading_writes_memory_linear_in_the_batch():
    # every reader reads the one shared sequence: no per-reader copy of the other N-1 images' K/V
    # (which made it N² images' worth: 5.3x more bytes per image at N=8 than at N=2)
    per_image = []
    for N in (2, 8):
        q, k, v = qkv(G=2, N=N, T=16, hs=8)
        readable = torch.rand(N, 16, generator=torch.Generator().manual_seed(N)) > 0.5
        _, written = count_ops(lambda: masked_joint_attention(q, k, v, sdpa_attention, readable))
        per_image.append(written / N)
    assert per_image[1] < 1.5 * per_image[0], per_image


def test_masked_anchors_stay_exact_and_readers_read_only_anchor_subjects():
    q, k, v = qkv(N=4)
    readable = torch.zeros(4, 8, dtype=torch.bool)
    readable[0, 2:5] = True
    out = masked_anchor_attention(q, k, v, sdpa_attention, 1, readable)
    assert torch.equal(out[:, 0], sdpa_attention(q[:, 0], k[:, 0], v[:, 0]))
    k2 = k.clone()
    k2[:, 0, :, 5:] += 4.0  # the anchor's background
    k2[:, 2] += 4.0         # another reader: readers never read each other
    assert torch.equal(masked_anchor_attention(q, k2, v, sdpa_attention, 1, readable)[:, 3], out[:, 3])


# --- on the whole UNet -----------------------------------------------------------------------------

def test_single_image_with_a_subject_is_exactly_vanilla(unet):
    x, t, c = inputs(1)
    (first, second), _ = calls(unet, [(x, t, c), (x, t, c)])
    assert torch.equal(first, plain(unet, x, t, c)) and torch.equal(second, first)


def test_masks_from_one_call_shape_the_sharing_of_the_next(unet):
    x, t, c = inputs(3)
    (first, second), policy = calls(unet, [(x, t, c), (x, t, c)])
    assert torch.equal(first, plain(unet, x, t, c))  # the first call shares nothing
    assert (second - first).abs().max() > 1e-4       # the second shares inside the masks
    masks = policy.subject.masks
    assert any(0 < m.sum() < m.numel() for m in masks.values())  # and the masks do exclude tokens
    with torch.no_grad(), consistent_attention(unet, dataclasses.replace(SUBJECT, subjects=()), 3):
        unmasked = unet(x, t, context=c)
    assert not torch.equal(second, unmasked)


def test_cfg_halves_never_mix(unet):
    n = 3
    x, t, c = inputs(2 * n)
    x2, _, c2 = inputs(2 * n, seed=9)
    swap = lambda a, b, half: torch.cat([b[:n], a[n:]]) if half == "uncond" else torch.cat([a[:n], b[n:]])
    first = (x, t, c)
    (_, base), _ = calls(unet, [first, (x, t, c)], n=n)
    (_, cond_changed), _ = calls(unet, [first, (swap(x, x2, "cond"), t, swap(c, c2, "cond"))], n=n)
    (_, uncond_changed), _ = calls(unet, [first, (swap(x, x2, "uncond"), t, swap(c, c2, "uncond"))], n=n)
    assert torch.equal(cond_changed[:n], base[:n])      # the uncond half never reads the cond half
    assert torch.equal(uncond_changed[n:], base[n:])    # and vice versa
    with torch.no_grad():
        plain = unet(x, t, context=c)
    assert not torch.equal(base[:n], plain[:n]) and not torch.equal(base[n:], plain[n:])  # each half shared
    # the masks come from the cond half only: another uncond half in the first call changes nothing else
    (_, other_masks_source), _ = calls(unet, [(swap(x, x2, "uncond"), t, swap(c, c2, "uncond")), (x, t, c)], n=n)
    assert torch.equal(other_masks_source, base)


def test_subject_mask_sharing_is_restored_after_an_error(unet):
    x, t, c = inputs(3)
    with pytest.raises(ValueError, match="whole number of groups"):
        calls(unet, [(x, t, c)], n=2)
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(unet))
    assert all(layer.observer is None for layer in cross_attention_layers(unet))
    assert not unet._forward_pre_hooks


@pytest.mark.parametrize("mode", ["anchor", "sample"])
def test_other_modes_with_subject_masks(unet, mode):
    x, t, c = inputs(6)
    cfg = ConsistentAttentionConfig(groups=frozenset(Group), subjects=("chair",), mode=mode)
    (_, second), _ = calls(unet, [(x, t, c), (x, t, c)], cfg, n=3)
    reference = plain(unet, x, t, c)
    assert torch.isfinite(second).all()
    if mode == "anchor":
        assert torch.equal(second[[0, 3]], reference[[0, 3]])  # the anchor of each half stays exact
    assert not torch.equal(second, reference)


@pytest.mark.parametrize("mode", ["all", "anchor", "sample"])
def test_an_image_reads_the_others_only_inside_their_subject_masks(mode):
    """Keys and values of image 0 (anchor in anchor mode, read by images 1 and 2) changed outside
    its mask leave every image bit-identical; changed inside, the readers move. Inverted masks
    had passed the tests that compare with sharing without masks."""
    class KnownMasks:
        def masks_for(self, tokens):
            return readable

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 16, 8, generator=g) for _ in range(3))  # one group of 3 images, 16 tokens
    readable = torch.zeros(3, 16, dtype=torch.bool)
    readable[:, :6] = True
    policy = SharedKV(ConsistentAttentionConfig(groups=frozenset(Group), subjects=("chair",), mode=mode,
                                                sample_rate=1.0), 3, subject=KnownMasks())
    base = policy(q, k, v, sdpa_attention)

    def changed(tokens):
        k2, v2 = k.clone(), v.clone()
        k2[0, :, tokens] += 1.0
        v2[0, :, tokens] += 1.0
        return policy(q, k2, v2, sdpa_attention)

    outside, inside = changed(slice(6, None)), changed(slice(0, 6))
    assert torch.equal(outside[1:], base[1:])
    assert not torch.equal(inside[1], base[1]) and not torch.equal(inside[2], base[2])


# --- AdaIN ---------------------------------------------------------------------------------------

def test_adain_gives_every_image_the_anchor_statistics_and_leaves_the_anchor_alone():
    q = torch.randn(2, 3, 2, 50, 4) * torch.tensor([1.0, 3.0, 0.5])[None, :, None, None, None] + 2.0
    out = adain_to_anchor(q)
    assert torch.equal(out[:, 0], q[:, 0])
    torch.testing.assert_close(out.mean(3), q[:, :1].mean(3).expand_as(out.mean(3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.std(3), q[:, :1].std(3).expand_as(out.std(3)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n_anchors", [1, 2])
def test_adain_keeps_the_anchor_images_exact(unet, n_anchors):
    # anchor mode promises exact anchors: AdaIN then leaves every anchor alone and moves the
    # readers toward the first anchor's statistics
    n = 4
    x, t, c = inputs(2 * n)
    anchored = dict(groups=frozenset(Group), mode="anchor", n_anchors=n_anchors)
    with torch.no_grad(), consistent_attention(unet, ConsistentAttentionConfig(adain=True, **anchored), n):
        adain = unet(x, t, context=c)
    with torch.no_grad(), consistent_attention(unet, ConsistentAttentionConfig(**anchored), n):
        without = unet(x, t, context=c)
    vanilla = plain(unet, x, t, c)
    assert torch.isfinite(adain).all()  # the 1-token middle block of an 8x8 latent included
    for half in (0, n):
        anchors, readers = slice(half, half + n_anchors), slice(half + n_anchors, half + n)
        assert torch.equal(adain[anchors], vanilla[anchors])
        assert not torch.equal(adain[readers], without[readers])  # and AdaIN did act on the others


# --- subject words in the prompts ------------------------------------------------------------------

def test_subject_tokens_are_found_per_prompt():
    tokenizer = build_clip_tokenizer(model_max_length=77)
    mask = subject_token_mask(tokenizer, ["a red chair", "in the kitchen, a wooden Chair", "a chair and a chair"],
                              ("chair",), 77)
    assert mask[0].nonzero().flatten().tolist() == [3]  # <start> a red chair
    assert mask[1].nonzero().flatten().tolist() == [7]
    assert mask[2].nonzero().flatten().tolist() == [2, 5]
    two_tokens = subject_token_mask(tokenizer, ["a photo of a teddy bear"], ("teddy bear",), 77)
    assert two_tokens[0].nonzero().flatten().tolist() == [5, 6]
    with pytest.raises(SubjectNotInPrompt, match=r"--subject 'chair' is not a word of prompt 2 'two chairs'"):
        subject_token_mask(tokenizer, ["a chair", "two chairs"], ("chair",), 77)


def test_the_config_alone_gives_the_models_tokenizer(tiny_model):
    # what lets txt2img check --subject words before it loads (gigabytes for SD) the model
    cond_stage = OmegaConf.load(TINY_CONFIG).model.params.cond_stage_config
    tokenizer, max_length = clip_tokenizer_from_config(cond_stage)
    assert max_length == tiny_model.cond_stage_model.max_length
    prompt = "a photo of a teddy bear"
    assert tokenizer(prompt)["input_ids"] == tiny_model.cond_stage_model.tokenizer(prompt)["input_ids"]
    assert clip_tokenizer_from_config({"target": "ldm.modules.encoders.modules.BERTEmbedder"}) is None
    assert clip_tokenizer_from_config({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                       "params": {"version": "/some/local/clip"}}) is None


def test_subject_flags_parse():
    assert parse_subjects(["chair", "dog, cat"]) == ("chair", "dog", "cat")
    with pytest.raises(ValueError, match="empty subject"):
        parse_subjects(["chair,"])


def parse_cli(argv, images=4):
    import argparse
    from ldm.modules.consistency import add_arguments, config_from_arguments
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    add_arguments(parser)
    return config_from_arguments(parser.parse_args(argv), parser, images)


def test_cli_builds_subject_and_adain_config():
    cfg = parse_cli(["--consistent-attn", "--subject", "chair", "--subject", "dog,cat", "--share-adain"])
    assert cfg.subjects == ("chair", "dog", "cat") and cfg.adain
    assert cfg.describe()["subjects"] == ["chair", "dog", "cat"] and cfg.describe()["adain"] is True
    assert parse_cli(["--consistent-attn"]).subjects == () and not parse_cli(["--consistent-attn"]).adain


@pytest.mark.parametrize("argv,message", [
    (["--subject", "chair"], "--subject takes effect only with --consistent-attn"),
    (["--share-adain"], "--share-adain takes effect only with --consistent-attn"),
    (["--consistent-attn", "--subject", "chair,,dog"], "empty subject word"),
])
def test_cli_rejects_bad_subject_flags_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
