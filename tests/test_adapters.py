"""T2I-Adapter modules, checkpoints and UNet injection (ldm/modules/adapters.py)."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FULL_CONFIG, TINY_CONFIG, fill_zero_weights_
from ldm.checkpoints import CheckpointError
from ldm.modules.adapters import (SD_V1_CHANNELS, Adapter, AdapterInjection, LightAdapter,
                                  adapter_conditioning, check_adapter_fits, combine_features,
                                  detect_adapter, injection_sites, load_adapter, strip_prefix,
                                  unet_level_channels)
from ldm.modules.diffusionmodules.openaimodel import UNetModel, timestep_of_call

TINY_CHANNELS = (32, 64, 128, 128)


def unet_from(config_path, device="cpu"):
    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params.unet_config.params)
    with torch.device(device):
        return UNetModel(**params)


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny config's UNet with every weight non-zero (upstream zero-initialises the output
    convolutions, which would make the noise prediction ignore everything we add)."""
    torch.manual_seed(0)
    unet = unet_from(TINY_CONFIG).eval()
    fill_zero_weights_(unet)  # let attention/adapters reach the output
    return unet


def unet_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)


def tiny_features(seed=0, batch=2, scale=1.0):
    """Random features with the tiny UNet's shapes at 64 px (latent 8x8)."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, c, 8 >> level, 8 >> level, generator=g)
            for level, c in enumerate(TINY_CHANNELS)]


def compact(state_dict):
    """Same keys and shapes, stored as 0-stride views of one number: a full-size SD adapter file
    of a few kB instead of 300 MB."""
    return {k: torch.full((1,), 0.01).expand(v.shape) for k, v in state_dict.items()}


# --- released checkpoint layout -------------------------------------------------------------

def test_full_adapter_has_the_released_sd14_key_layout():
    with torch.device("meta"):
        sketch = Adapter(cond_channels=1)  # t2iadapter_sketch_sd14v1: 1 channel, 2 blocks/level, ksize 1
    sd = sketch.state_dict()
    assert sd["conv_in.weight"].shape == (320, 64, 3, 3)
    blocks = {f"body.{k}.block{j}.{p}" for k in range(8) for j in (1, 2) for p in ("weight", "bias")}
    # the width changes 320->640 in block 2 and 640->1280 in block 4; 1280->1280 needs no projection
    in_convs = {f"body.{k}.in_conv.{p}" for k in (2, 4) for p in ("weight", "bias")}
    assert set(sd) == {"conv_in.weight", "conv_in.bias"} | blocks | in_convs
    assert sd["body.2.in_conv.weight"].shape == (640, 320, 1, 1)
    assert sd["body.7.block1.weight"].shape == (1280, 1280, 3, 3)
    assert sd["body.7.block2.weight"].shape == (1280, 1280, 1, 1)


def test_light_adapter_has_the_released_colour_key_layout():
    with torch.device("meta"):
        color = LightAdapter()  # t2iadapter_color_sd14v1: 3 channels, 4 blocks/level
    sd = color.state_dict()
    assert sd["body.0.in_conv.weight"].shape == (80, 192, 1, 1)
    assert sd["body.3.out_conv.weight"].shape == (1280, 320, 1, 1)
    assert sd["body.1.body.3.block2.weight"].shape == (160, 160, 3, 3)
    assert len(sd) == 4 * (2 + 2 + 4 * 4)


@pytest.mark.parametrize("prefix", ["", "adapter."])
@pytest.mark.parametrize("make, kind, cond_channels", [
    (lambda: Adapter(cond_channels=1), "full", 1),
    (lambda: Adapter(cond_channels=3), "full", 3),
    (lambda: LightAdapter(), "light", 3),
])
def test_sd_size_checkpoint_saves_reloads_strictly_and_is_detected(tmp_path, prefix, make, kind, cond_channels):
    with torch.device("meta"):
        reference = make()
    path = tmp_path / "t2iadapter_sd14v1.pth"
    torch.save({prefix + k: v for k, v in compact(reference.state_dict()).items()}, path)
    spec = detect_adapter(strip_prefix(torch.load(path, weights_only=True)))
    assert (spec.kind, spec.cond_channels, spec.channels) == (kind, cond_channels, SD_V1_CHANNELS)
    assert spec.num_res_blocks == (4 if kind == "light" else 2)
    adapter = load_adapter(path)
    assert type(adapter) is type(reference) and adapter.cond_channels == cond_channels
    assert all(torch.all(p == 0.01) for p in adapter.parameters())


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    sd = Adapter(TINY_CHANNELS, cond_channels=1).state_dict()
    sd.pop("body.3.block2.bias")
    sd["body.3.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: body\.3\.block2\.bias; unexpected keys: body\.3\.extra"):
        load_adapter(tmp_path / "broken.pth")


@pytest.mark.parametrize("kind, cond_channels, channels, blocks", [
    ("full_adapter", 1, [16, 32, 64, 64], 2),   # t2iadapter_{sketch,canny,...}_sd14v1's shape, narrower
    ("full_adapter", 3, [16, 32, 64, 64], 3),
    ("light_adapter", 3, [16, 32, 64], 4),      # t2iadapter_color_sd14v1's (diffusers counts 3 widths for 4 levels)
])
def test_a_diffusers_t2i_adapter_folder_computes_what_diffusers_computes(tmp_path, kind, cond_channels, channels,
                                                                         blocks):
    """T2IAdapter.save_pretrained (the TencentARC/t2iadapter_*_sd14v1 repositories' layout): loaded
    from the folder and from its weight file alone, every level's features equal diffusers' own."""
    diffusers = pytest.importorskip("diffusers")  # the test extra
    torch.manual_seed(0)
    reference = diffusers.T2IAdapter(in_channels=cond_channels, channels=channels, num_res_blocks=blocks,
                                     downscale_factor=4, adapter_type=kind).eval()
    reference.save_pretrained(tmp_path / "adapter")
    cond = torch.rand(2, cond_channels, 64, 64)
    with torch.no_grad():
        expected = reference(cond)
    cache = tmp_path / "models--TencentARC--t2iadapter_sketch_sd14v1"  # the hub cache's layout
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("c0ffee")
    (cache / "snapshots").mkdir()
    os.symlink(tmp_path / "adapter", cache / "snapshots" / "c0ffee")
    for path in (tmp_path / "adapter", cache, tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"):
        # the folder's config.json records f = 4; the file alone needs it given, as a model would
        adapter = load_adapter(path, unshuffle=None if path.is_dir() else 4)
        assert adapter.spec.kind == kind.split("_")[0] and adapter.cond_channels == cond_channels
        with torch.no_grad():
            features = adapter(cond)
        assert len(features) == len(expected) == 4
        for ours, theirs in zip(features, expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="trained for a first-stage downsampling f=4 .* this model has f=8"):
        load_adapter(tmp_path / "adapter", unshuffle=8)


def test_a_diffusers_adapter_folder_of_another_kind_is_one_clear_error(tmp_path):
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "config.json").write_text('{"adapter_type": "full_adapter_xl", "downscale_factor": 16}')
    with pytest.raises(CheckpointError, match="diffusers full_adapter_xl, not one of SD 1.x's .*; it is for SDXL"):
        load_adapter(folder)
    (folder / "config.json").write_text('{"adapter_type": "full_adapter", "downscale_factor": 8}')
    with pytest.raises(CheckpointError, match="has no diffusion_pytorch_model.safetensors"):
        load_adapter(folder)


@pytest.mark.parametrize("state_dict, message", [
    ({"model.weight": torch.zeros(1)}, r"not a T2I-Adapter checkpoint: .* \(keys: model\.weight, \.\.\.\)"),
    ({"control_model.input_hint_block.0.weight": torch.zeros(1)}, "it looks like a ControlNet"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, "it looks like a ControlNet"),  # diffusers'
    ({"model.diffusion_model.out.2.weight": torch.zeros(1)}, "it looks like a model checkpoint: pass it as --ckpt"),
    ({"style_embedding": torch.zeros(1, 4, 8)}, "style adapter"),
    ({"conv_in.weight": torch.zeros(8, 64, 3, 3), "body.0.skep.weight": torch.zeros(1)}, "sk=False"),
    ({"conv_in.weight": torch.zeros(8, 64, 3, 3), "body.0.block1.weight": torch.zeros(8, 8, 3, 3)}, "multiple of 4"),
    ({"body.0.out_conv.weight": torch.zeros(8, 2, 1, 1)}, "incomplete T2I-Adapter checkpoint: no body.0.in_conv"),
])
def test_unknown_checkpoints_are_one_clear_error(state_dict, message):
    with pytest.raises(CheckpointError, match=message):
        detect_adapter(state_dict)


# --- where the features go ------------------------------------------------------------------

def test_sd_v1_features_match_the_unet_hidden_states_at_512px():
    """On the meta device (shapes only): SD v1's UNet at a 64x64 latent, and the adapter at 512 px."""
    unet = unet_from(FULL_CONFIG, "meta")
    assert injection_sites(unet) == [2, 5, 8, 11]
    assert unet_level_channels(unet) == SD_V1_CHANNELS
    # without gradients: torch 2.6's activation checkpointing imports torch._dynamo on its first
    # call, which fails on the meta device
    with torch.device("meta"), torch.no_grad():
        adapter, light = Adapter(cond_channels=1), LightAdapter()
        shapes = [tuple(f.shape) for f in adapter(torch.zeros(1, 1, 512, 512))]
        assert shapes == [(1, 320, 64, 64), (1, 640, 32, 32), (1, 1280, 16, 16), (1, 1280, 8, 8)]
        assert [tuple(f.shape) for f in light(torch.zeros(1, 3, 512, 512))] == shapes
        seen = {}
        for i in injection_sites(unet):
            unet.input_blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, tuple(out.shape)))
        unet(torch.zeros(1, 4, 64, 64), torch.zeros(1), torch.zeros(1, 77, 768))
    assert list(seen.values()) == shapes


def test_tiny_unet_sites_and_widths(tiny_unet):
    assert injection_sites(tiny_unet) == [2, 5, 8, 11]
    check_adapter_fits(Adapter(TINY_CHANNELS), tiny_unet)
    with pytest.raises(ValueError, match=r"widths \[320, 640, 1280, 1280\].*\[32, 64, 128, 128\]"):
        with torch.device("meta"):
            check_adapter_fits(Adapter(), tiny_unet)


def plain_forward(unet, x, t, context):
    """UNetModel.forward as upstream wrote it, without the adapter hook."""
    from ldm.modules.diffusionmodules.util import timestep_embedding
    emb = unet.time_embed(timestep_embedding(t, unet.model_channels))
    h, hs = x, []
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return unet.out(h)


def test_no_adapter_is_bit_identical_to_the_plain_unet_and_the_model_is_restored(tiny_unet):
    x, context = unet_inputs()
    t = torch.full((2,), 500)
    with torch.no_grad():
        plain = plain_forward(tiny_unet, x, t, context)
        assert torch.equal(tiny_unet(x, t, context=context), plain)
        with adapter_conditioning(tiny_unet, None):
            assert torch.equal(tiny_unet(x, t, context=context), plain)
        with pytest.raises(RuntimeError, match="boom"):
            with adapter_conditioning(tiny_unet, tiny_features()):
                raise RuntimeError("boom")
        assert tiny_unet.adapter_residuals is None and not tiny_unet._forward_pre_hooks
        assert torch.equal(tiny_unet(x, t, context=context), plain)


def test_cond_tau_window(tiny_unet):
    """cond_tau 0.5: the first half of the trajectory (t >= 500) gets the features, the rest is
    exactly the plain UNet."""
    x, context = unet_inputs()
    for t, inside in [(600, True), (400, False)]:
        ts = torch.full((2,), t)
        with torch.no_grad():
            plain = tiny_unet(x, ts, context=context)
            with adapter_conditioning(tiny_unet, tiny_features(), cond_tau=0.5) as injection:
                steered = tiny_unet(x, ts, context=context)
        assert injection.active is inside
        assert torch.equal(steered, plain) is not inside
        if inside:
            assert (steered - plain).abs().max() > 1e-3
    edges = AdapterInjection([], {}, cond_tau=0.5)
    for t, inside in [(999, True), (500.0, True), (499.9, False), (0, False)]:
        # as the UNet pre-hook reads it: DPM-Solver's fractional timesteps are not truncated
        edges.start_unet_call(timestep_of_call((x, torch.tensor([t, t])), {}))
        assert edges.active is inside, t
    everywhere = AdapterInjection([], {}, cond_tau=1.0)
    everywhere.start_unet_call(0)
    assert everywhere.active


def hidden_after_first_site(unet, features, x, context):
    """The input of block 3 = hidden state after block 2 (+ level-0 features)."""
    seen = []
    handle = unet.input_blocks[3].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), adapter_conditioning(unet, features):
            unet(x, torch.full((x.shape[0],), 900), context=context)
    finally:
        handle.remove()
    return seen[0]


def test_two_weighted_adapters_add_up(tiny_unet):
    torch.manual_seed(0)
    sketch, depth = Adapter(TINY_CHANNELS, cond_channels=1), LightAdapter(TINY_CHANNELS)
    g = torch.Generator().manual_seed(3)
    edges, depth_map = torch.rand(2, 1, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        both = combine_features([(sketch, edges, 0.8), (depth, depth_map, 0.3)])
        alone = [combine_features([(sketch, edges, 0.8)]), combine_features([(depth, depth_map, 0.3)])]
        for f, a, b, raw_a in zip(both, *alone, sketch(edges), strict=True):
            torch.testing.assert_close(f, a + b)
            torch.testing.assert_close(a, 0.8 * raw_a)
        x, context = unet_inputs()
        base = hidden_after_first_site(tiny_unet, None, x, context)
        delta_both = hidden_after_first_site(tiny_unet, both, x, context) - base
        delta_a = hidden_after_first_site(tiny_unet, alone[0], x, context) - base
        delta_b = hidden_after_first_site(tiny_unet, alone[1], x, context) - base
    torch.testing.assert_close(delta_both, delta_a + delta_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_both, both[0], atol=1e-5, rtol=1e-5)


def test_cfg_batch_gets_the_features_in_both_halves():
    f = torch.arange(2.0).reshape(2, 1, 1, 1)
    injection = AdapterInjection([f], sites={0: 0})
    h = torch.zeros(4, 1, 1, 1)  # [uncond 0, uncond 1, cond 0, cond 1]
    assert injection(0, h).flatten().tolist() == [0, 1, 0, 1]
    assert injection(1, h) is h  # not an injection site
    one = AdapterInjection([torch.ones(1, 1, 1, 1)], sites={0: 0})
    assert injection(0, torch.zeros(2, 1, 1, 1)).flatten().tolist() == [0, 1]
    assert one(0, torch.zeros(4, 1, 1, 1)).flatten().tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="features for 2 images cannot be applied to a batch of 3"):
        injection(0, torch.zeros(3, 1, 1, 1))
    with pytest.raises(ValueError, match="size of the generated image"):
        injection(0, torch.zeros(2, 1, 2, 2))
