"""SD 1.x weights as a diffusers pipeline folder: parity with diffusers' and transformers' own modules.

A pipeline folder of SD v1's shape at the tiny config's size is written with diffusers'
`save_pretrained` (random weights), loaded through `load_model_from_config` like any checkpoint,
and every network must compute what diffusers' (transformers') module computes on the same input."""
import json
import os
import re
import subprocess
import sys

import diffusers  # the test extra: the reference these tests compare with
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_CONFIG, load_script, write_flagging_safety_checker
from ldm.checkpoints import CheckpointError, load_model_from_config, load_state_dict

LEVELS = (32, 64, 128, 128)  # v1-tiny.yaml: model_channels 32, channel_mult [1, 2, 4, 4]


def tiny_pipeline_modules():
    """diffusers' UNet and VAE and transformers' CLIP text model, shaped like v1-tiny.yaml."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=LEVELS, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2)  # SD 1.x's diffusers config puts the head count here
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=LEVELS, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    return unet.eval(), vae.eval(), text.eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    unet, vae, text = tiny_pipeline_modules()
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder, unet, vae, text


@pytest.fixture(scope="module")
def loaded(pipeline):
    from omegaconf import OmegaConf
    return load_model_from_config(OmegaConf.load(TINY_CONFIG), str(pipeline[0]))


@torch.no_grad()
def test_the_unet_computes_what_diffusers_unet_computes(pipeline, loaded):
    _, unet, _, _ = pipeline
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    expected = unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.1  # conv_out is not zero-initialised there: every layer counts
    torch.testing.assert_close(loaded.model.diffusion_model(x, t, context=context), expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_the_autoencoder_computes_what_diffusers_autoencoder_computes(pipeline, loaded):
    _, _, vae, _ = pipeline
    torch.manual_seed(2)
    image, z = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded.first_stage_model.decode(z), vae.decode(z).sample, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loaded.first_stage_model.encode(image).mean, vae.encode(image).latent_dist.mean,
                               atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("vae", ["pipeline", "pipeline/vae", "pipeline/vae/diffusion_pytorch_model.safetensors"])
def test_vae_from_diffusers_computes_what_diffusers_autoencoder_computes(pipeline, vae):
    """--vae with a diffusers AutoencoderKL (sd-vae-ft-mse is one): its folder, a pipeline's, or its
    weight file; the model's own autoencoder (random here) is replaced."""
    from omegaconf import OmegaConf
    folder, _, reference, _ = pipeline
    model = load_model_from_config(OmegaConf.load(TINY_CONFIG), None, random_weights=True,
                                   vae=str(folder.parent / vae.replace("pipeline", folder.name, 1)))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.first_stage_model.decode(z), reference.decode(z).sample, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_the_text_encoder_computes_what_transformers_clip_computes(pipeline, loaded):
    _, _, _, text = pipeline
    prompts = ["a photo of a wooden chair", ""]
    tokens = loaded.cond_stage_model.tokenize(prompts)
    torch.testing.assert_close(loaded.get_learned_conditioning(prompts), text(tokens).last_hidden_state,
                               atol=2e-5, rtol=1e-4)


def test_fp16_variant_files_and_older_vae_attention_names_load_too(pipeline, tmp_path):
    """`variant="fp16"` saves diffusion_pytorch_model.fp16.safetensors; diffusers before 0.14 named the
    VAE's attention query/key/value/proj_attn."""
    folder, *_ = pipeline
    for name in ("unet", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
        source = next((folder / name).glob("*.safetensors"))
        tensors = {k: v.half() for k, v in load_file(source).items()}
        if name == "vae":
            old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
            tensors = {next((k.replace(a, b) for a, b in old.items() if a in k), k): v for k, v in tensors.items()}
        save_file(tensors, tmp_path / name / source.name.replace(".safetensors", ".fp16.safetensors"))
    converted, reference = load_state_dict(tmp_path), load_state_dict(folder)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k].half()) for k in reference)


def test_bin_weights_of_older_pipelines_load_as_their_safetensors_do(pipeline, tmp_path):
    """Pipelines saved before safetensors hold diffusion_pytorch_model.bin / pytorch_model.bin, torch.save'd
    state dicts: read with weights_only, as any .ckpt."""
    folder, *_ = pipeline
    for name in ("unet", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
        source = next((folder / name).glob("*.safetensors"))
        torch.save(load_file(source), tmp_path / name / source.name.replace(".safetensors", ".bin"))
    converted, reference = load_state_dict(tmp_path), load_state_dict(folder)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_an_incomplete_or_unrelated_folder_is_one_line(pipeline, tmp_path):
    folder, *_ = pipeline
    with pytest.raises(CheckpointError, match="folder without unet/"):
        load_state_dict(tmp_path)
    (tmp_path / "unet").mkdir()
    for file in (folder / "unet").iterdir():
        os.symlink(file, tmp_path / "unet" / file.name)
    with pytest.raises(CheckpointError, match="no vae weights"):
        load_state_dict(tmp_path)


def test_a_hugging_face_cache_folder_reads_the_snapshot_refs_main_names(pipeline, tmp_path):
    """models--ORG--NAME as the hub cache lays it out: refs/main holds the commit whose snapshot
    has the pipeline (an older snapshot beside it is not read)."""
    folder, *_ = pipeline
    cache = tmp_path / "models--CompVis--stable-diffusion-v1-4"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("b2c3\n")
    (cache / "snapshots" / "a1b2").mkdir(parents=True)  # an older commit: no weights
    os.symlink(folder, cache / "snapshots" / "b2c3")
    converted = load_state_dict(folder)
    from_cache = load_state_dict(cache)
    assert from_cache.keys() == converted.keys() and all(torch.equal(from_cache[k], converted[k]) for k in converted)


@pytest.mark.parametrize("class_name, kind", [
    ("T2IAdapter", "(a T2I-Adapter, not a model: txt2img, img2img and adapter_benchmark take it as --adapter)"),
    ("ControlNetModel", "(a ControlNet, which this repository does not run)"),
    ("UNet2DConditionModel", "(one part of a pipeline: pass the pipeline folder itself)"),
])
def test_a_diffusers_folder_of_one_module_is_named(tmp_path, class_name, kind):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder without unet/ {re.escape(kind)}: pass"):
        load_state_dict(tmp_path)


def test_txt2img_samples_from_a_pipeline_folder(pipeline, tmp_path):
    folder, *_ = pipeline
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--config", str(TINY_CONFIG), "--ckpt", str(folder),
         "--prompt", "a chair", "--H", "64", "--W", "64", "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "2",
         "--consistent-attn", "--outdir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Loading model weights from {folder}" in result.stderr
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_safety_checker_comes_from_the_pipeline_folder_given_as_ckpt(pipeline, tmp_path):
    """SD v1 pipelines ship their safety checker: --safety-checker with no FOLDER reads it there,
    offline, instead of from the hub."""
    folder = tmp_path / "pipeline"
    folder.mkdir()
    for entry in pipeline[0].iterdir():
        (folder / entry.name).symlink_to(entry)
    write_flagging_safety_checker(folder)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--config", str(TINY_CONFIG), "--ckpt", str(folder),
         "--H", "64", "--W", "64", "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "2", "--safety-checker",
         "--outdir", str(tmp_path / "out")], env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"safety checker: {folder / 'safety_checker'}" in result.stderr
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 2 and not any(np.asarray(Image.open(s)).any() for s in samples)


def test_txt2img_refuses_a_folder_that_is_no_pipeline_before_building_the_model(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "txt2img.py"), "--config", str(TINY_CONFIG), "--ckpt", str(tmp_path),
         "--prompt", "a chair", "--outdir", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"txt2img.py: error: --ckpt {tmp_path} is a folder without unet/: "
                                                  "pass a checkpoint file, or a diffusers pipeline folder "
                                                  "(unet/, vae/, text_encoder/)"]
    assert not (tmp_path / "out").exists()


def test_export_checkpoint_turns_a_pipeline_folder_into_one_file(pipeline, tmp_path):
    folder, *_ = pipeline
    out = tmp_path / "sd.safetensors"
    load_script("export_checkpoint").main([str(folder), str(out), "--dtype", "fp32"])
    exported, converted = load_state_dict(out), load_state_dict(folder)
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in converted)


def test_sd14_sized_pipeline_keys_and_shapes_all_map():
    """SD 1.4's diffusers configs (the hub's unet/ and vae/ config.json, CLIP ViT-L/14's text model),
    on the meta device: every converted tensor is one the full SD v1 model has, with its shape,
    and the model lacks none."""
    from omegaconf import OmegaConf
    from ldm.diffusers_folder import COMPONENTS, unet_state_dict, vae_state_dict
    from ldm.checkpoints import apply_state_dict, remap_clip_text_keys
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
            hidden_act="quick_gelu"))
        model = instantiate_from_config(OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml").model)
    state = {}
    for (component, prefix), rename, module in zip(COMPONENTS.items(), (unet_state_dict, vae_state_dict, dict),
                                                   (unet, vae, text), strict=True):
        state.update({prefix + key: value for key, value in rename(module.state_dict()).items()})
    expected = model.state_dict()
    apply_state_dict(model, state, "SD 1.4-sized pipeline")  # no missing or misshapen weight, else it raises
    # transformers 4's CLIPTextModel nests its weights under text_model., as SD 1.x checkpoints do
    unused = [key for key in remap_clip_text_keys(state, model) if key not in expected]
    assert unused == []
