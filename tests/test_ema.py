"""The EMA of a text encoder trained with the UNet (the embedded models'): averaged, sampled, loaded, exported.

Sampling pairs the UNet with the text encoder; an averaged UNet beside the encoder's last weights
is a pair that never existed in training, so LatentDiffusion averages both when the encoder trains.
"""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import TINY_CONFIG
from ldm.checkpoints import WeightsMismatchError, load_model_from_config
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


def trained_text_config():
    """v1-tiny with its text encoder trained beside the UNet and an EMA, as the embedded configs."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.update(use_ema=True, cond_stage_trainable=True)
    config.model.params.cond_stage_config.params.trainable = True
    return config


def build(config):
    torch.manual_seed(0)
    return instantiate_from_config(config.model)


@torch.no_grad()
def train_a_step(model, shift=0.5):
    """What a training step does to the weights, and the EMA update after it."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(shift)
    model.model_ema(model.ema_tracked())


def text_weights(model):
    return {k: v.clone() for k, v in model.cond_stage_model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def model():
    return build(trained_text_config())


def test_the_unets_ema_keeps_its_names_and_the_text_encoders_is_a_part_beside_it(model):
    unet_only = LitEma(model.model)  # upstream's EMA, and this repository's checkpoints before 2026-12-07
    assert model.model_ema.parts()["diffusion_model"] == list(unet_only.m_name2s_name.values())
    assert set(model.model_ema.parts()) == {"diffusion_model", "cond_stage_model"}
    assert len(model.model_ema.parts()["cond_stage_model"]) == len(list(model.cond_stage_model.parameters()))
    frozen_text = build(OmegaConf.merge(trained_text_config(), {"model": {"params": {"cond_stage_trainable": False}}}))
    assert set(frozen_text.model_ema.parts()) == {"diffusion_model"}


def test_ema_scope_samples_with_the_averaged_text_encoder_and_restores_the_trained_one():
    model = build(trained_text_config())
    first = text_weights(model)
    train_a_step(model)
    trained = text_weights(model)
    prompt = ["a photo of a chair"]
    with torch.no_grad():
        c_trained = model.get_learned_conditioning(prompt)
        with model.ema_scope():
            averaged = text_weights(model)
            c_averaged = model.get_learned_conditioning(prompt)
    decay = 2 / 11  # LitEma's warm-up: (1 + n) / (10 + n) at its first update
    for k, v in averaged.items():
        torch.testing.assert_close(v, first[k] + (1 - decay) * (trained[k] - first[k]), msg=k)
    assert not torch.allclose(c_averaged, c_trained)
    assert_same(text_weights(model), trained)


def unet_only_ema_checkpoint(model):
    """A checkpoint whose EMA covers the UNet alone, as one saved before the text encoder was averaged."""
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("model_ema.cond_stage_model")}


def test_a_checkpoint_whose_ema_covers_the_unet_alone_samples_with_its_text_encoders_weights(tmp_path):
    trained = build(trained_text_config())
    train_a_step(trained)
    path = tmp_path / "unet-ema.safetensors"
    save_file(unet_only_ema_checkpoint(trained), str(path))
    loaded = load_model_from_config(trained_text_config(), str(path))
    assert loaded.use_ema
    with loaded.ema_scope(), trained.ema_scope():
        assert_same(loaded.model.state_dict(), trained.model.state_dict())  # the UNet's EMA
    with loaded.ema_scope():
        assert_same(text_weights(loaded), text_weights(trained))  # the text encoder's own weights


def test_a_checkpoint_with_part_of_the_text_encoders_ema_is_refused(tmp_path):
    trained = build(trained_text_config())
    sd = {k: v.clone().contiguous() for k, v in trained.state_dict().items()}
    dropped = next(k for k in sd if k.startswith("model_ema.cond_stage_model"))
    del sd[dropped]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsMismatchError, match=r"EMA weights \(model_ema\.\*\) of cond_stage_model .* lacking"):
        load_model_from_config(trained_text_config(), str(path))


def test_ckpt_path_without_the_text_encoders_ema_starts_it_from_the_loaded_weights(tmp_path):
    """Training on from such a checkpoint (`model.params.ckpt_path`): the text encoder's EMA starts at
    the weights loaded, not at the random ones the model was built with; the UNet's EMA is the file's."""
    trained = build(trained_text_config())
    train_a_step(trained)
    path = tmp_path / "unet-ema.safetensors"
    save_file(unet_only_ema_checkpoint(trained), str(path))
    config = trained_text_config()
    config.model.params.ckpt_path = str(path)
    resumed = build(config)
    with resumed.ema_scope(), trained.ema_scope():
        assert_same(resumed.model.state_dict(), trained.model.state_dict())
    with resumed.ema_scope():
        assert_same(text_weights(resumed), text_weights(trained))


def test_a_nested_ema_scope_leaves_the_trained_weights_in_place_when_the_outer_one_ends():
    """LitEma stores one copy of the trained weights: a nested scope stored the EMA weights over it,
    and the outer scope then put the EMA weights back as the trained ones, for the rest of training."""
    model = build(trained_text_config())
    train_a_step(model)

    def weights():
        return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}

    trained = weights()
    with model.ema_scope():
        averaged = weights()
        with model.ema_scope():
            assert_same(weights(), averaged)
        assert_same(weights(), averaged)
    assert_same(weights(), trained)
    assert averaged.keys() == trained.keys() and any(not torch.equal(averaged[k], trained[k]) for k in trained)
