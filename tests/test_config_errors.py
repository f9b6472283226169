"""Model settings a config can get wrong are refused when the model is built, with a ConfigError
naming the setting (main.py and the sampling scripts print it as one line, naming the config:
tests/test_train_main.py, tests/test_cli.py); upstream asserted ("Fool!! You forgot ..."), or
raised a KeyError."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import ConfigError, instantiate_from_config


def build(edit):
    config = OmegaConf.load(TINY_CONFIG)
    edit(config.model.params)
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def unet(**settings):
    return lambda params: params.unet_config.params.update(settings)


@pytest.mark.parametrize("edit, message", [
    (unet(context_dim=None), "use_spatial_transformer (cross-attention) and context_dim (the width of the text "
                             "features it reads, 768 for SD v1) go together; set both or neither"),
    (unet(use_spatial_transformer=False), "set both or neither"),
    (unet(num_heads=-1), "model.params.unet_config.params: set num_heads or num_head_channels"),
    # upstream built these and failed at the first call: a ZeroDivisionError, an empty assert, a
    # group norm's error; or, heads not dividing the width, silently narrowed the transformer
    (unet(num_heads=0), "unet_config.params.num_heads must be a positive divisor of every attention layer's "
                        "width [32, 64, 128], got 0"),
    (unet(num_heads=3, use_spatial_transformer=False, context_dim=None),
     "unet_config.params.num_heads must be a positive divisor"),
    (unet(num_heads=-1, num_head_channels=48), "unet_config.params.num_head_channels must be a positive divisor"),
    (unet(num_heads=-1, num_head_channels=256), "unet_config.params.num_head_channels must be a positive divisor"),
    (unet(model_channels=16), "model_channels and model_channels × channel_mult must be multiples of 32 (the group "
                              "norm's 32 groups), got 16 and [16, 32, 64, 64]"),
    (unet(model_channels=16, channel_mult=[2, 4]), "got 16 and [32, 64]"),
    (unet(use_spatial_transformer=False, context_dim=None, legacy=True, num_heads_upsample=3),
     "unet_config.params.num_heads_upsample must be a positive divisor of the decoder's attention widths"),
    (lambda params: params.update(num_timesteps_cond=2),
     "model.params.num_timesteps_cond is 2; only 1 (the conditioning is not noised) is supported"),
    # a TypeError / an assert from the autoencoder's halves, which are not the config's target
    (lambda params: params.first_stage_config.params.ddconfig.update(attn_resolution=[16]),
     "ddconfig (the autoencoder's encoder and decoder settings) does not take attn_resolution; its settings are "
     "attn_resolutions, attn_type, ch,"),
    (lambda params: params.first_stage_config.params.ddconfig.pop("z_channels"),
     "ddconfig (the autoencoder's encoder and decoder settings) lacks z_channels; its settings are"),
    (lambda params: params.update(cond_stage_trainable=True, cond_stage_config="__is_unconditional__"),
     "model.params.cond_stage_trainable: true trains a conditioning model, and cond_stage_config is "
     "__is_unconditional__: set cond_stage_trainable: false"),
    (lambda params: params.first_stage_config.params.ddconfig.update(attn_type="vanila"),
     "ddconfig.attn_type (the autoencoder's attention) is 'vanila'; it takes one of 'vanilla', 'linear', 'none'"),
])
def test_a_setting_the_model_cannot_use_is_a_config_error(edit, message):
    with pytest.raises(ConfigError) as raised:
        build(edit)
    assert message in str(raised.value)


def test_a_latent_diffusion_config_without_timesteps_takes_the_default():
    # upstream's LatentDiffusion read kwargs['timesteps']: a KeyError unless the config set it
    model = build(lambda params: params.pop("timesteps"))
    assert model.num_timesteps == 1000


def test_a_misspelt_parameter_passed_on_to_a_base_class_is_a_config_error():
    # LatentDiffusion hands its **kwargs to DDPM, whose signature refuses the typo
    with pytest.raises(ConfigError) as raised:
        build(lambda params: params.update(linear_strat=0.001))
    assert str(raised.value) == ("ldm.models.diffusion.ddpm.LatentDiffusion does not take the config's parameters as "
                                 "given: DDPM.__init__() got an unexpected keyword argument 'linear_strat'")


def test_a_type_error_inside_a_constructor_is_not_blamed_on_the_config():
    # dim_in a string: torch's TypeError, deep in nn.Linear (a ConfigError would be no TypeError)
    with pytest.raises(TypeError, match="empty"):
        instantiate_from_config({"target": "ldm.modules.attention.GEGLU", "params": {"dim_in": "2", "dim_out": 2}})


def test_the_identity_first_stage_takes_no_settings():
    # a first_stage_config switched to the identity but left with its autoencoder's params
    with pytest.raises(ConfigError, match="IdentityFirstStage.__init__.. got an unexpected keyword argument 'embed_dim'"):
        instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {"embed_dim": 4}})


def test_params_left_empty_are_none_and_params_that_are_no_mapping_are_named():
    # `params:` with nothing after it is YAML's null: TypeError "argument after ** must be a mapping"
    from omegaconf import OmegaConf
    empty = OmegaConf.create("target: ldm.models.autoencoder.IdentityFirstStage\nparams:\n")
    assert type(instantiate_from_config(empty)).__name__ == "IdentityFirstStage"
    with pytest.raises(ConfigError, match=r"the params of ldm.models.autoencoder.IdentityFirstStage are \[1, 2\]; "
                                          "give them as a mapping of names to values"):
        instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage", "params": [1, 2]})


def test_a_misspelt_target_names_the_nearest_name_and_a_missing_package_how_to_install_it():
    from ldm.util import get_obj_from_str
    with pytest.raises(ConfigError, match=r"ldm.data.lsun has no LSUNBas \(did you mean LSUNBase\?\)"):
        get_obj_from_str("ldm.data.lsun.LSUNBas")
    with pytest.raises(ConfigError, match="there is no module ldm.data.lsunn$"):
        get_obj_from_str("ldm.data.lsunn.LSUNBase")
    # a package not installed here (or a misspelt one): both told, with the pip command
    with pytest.raises(ConfigError, match=r"there is no module not_a_package_here \(misspelt, or a package this "
                                          r"environment lacks: pip install not_a_package_here\)"):
        get_obj_from_str("not_a_package_here.losses.Loss")


def test_a_first_level_wider_than_model_channels_builds_a_unet_that_runs():
    """Upstream's output conv took model_channels inputs, not the first level's width: with
    channel_mult[0] ≠ 1 the model built and failed at its first call."""
    params = OmegaConf.load(TINY_CONFIG).model.params.unet_config.params
    params.update(channel_mult=[2, 2, 4, 4])
    out = UNetModel(**params)(torch.randn(1, 4, 8, 8), torch.tensor([10]), context=torch.randn(1, 3, 32))
    assert out.shape == (1, 4, 8, 8)


def test_heads_not_dividing_a_transformers_width_are_a_warning(caplog):
    """The transformer is narrower than its level, as upstream built it: a checkpoint trained so
    still loads. An AttentionBlock with such heads fails: a ConfigError (above)."""
    model = build(unet(num_heads=3))
    assert "unet_config.params.num_heads 3 does not divide every attention layer's width [32, 64, 128]: those " \
           "transformers are narrower than their level" in caplog.text
    assert model.model.diffusion_model.middle_block[1].proj_in.out_channels == 126


def test_attention_resolutions_that_match_no_level_are_a_warning(caplog):
    build(unet(attention_resolutions=[16, 2]))  # a pixel resolution by mistake, as in two released configs
    assert "attention_resolutions [16] match no level (they are downsampling factors, [1, 2, 4, 8] for 4 " \
           "levels): those entries add no attention" in caplog.text


def test_a_trainable_conditioning_stage_that_freezes_itself_is_a_warning(caplog):
    """SD's FrozenCLIPEmbedder freezes itself unless told otherwise: upstream said "Also optimizing
    conditioner params!" and trained none of them."""
    build(lambda params: params.update(cond_stage_trainable=True))
    assert "cond_stage_trainable is true, but FrozenCLIPEmbedder freezes its parameters: none of them trains" \
        in caplog.text
    caplog.clear()
    build(lambda params: params.update(cond_stage_trainable=True) or params.cond_stage_config.params.update(
        trainable=True))
    assert "freezes its parameters" not in caplog.text


def test_the_classifiers_half_unet_checks_its_heads_when_built():
    """EncoderUNetModel (the noisy-latent classifier) failed at its first call, on an empty assert."""
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel
    with pytest.raises(ConfigError, match="num_heads must be a positive divisor of every attention layer's width"):
        EncoderUNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=3, num_res_blocks=1,
                         attention_resolutions=[2], channel_mult=[1, 2], num_heads=3)
