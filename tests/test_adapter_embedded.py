"""A T2I-Adapter for the embedded pixel-space model: construction, injection sites, the file
round trip through load_adapter, zero initialisation and the training pieces
(ldm/modules/adapters.py, ldm/modules/adapter_training.py)."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import REPO, fill_zero_weights_, has_plain_file_mode
from ldm.checkpoints import CheckpointError
from ldm.modules.adapter_training import AdapterEMA, diffusion_loss, sample_timesteps
from ldm.modules.adapters import (Adapter, adapter_for_model, first_stage_factor, injection_sites, load_adapter,
                                  save_adapter, unet_level_channels)
from ldm.util import instantiate_from_config

EMBEDDED_CONFIG = REPO / "configs" / "embedded" / "procedural-t2i.yaml"
WIDTHS = (64, 64, 64, 64)


@pytest.fixture(scope="module")
def model():
    """The embedded model with random weights, every zero weight filled (upstream zero-initialises
    the UNet's output conv, which would hide the adapter from the loss), frozen, on the CPU."""
    torch.manual_seed(0)
    m = instantiate_from_config(OmegaConf.load(EMBEDDED_CONFIG).model).eval()
    fill_zero_weights_(m.model)
    return m.requires_grad_(False)


def random_adapter(model, seed=1):
    torch.manual_seed(seed)
    return adapter_for_model(model)


def test_adapter_is_sized_from_the_pixel_space_unet(model):
    unet = model.model.diffusion_model
    assert first_stage_factor(model) == 1 and injection_sites(unet) == [2, 5, 8, 11]
    adapter = random_adapter(model)
    assert adapter.channels == unet_level_channels(unet) == WIDTHS
    assert adapter.factor == 1 and adapter.cond_channels == 1 and adapter.downsampling == 8
    # the released layout's names; no width projections (in_conv) since every level is 64 wide
    keys = set(adapter.state_dict())
    assert keys == {f"conv_in.{p}" for p in ("weight", "bias")} | {
        f"body.{k}.block{j}.{p}" for k in range(8) for j in (1, 2) for p in ("weight", "bias")}
    assert adapter.state_dict()["conv_in.weight"].shape == (64, 1, 3, 3)


def test_features_land_on_the_hidden_states_after_each_level(model):
    unet = model.model.diffusion_model
    adapter = random_adapter(model)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in adapter(torch.zeros(1, 1, 32, 32))]
        assert shapes == [(1, 64, 32, 32), (1, 64, 16, 16), (1, 64, 8, 8), (1, 64, 4, 4)]
        seen, handles = {}, []
        for i in injection_sites(unet):
            handles.append(unet.input_blocks[i].register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(i, tuple(out.shape))))
        try:
            unet(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, 32, 64))
        finally:
            for h in handles:
                h.remove()
    assert list(seen.values()) == shapes


def test_save_load_round_trip_is_strict_and_records_the_unshuffle_factor(model, tmp_path):
    adapter = random_adapter(model)
    path = tmp_path / "outline.safetensors"
    save_adapter(adapter, path, {"condition": "outline"})
    assert has_plain_file_mode(path)
    for hint in (None, 1):  # the header says f=1; the model's f agrees
        loaded = load_adapter(path, levels=4, unshuffle=hint)
        assert loaded.spec.unshuffle == 1 and loaded.channels == WIDTHS and loaded.cond_channels == 1
        for k, v in adapter.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="trained for a first-stage downsampling f=1 .* this model has f=8"):
        load_adapter(path, unshuffle=8)
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_adapter(adapter, path)


def test_file_without_header_needs_the_models_factor(model, tmp_path):
    """A bare state dict (as upstream saves them) of a pixel-space adapter: 1 input channel is
    not a multiple of 8^2, so it only loads when the model's f=1 is given."""
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in random_adapter(model).state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="not a multiple of 64"):
        load_adapter(path)
    assert load_adapter(path, unshuffle=1).spec.unshuffle == 1


def test_zero_init_starts_as_the_frozen_model_and_still_learns(model):
    adapter = random_adapter(model).zero_init_().train()
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, (torch.rand(2, 1, 32, 32, generator=g) > 0.8).float()
    context = model.get_learned_conditioning(["a red chair", "a table"])
    t, noise = torch.tensor([900, 700]), torch.randn(2, 3, 32, 32, generator=g)
    assert all(torch.count_nonzero(f) == 0 for f in adapter(cond))
    loss = diffusion_loss(model, adapter, x0, context, cond, t, noise)
    with torch.no_grad():
        assert loss.item() == pytest.approx(diffusion_loss(model, None, x0, context, cond, t, noise).item())
    loss.backward()
    assert adapter.conv_in.weight.grad.abs().sum() > 0
    assert all(block.block2.weight.grad.abs().sum() > 0 for block in adapter.body)
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen
    torch.optim.AdamW(adapter.parameters(), lr=1e-3).step()
    with torch.no_grad():
        assert all(torch.count_nonzero(f) > 0 for f in adapter(cond))
    assert model.model.diffusion_model.adapter_residuals is None  # the injection is removed again


def test_cubic_timesteps_favour_the_noisy_end():
    """t = floor((1 - u^3) T): E[t/T] = 1 - E[u^3] = 3/4 and P(t/T > 1/2) = 0.5^(1/3) = 0.794."""
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, 1000, "cubic", generator=g)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    s = t.float() / 1000
    assert s.mean().item() == pytest.approx(0.75, abs=0.005)
    assert (s > 0.5).float().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=0.005)
    assert (s > 0.9).float().mean().item() == pytest.approx(0.1 ** (1 / 3), abs=0.005)  # 0.464 (uniform: 0.1)
    uniform = sample_timesteps(200_000, 1000, "uniform", generator=g).float() / 1000
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.005)
    with pytest.raises(ValueError, match="unknown timestep sampling 'square'"):
        sample_timesteps(4, 1000, "square")


def test_ema_warms_up_like_litema():
    adapter = Adapter((4, 4), cond_channels=1, num_res_blocks=1, unshuffle=1)
    ema = AdapterEMA(adapter, decay=0.999)
    before = adapter.conv_in.weight.detach().clone()
    with torch.no_grad():
        adapter.conv_in.weight.add_(1.0)
    ema.update(adapter)  # first update: decay min(0.999, 2/11)
    torch.testing.assert_close(ema.shadow.conv_in.weight, before + (1 - 2 / 11))
