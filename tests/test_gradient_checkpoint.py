"""The UNet's `use_checkpoint` reaches its transformer blocks, and checkpointing changes no gradient."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import UNetModel


def tiny_unet(use_checkpoint):
    torch.manual_seed(0)
    return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=16, use_checkpoint=use_checkpoint, legacy=False)


def block_flags(module):
    return [block.checkpoint for block in module.modules() if isinstance(block, BasicTransformerBlock)]


@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_every_transformer_block_follows_the_unets_use_checkpoint(use_checkpoint):
    flags = block_flags(tiny_unet(use_checkpoint))
    assert len(flags) == 7 and all(flag is use_checkpoint for flag in flags)  # encoder 2, middle 1, decoder 4


@pytest.mark.parametrize("name, expected", [("configs/embedded/procedural-t2i.yaml", False),
                                            ("configs/embedded/procedural-t2i-16px.yaml", False),
                                            ("configs/stable-diffusion/v1-tiny.yaml", True)])
def test_configs_use_checkpoint_decides_for_the_transformer_blocks(name, expected):
    params = OmegaConf.load(REPO / name).model.params.unet_config.params
    assert params.use_checkpoint is expected
    flags = block_flags(UNetModel(**params))
    assert flags and all(flag is expected for flag in flags)


def test_checkpointed_unet_gives_the_same_loss_gradients():
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    grads = []
    for use_checkpoint in (True, False):
        unet = tiny_unet(use_checkpoint)  # same seed: same weights
        unet(x, t, context=context).square().mean().backward()
        grads.append({name: p.grad for name, p in unet.named_parameters()})
    attention_grads = [name for name in grads[0] if "transformer_blocks" in name]
    assert attention_grads and all(grads[0][name] is not None for name in attention_grads)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("use_checkpoint, qkv_calls", [(False, 1), (True, 2), (None, 2)])
def test_attention_blocks_recompute_in_backward_only_when_checkpointed(use_checkpoint, qkv_calls):
    """Upstream's AttentionBlock (the LDM configs without a spatial transformer) checkpointed
    whatever the config said: its attention ran again in every backward, also with False. Unset
    (None, as in those configs) it still does: the memory their batch sizes were chosen for."""
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                     num_res_blocks=1, channel_mult=[1], num_heads=2, use_checkpoint=use_checkpoint)
    calls = []
    qkv = next(module.qkv for module in unet.modules() if hasattr(module, "qkv"))
    qkv.register_forward_hook(lambda *_: calls.append(1))
    unet(torch.randn(1, 4, 8, 8), torch.tensor([10])).square().mean().backward()
    assert len(calls) == qkv_calls


def test_unset_use_checkpoint_checkpoints_the_attention_only_as_upstream():
    unet = tiny_unet(None)
    assert all(block_flags(unet)) and not any(block.use_checkpoint for block in unet.modules()
                                               if type(block).__name__ == "ResBlock")
