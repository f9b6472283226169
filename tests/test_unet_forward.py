"""The UNet's forward: it and the classifier's half UNet run in the dtype of their weights (a
model converted with .to(torch.bfloat16), no autocast), whatever dtype the latents and the text
features come in, and compute as upstream did under autocast; it says when class labels are
missing or not expected."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG
from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel, UNetModel


def random_(model):
    torch.manual_seed(0)
    for parameter in model.parameters():  # the zero-initialised output convs too: a real output
        parameter.data.normal_(0, 0.05)
    return model


@pytest.fixture
def unet():
    return random_(UNetModel(**OmegaConf.load(TINY_CONFIG).model.params.unet_config.params))


def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 32)


def test_a_bf16_unet_takes_float32_latents_and_text_features(unet):
    """Upstream cast the last features back to the latents' dtype before its bf16 output conv,
    and fed float32 text features to bf16 cross-attention: both failed."""
    x, t, context = inputs()
    with torch.no_grad():
        reference = unet(x, t, context=context)
        out = unet.to(torch.bfloat16)(x, t, context=context)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_under_autocast_the_output_layers_stay_float32(unet):
    """The output norm and SiLU run on float32 features under autocast, as upstream's cast to
    x.dtype made them: casting to the weights' dtype instead changes no autocast result."""
    x, t, context = inputs()
    captured = {}
    unet.out[0].register_forward_hook(lambda module, args, out: captured.update(dtype=args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(x, t, context=context)
    assert captured["dtype"] == torch.float32


@pytest.mark.parametrize("pool", ["adaptive", "spatial"])
def test_a_bf16_classifier_runs(pool):
    """EncoderUNetModel cast its input to float32 (self.dtype) and fed a float32 time embedding
    to its bf16 layers."""
    classifier = random_(EncoderUNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=3,
                                          num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2],
                                          num_head_channels=32, pool=pool))
    x, t, _ = inputs()
    with torch.no_grad():
        reference = classifier(x, t)
        out = classifier.to(torch.bfloat16)(x.bfloat16(), t)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_use_fp16_says_it_converts_nothing(caplog):
    params = OmegaConf.load(TINY_CONFIG).model.params.unet_config.params
    with torch.device("meta"):
        UNetModel(**params, use_fp16=True)
    assert "use_fp16 converts nothing here: the weights stay float32" in caplog.text


def test_class_labels_are_given_to_a_class_conditional_unet_and_only_to_one():
    """Upstream: one bare assert for both mistakes."""
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=[], channel_mult=[1], num_heads=1)
    x, t, _ = inputs()
    assert UNetModel(**params, num_classes=10)(x, t, y=torch.tensor([0, 9])).shape == x.shape
    with pytest.raises(ValueError, match=r"this UNet is class-conditional \(num_classes set\): pass it class labels"):
        UNetModel(**params, num_classes=10)(x, t)
    with pytest.raises(ValueError, match=r"this UNet has no class embedding \(num_classes unset\): pass it no"):
        UNetModel(**params)(x, t, y=torch.tensor([0, 9]))
