"""LatentDiffusion's patch-wise first stage (upstream's split_input_params, which its super-resolution
notebook helpers set for large images): overlapping crops, each encoded or decoded alone, blended back."""
import pytest
import torch
import torch.nn.functional as F

FACTOR = 8  # the tiny config's first stage: 128 px images, 16 px latents


@pytest.fixture
def patched(tiny_model, monkeypatch):
    """The tiny model with a first stage that acts pixel by pixel, so that crops decoded alone and
    blended must give what the whole image gives."""
    stage = tiny_model.first_stage_model
    monkeypatch.setattr(stage, "decode", lambda z: torch.tanh(F.interpolate(z[:, :3], scale_factor=FACTOR)))
    monkeypatch.setattr(stage, "encode", lambda x: torch.cat([x, x[:, :1]], 1)[:, :, ::FACTOR, ::FACTOR] * 2)
    monkeypatch.setattr(tiny_model, "split_input_params", {
        "patch_distributed_vq": True, "vqf": FACTOR, "tie_braker": False, "clip_min_weight": 0.01,
        "clip_max_weight": 0.5, "clip_min_tie_weight": 0.01, "clip_max_tie_weight": 0.5}, raising=False)
    return tiny_model


def whole(model, method, x):
    params = model.split_input_params
    del model.split_input_params
    try:
        return getattr(model, method)(x)
    finally:
        model.split_input_params = params


@pytest.mark.parametrize("ks, stride", [((16, 16), (16, 16)), ((8, 8), (4, 4)), ((10, 10), (3, 3))])
def test_decoding_in_overlapping_patches_blends_back_to_the_whole_image(patched, ks, stride):
    patched.split_input_params.update(ks=ks, stride=stride)
    z = torch.randn(2, 4, 16, 16)
    assert torch.allclose(patched.decode_first_stage(z), whole(patched, "decode_first_stage", z), atol=1e-6)


def test_encoding_in_overlapping_patches_blends_back_and_records_the_image_size(patched):
    patched.split_input_params.update(ks=(64, 64), stride=(32, 32))
    x = torch.randn(2, 3, 128, 128)
    assert torch.allclose(patched.encode_first_stage(x), whole(patched, "encode_first_stage", x), atol=1e-6)
    assert tuple(patched.split_input_params["original_image_size"]) == (128, 128)
