"""ldm.modules.consistency_image.ImageAnchor: the reference images in front of a batch, and what the
sampler is told to keep of them."""
import torch

from ldm.modules.consistency_image import ImageAnchor


def test_anchors_go_in_front_with_the_first_prompt_and_only_they_are_known(tiny_model):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    anchor = ImageAnchor(("front.png", "side.png"), pixels)
    x_T = torch.randn(3, 4, 8, 8)
    prompts, extended = anchor.extend(["a chair", "a chair, red", "a chair, blue"], x_T)
    assert len(anchor) == 2 and anchor.describe() == {"images": ["front.png", "side.png"]}
    assert prompts == ["a chair", "a chair", "a chair", "a chair, red", "a chair, blue"]
    assert torch.equal(extended[2:], x_T) and not extended[:2].any()  # no noise drawn for the anchors
    with torch.no_grad():
        known = anchor.known(tiny_model, 5)
        latents = tiny_model.get_first_stage_encoding(tiny_model.encode_first_stage(pixels).mode())
    assert known["mask"].flatten().tolist() == [1, 1, 0, 0, 0]
    assert known["x0"].shape == (5, 4, 8, 8) and torch.equal(known["x0"][:2], latents)
    assert anchor.latent(tiny_model) is anchor.latent(tiny_model)  # encoded once, the posterior's mean
