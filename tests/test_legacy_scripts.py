"""Upstream's legacy scripts (knn2img, train_searcher, sample_diffusion, inpaint): --help works
without their optional packages, bad input is one error line, not a traceback,
sample_diffusion samples an unconditional model, inpaint a tiny inpainting model and knn2img a tiny
retrieval-augmented one (with a stand-in for the clip package)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, TINY_CONFIG
from ldm.checkpoints import load_state_dict
from ldm.util import instantiate_from_config


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def error_line(result, returncode=2):
    assert result.returncode == returncode and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", ["knn2img.py", "train_searcher.py"])
def test_help_works_without_the_optional_packages(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("clip") is not None, reason="clip is installed")
def test_knn2img_names_the_missing_clip_package():
    last = error_line(run("knn2img.py"), returncode=1)
    assert "needs the optional package clip (pip install" in last, last


@pytest.mark.skipif(importlib.util.find_spec("scann") is not None, reason="scann is installed")
def test_train_searcher_names_the_missing_scann_package():
    last = error_line(run("train_searcher.py"), returncode=1)
    assert last == "error: this script needs the optional package scann (pip install scann)", last


def test_train_searcher_keeps_an_earlier_searcher(tmp_path):
    (tmp_path / "scann_config.pb").write_text("an earlier searcher")
    last = error_line(run("train_searcher.py", "--target_path", tmp_path))
    assert f"--target_path {tmp_path} is not empty: give a new folder" in last, last
    assert (tmp_path / "scann_config.pb").read_text() == "an earlier searcher"


def test_sample_diffusion_needs_a_run_folder(tmp_path):
    assert "required: -r/--resume" in error_line(run("sample_diffusion.py"))
    result = run("sample_diffusion.py", "-r", tmp_path / "nope")
    assert f"cannot find {tmp_path / 'nope'}" in error_line(result)
    assert len(result.stderr.strip().splitlines()) == 1  # the error alone, no usage block above it


@pytest.mark.parametrize("ddim_flag", [["-c", "20"], ["-e", "0"]])
def test_sample_diffusion_refuses_ddim_settings_with_the_ddpm_chain(tmp_path, ddim_flag):
    """Upstream sampled the full DDPM chain and ignored -c/-e silently."""
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "-v", *ddim_flag))
    assert "-v/--vanilla_sample runs the model's full DDPM chain: -c/--custom_steps and -e/--eta are" in last, last


def test_train_searcher_checks_its_target_before_training(tmp_path):
    """A file or an unwritable place as --target_path was found only once the searcher had trained."""
    (tmp_path / "afile").write_text("kept")
    last = error_line(run("train_searcher.py", "--target_path", tmp_path / "afile"))
    assert f"--target_path {tmp_path / 'afile'} is a file, not a folder" in last, last
    assert (tmp_path / "afile").read_text() == "kept"
    last = error_line(run("train_searcher.py", "--target_path", "/proc/searcher"))
    assert "--target_path /proc/searcher: cannot create files in this folder" in last, last


# the tiny SD config made unconditional: what sample_diffusion samples
UNCONDITIONAL = ["model.params.first_stage_key=image", "model.params.cond_stage_key=caption",
                 "model.params.conditioning_key=null", "model.params.cond_stage_config=__is_unconditional__",
                 "model.params.unet_config.params.use_spatial_transformer=false",
                 "model.params.unet_config.params.context_dim=null"]


def test_sample_diffusion_with_an_unreadable_checkpoint_is_one_error_line(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_text("not a checkpoint\n")
    assert "no config.yaml in" in error_line(run("sample_diffusion.py", "-r", ckpt))
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY_CONFIG), OmegaConf.from_dotlist(UNCONDITIONAL)),
                   tmp_path / "config.yaml")
    last = error_line(run("sample_diffusion.py", "-r", ckpt))
    assert str(ckpt) in last, last
    # the message suggests --unsafe-pickle: the script takes it (and the file is still unreadable)
    last = error_line(run("sample_diffusion.py", "-r", ckpt, "--unsafe-pickle"))
    assert f"Cannot read checkpoint {ckpt}" in last, last


def test_sample_diffusion_run_config_and_logdir_mistakes_are_one_error_line(tmp_path):
    """Each was a traceback: a hand-edited config.yaml that is no YAML or has no model, and a -l that
    is a file (after the model had loaded)."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_text("never read\n")
    (tmp_path / "config.yaml").write_text("model: [\n")
    assert f"cannot read the model config {tmp_path / 'config.yaml'}: " in error_line(run("sample_diffusion.py",
                                                                                        "-r", tmp_path))
    (tmp_path / "config.yaml").write_text("data: {}\n")
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "data.params.batch_size=1"))
    assert "with data.params.batch_size=1: Missing key model" in last, last
    for text, words in [("model: foo\n", "is not a model config: its model needs a target and a mapping of params"),
                        ("- model\n", "cannot read the model config"),
                        ("model: {params: 3}\n", "is not a model config")]:
        (tmp_path / "config.yaml").write_text(text)
        last = error_line(run("sample_diffusion.py", "-r", tmp_path))
        assert words in last, last
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY_CONFIG), OmegaConf.from_dotlist(UNCONDITIONAL)),
                   tmp_path / "config.yaml")
    (tmp_path / "a-file").write_text("kept")
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "-l", tmp_path / "a-file"))
    assert last.endswith(f"-l/--logdir {tmp_path / 'a-file'} is a file, not a folder; pass a folder"), last
    assert (tmp_path / "a-file").read_text() == "kept" and not (tmp_path / "samples").exists()


def test_sample_diffusion_samples_an_x0_model_with_its_full_chain_only(tmp_path):
    """DDIM reads the output as noise: upstream sampled noise, the refusing sampler was a traceback
    after the sample folders were made."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_text("never read\n")
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), OmegaConf.from_dotlist(UNCONDITIONAL))
    config.model.params.parameterization = "x0"
    OmegaConf.save(config, tmp_path / "config.yaml")
    last = error_line(run("sample_diffusion.py", "-r", ckpt))
    assert last.endswith(f"{ckpt} predicts x0, and DDIM samples noise-predicting models: pass -v to sample its "
                         "full chain"), last
    assert not (tmp_path / "samples").exists()


def test_inpaint_needs_its_folders(tmp_path):
    assert "required: --indir, --outdir" in error_line(run("inpaint.py"))


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_inpaint_checks_its_seed(tmp_path, seed):
    """Upstream's seed went to seed_everything unchecked: -1 sampled as 2**64 - 1 did, 2**64 was a
    traceback once the model had loaded."""
    last = error_line(run("inpaint.py", "--indir", tmp_path, "--outdir", tmp_path / "out", "--seed", seed))
    assert last.endswith(f"--seed must be between 0 and 4294967295, got {seed}"), last


def test_inpaint_with_another_kind_of_model_or_too_many_steps_is_one_error_line(tiny_inpainting_model, tmp_path):
    """Both were tracebacks once the model was built (a tokenizer fed the masked image; the sampler)."""
    config, ckpt = tiny_inpainting_model
    text_model = ["--config", "configs/embedded/procedural-t2i-16px.yaml", "--ckpt",
                  "models/embedded/procedural-t2i-16px.safetensors"]
    last = error_line(run("inpaint.py", "--indir", tmp_path, "--outdir", tmp_path / "out", *text_model))
    assert "is not an inpainting model (conditioned on 'caption', not on 'masked_image')" in last, last
    last = error_line(run("inpaint.py", "--indir", tmp_path, "--outdir", tmp_path / "out", "--config", config,
                          "--ckpt", ckpt, "--steps", "1000"))
    assert last.endswith("--steps must be below the model's 1000 training timesteps, got 1000"), last
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_inpainting_model(tmp_path_factory):
    """Upstream's inpainting config (VQ first stage, masked image + mask concatenated to the
    latent), with fewer and narrower layers; random weights saved as a .ckpt like upstream's."""
    folder = tmp_path_factory.mktemp("inpainting")
    config = OmegaConf.load(REPO / "models" / "ldm" / "inpainting_big" / "config.yaml")
    unet = config.model.params.unet_config.params
    unet.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_heads=2)
    first_stage = config.model.params.first_stage_config.params
    first_stage.ddconfig.update(ch=32, ch_mult=[1, 2], num_res_blocks=1)
    first_stage.n_embed = 16
    OmegaConf.save(config, folder / "config.yaml")
    torch.manual_seed(0)
    torch.save({"state_dict": instantiate_from_config(config.model).state_dict()}, folder / "last.ckpt")
    return folder / "config.yaml", folder / "last.ckpt"


def inpainting_inputs(folder, size=(32, 32), mask_size=None):
    folder.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    mask = np.zeros((mask_size or size)[::-1], np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(image).save(folder / "cat.png")
    Image.fromarray(mask).save(folder / "cat_mask.png")
    return image, mask > 0


def test_inpaint_fills_the_mask_and_keeps_the_rest(tiny_inpainting_model, tmp_path):
    """Outside the mask every pixel is the input's (upstream truncated them: some levels came back
    one darker); the same seed gives the same image; a second run never overwrites the
    first."""
    config, ckpt = tiny_inpainting_model
    image, mask = inpainting_inputs(tmp_path / "in")
    for name in ("out", "again"):
        result = run("inpaint.py", "--indir", tmp_path / "in", "--outdir", tmp_path / name, "--steps", "2",
                     "--config", config, "--ckpt", ckpt)
        assert result.returncode == 0, result.stderr[-3000:]
    inpainted = np.array(Image.open(tmp_path / "out" / "cat.png"))
    assert inpainted.shape == image.shape
    assert (inpainted[~mask] == image[~mask]).all()
    assert (inpainted[mask] != image[mask]).mean() > 0.9
    assert (tmp_path / "again" / "cat.png").read_bytes() == (tmp_path / "out" / "cat.png").read_bytes()
    before = (tmp_path / "out" / "cat.png").read_bytes()
    last = error_line(run("inpaint.py", "--indir", tmp_path / "in", "--outdir", tmp_path / "out",
                          "--config", config, "--ckpt", ckpt))
    assert last.endswith(f"{tmp_path / 'out' / 'cat.png'} exists; outputs are never overwritten: pass a new --outdir")
    assert (tmp_path / "out" / "cat.png").read_bytes() == before


@pytest.mark.parametrize("size, mask_size, expected", [
    ((34, 32), None, "cat.png is 34x32; this model needs sides that are multiples of 4"),  # its VQ and UNet: 2 x 2
    ((32, 32), (32, 64), "cat_mask.png is 32x64 but"),
], ids=["not a multiple", "mask of another size"])
def test_inpaint_input_of_the_wrong_size_is_one_error_line(tiny_inpainting_model, tmp_path, size, mask_size,
                                                           expected):
    config, ckpt = tiny_inpainting_model
    inpainting_inputs(tmp_path / "in", size, mask_size)
    last = error_line(run("inpaint.py", "--indir", tmp_path / "in", "--outdir", tmp_path / "out",
                          "--config", config, "--ckpt", ckpt))
    assert expected in last, last
    assert not (tmp_path / "out").exists()


def test_inpaint_mask_that_is_no_image_is_one_error_line(tiny_inpainting_model, tmp_path):
    config, ckpt = tiny_inpainting_model
    inpainting_inputs(tmp_path / "in")
    (tmp_path / "in" / "cat_mask.png").write_text("not a png")
    last = error_line(run("inpaint.py", "--indir", tmp_path / "in", "--outdir", tmp_path / "out",
                          "--config", config, "--ckpt", ckpt))
    assert f"cannot read {tmp_path / 'in' / 'cat.png'} and its mask as images: cannot identify image file" in last, last
    assert not (tmp_path / "out").exists()


def test_inpaint_weights_that_are_no_checkpoint_file_are_one_error_line_before_loading(tiny_inpainting_model,
                                                                                       tmp_path):
    """A folder was "not found"; a text file was refused only once the model was built."""
    config, _ = tiny_inpainting_model
    inpainting_inputs(tmp_path / "in")
    (tmp_path / "notes.txt").write_text("not weights")
    for ckpt, expected in [(tmp_path / "in", f"--ckpt {tmp_path / 'in'} is a folder; pass the inpainting model's "
                                             "checkpoint file"),
                           (tmp_path / "notes.txt", "--ckpt: Unsupported checkpoint type '.txt'")]:
        last = error_line(run("inpaint.py", "--indir", tmp_path / "in", "--outdir", tmp_path / "out",
                              "--config", config, "--ckpt", ckpt))
        assert expected in last, last
    assert not (tmp_path / "out").exists()


def test_sample_diffusion_refuses_a_conditional_model_and_bare_flags_in_one_line(tmp_path):
    # upstream built the model, made the sample folders, then raised NotImplementedError
    (tmp_path / "config.yaml").write_text(TINY_CONFIG.read_text())  # text-conditioned
    (tmp_path / "model.ckpt").write_text("never read")
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "-n", "1"))
    assert f"{tmp_path / 'model.ckpt'} is a conditional model (conditioned on its 'txt')" in last, last
    assert f"scripts/txt2img.py --config {tmp_path / 'config.yaml'} --ckpt {tmp_path / 'model.ckpt'}" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "model.ckpt"]  # no sample folders
    shutil.copy(REPO / "configs" / "latent-diffusion" / "cin256-v2.yaml", tmp_path / "config.yaml")
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "-n", "1"))  # class labels: no txt2img to suggest
    assert last.endswith("is a conditional model (conditioned on its 'class_label'); this script samples "
                         "unconditional ones"), last
    (tmp_path / "config.yaml").write_text(TINY_CONFIG.read_text())
    # a flag without its value was None (upstream's nargs="?"): a TypeError at sampling
    for bad in (["-n"], ["--batch_size", "0"], ["-e", "1.5"]):
        assert "error:" in error_line(run("sample_diffusion.py", "-r", tmp_path, *bad)), bad
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.merge(OmegaConf.load(TINY_CONFIG),
                                                                            OmegaConf.from_dotlist(UNCONDITIONAL))))
    last = error_line(run("sample_diffusion.py", "-r", tmp_path, "-c", "1000"))  # was a traceback after loading
    assert last.endswith("-c/--custom_steps must be below the model's 1000 training timesteps, got 1000"), last


def test_sample_diffusion_samples_a_main_py_run_and_a_model_folder(tmp_path):
    """An unconditional LDM (the tiny config without text), trained for one step by main.py: sampled
    from its run's checkpoint (config found in the run's configs/), and from upstream's model
    folder layout (config.yaml + model.ckpt); fewer samples than a batch, as many files as asked."""
    overrides = UNCONDITIONAL + ["lightning.modelcheckpoint.params.monitor=null",
                                 "lightning.modelcheckpoint.params.save_top_k=0"]
    trained = subprocess.run([sys.executable, "main.py", "--base", str(TINY_CONFIG),
                              str(REPO / "tests" / "configs" / "tiny-train-data.yaml"), "-t", "--accelerator", "cpu",
                              "--devices", "1", "--max_steps", "1", "--logdir", str(tmp_path / "logs"), *overrides],
                             cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs").iterdir()
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(next((run_dir / "configs").glob("*-project.yaml")), folder / "config.yaml")
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", folder / "model.ckpt")
    for name, resume in (("run", run_dir / "checkpoints" / "last.ckpt"), ("folder", folder)):
        result = run("sample_diffusion.py", "-r", resume, "-n", "3", "--batch_size", "2", "-c", "2", "-e", "0",
                     "-l", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        (samples,) = (tmp_path / name).glob("*/samples/00000001/*")
        assert samples.parents[2].name == (run_dir.name if name == "run" else "model")  # the run's name, not checkpoints
        assert sorted(p.name for p in (samples / "img").iterdir()) == [f"sample_{i:06}.png" for i in range(3)]
        assert [p.name for p in (samples / "numpy").iterdir()] == ["3x64x64x3-samples.npz"]
    # a checkpoint in the current folder: its log folder is "" (the samples were an IndexError)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sample_diffusion.py"), "-r", "model.ckpt", "-n",
                             "1", "-c", "1", "-l", str(tmp_path / "here")], cwd=folder, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "here").glob("model/samples/*/*/img/sample_000000.png"))
    # a safetensors file (no global step: upstream's KeyError) samples; one without a UNet weight
    # is one error line (upstream loaded non-strictly and sampled noise)
    weights = load_state_dict(folder / "model.ckpt")
    save_file(weights, str(folder / "model.ckpt"))
    result = run("sample_diffusion.py", "-r", folder, "-n", "1", "-c", "1", "-l", tmp_path / "safetensors")
    assert result.returncode == 0 and list((tmp_path / "safetensors").glob("model/samples/00000000/*/img/*.png"))
    del weights["model.diffusion_model.out.2.weight"]
    save_file(weights, str(folder / "model.ckpt"))
    assert "lacks 1 weights this config needs" in error_line(run("sample_diffusion.py", "-r", folder, "-n", "1",
                                                                 "-c", "1", "-l", tmp_path / "incomplete"))


@pytest.fixture(scope="module")
def tiny_retrieval_model(tmp_path_factory):
    """Upstream's retrieval-augmented config (16-channel latents of an f16 KL autoencoder, CLIP text
    embeddings through cross-attention), with fewer and narrower layers and 8-feature text."""
    folder = tmp_path_factory.mktemp("rdm")
    config = OmegaConf.load(REPO / "configs" / "retrieval-augmented-diffusion" / "768x768.yaml")
    unet = config.model.params.unet_config.params
    unet.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                num_head_channels=16, context_dim=8, use_checkpoint=False)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    ddconfig.update(ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[])
    OmegaConf.save(config, folder / "config.yaml")
    torch.manual_seed(0)
    save_file(instantiate_from_config(config.model).state_dict(), folder / "model.safetensors")
    return folder


CLIP_STAND_IN = REPO / "tests" / "clip_stand_in"


def run_knn2img(model, outdir, home, *flags):
    """knn2img's text-only path (no retrieval database) with the clip stand-in, whose cache is
    home/.cache/clip."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(CLIP_STAND_IN), HOME=str(home))
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "knn2img.py"), "--config", str(model / "config.yaml"),
         "--ckpt", str(model / "model.safetensors"), "--H", "32", "--W", "32", "--ddim_steps", "2",
         "--n_samples", "2", "--outdir", str(outdir), *map(str, flags)], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300)


def test_knn2img_takes_the_sampler_by_name_a_trusted_clip_file_and_says_what_has_no_effect(tiny_retrieval_model,
                                                                                             tmp_path):
    """--sampler as txt2img's (upstream had --plms only, kept as its alias); a CLIP .pt file loads
    with --unsafe-pickle and a warning; retrieval options without --use_neighbors are said to do nothing."""
    clip_file = tmp_path / "my-clip.pt"
    clip_file.write_bytes(b"a CLIP model this user trusts")
    result = run_knn2img(tiny_retrieval_model, tmp_path / "out", tmp_path / "home", "--sampler", "dpm", "--knn", "3",
                         "--clip_type", clip_file, "--unsafe-pickle", "--skip_grid")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert "--knn only applies with --use_neighbors" in result.stderr
    assert f"Loading {clip_file} with clip.load (--unsafe-pickle): this can run arbitrary code" in result.stderr


def test_knn2img_numbers_its_images_after_those_already_there(tiny_retrieval_model, tmp_path):
    """A text-only run, twice into one folder: upstream counted the files there, so a gap in the
    numbering made it write over the highest-numbered images."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00005.png").write_bytes(b"not mine")
    (tmp_path / "home" / ".cache" / "clip").mkdir(parents=True)
    (tmp_path / "home" / ".cache" / "clip" / "ViT-L-14.pt").write_bytes(b"CLIP's weights, downloaded earlier")
    for _ in range(2):
        result = run_knn2img(tiny_retrieval_model, tmp_path, tmp_path / "home")
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"{i:05}.png" for i in range(5, 10)]
    assert (tmp_path / "samples" / "00005.png").read_bytes() == b"not mine"
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert Image.open(tmp_path / "samples" / "00006.png").size == (32, 32)


def test_knn2img_bad_input_is_one_error_line_before_the_model(tiny_retrieval_model, tmp_path):
    """Upstream checked none of these; each ended in a traceback after the model had loaded (or, with
    --scale nan, in NaN images)."""
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "data" / "rdm" / "retrieval_databases" / "openimages").mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(CLIP_STAND_IN), HOME=str(tmp_path))
    for flags, message in ((["--ddim_steps", "1000"], "--ddim_steps must be below the model's 1000 training "
                                                       "timesteps, got 1000"),
                           (["--n_samples", "0"], "--n_samples: must be at least 1, got 0"),
                           (["--n_repeat", "0"], "--n_repeat: must be at least 1, got 0"),
                           (["--knn", "-3"], "--knn: must be at least 1, got -3"),
                           (["--n_rows", "-1"], "--n_rows must be 0 (= n_samples) or positive, got -1"),
                           (["--from-file", tmp_path / "nope.txt"], "nope.txt: not found"),
                           (["--from-file", tmp_path / "empty.txt"], "empty.txt has no prompts"),
                           (["--ddim_eta", "2"], "--ddim_eta must be between 0 (deterministic) and 1"),
                           (["--plms", "--ddim_eta", "0.5"], "--sampler plms is deterministic (leave --ddim_eta out)"),
                           (["--plms", "--sampler", "dpm"], "--plms contradicts --sampler dpm"),
                           (["--sampler", "dpm", "--ddim_steps", "1"], "--sampler dpm needs --ddim_steps 2 or more"),
                           (["--H", "48"], "--H must be a positive multiple of 32, got 48"),
                           (["--W", "0"], "--W must be a positive multiple of 32, got 0"),
                           (["--scale", "nan"], "--scale must be a finite number, got nan"),
                           (["--use_neighbors", "--database", "openimages"],
                            "--database openimages: no .npz files in data/rdm/retrieval_databases/openimages")):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "knn2img.py"), "--config",
                                 str(tiny_retrieval_model / "config.yaml"), "--ckpt",
                                 str(tiny_retrieval_model / "model.safetensors"), "--outdir", str(tmp_path / "out"),
                                 *map(str, flags)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert message in error_line(result) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # clip.load runs the code a file carries (torch.jit.load): upstream loaded any file named
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "knn2img.py"), "--config",
                             str(tiny_retrieval_model / "config.yaml"), "--ckpt",
                             str(tiny_retrieval_model / "model.safetensors"), "--outdir", str(tmp_path / "out"),
                             "--clip_type", str(tmp_path / "empty.txt")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert error_line(result, returncode=1).endswith("empty.txt would be loaded by OpenAI CLIP's clip.load, which can "
                                                     "run code the file carries; if you trust the file, pass "
                                                     "--unsafe-pickle (--clip_type)")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "samples").write_text("an earlier file")  # a traceback after sampling, before
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "knn2img.py"), "--config",
                             str(tiny_retrieval_model / "config.yaml"), "--ckpt",
                             str(tiny_retrieval_model / "model.safetensors"), "--outdir", str(tmp_path / "taken")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "holds a file named samples, where the samples go" in error_line(result), result.stderr


def write_database(folder, sizes, features=8, seed=0):
    """A retrieval database in upstream's layout, one .npz file per size; returns its embeddings in
    the order of the files' names (the order the loader joins them in)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    parts = []
    for name, size in zip("dbac", sizes):
        part = rng.standard_normal((size, features)).astype(np.float32)
        np.savez(folder / f"{name}.npz", embedding=part, img_id=np.arange(size), patch_coords=np.zeros((size, 4)))
        parts.append((name, part))
    return np.concatenate([part for _, part in sorted(parts, key=lambda p: p[0])])


def test_a_retrieval_database_in_more_files_than_cpu_cores_loses_nothing(tmp_path):
    """Upstream joined the files of each loader process along the wrong axis: with more files than
    processes it kept one file per process, with files of unequal length it failed."""
    from ldm.util import load_retrieval_database
    expected = write_database(tmp_path / "db", sizes=(3, 5, 2, 4))
    database = load_retrieval_database(tmp_path / "db")
    assert np.array_equal(database["embedding"], expected)
    assert np.array_equal(database["img_id"], np.concatenate([np.arange(n) for n in (2, 5, 4, 3)]))  # a b c d
    with pytest.raises(FileNotFoundError, match="no .npz files in"):
        load_retrieval_database(tmp_path / "nothing")
    np.savez(tmp_path / "db" / "e.npz", img_id=np.arange(2))
    with pytest.raises(ValueError, match=r"e.npz holds the arrays \['img_id'\]; every file of a database"):
        load_retrieval_database(tmp_path / "db")
    (tmp_path / "db" / "e.npz").write_bytes((tmp_path / "db" / "a.npz").read_bytes()[:-30])  # said "pickled data"
    with pytest.raises(ValueError, match=r"e.npz is not an .npz archive \(numpy.savez writes them\), or is cut off"):
        load_retrieval_database(tmp_path / "db")


def test_train_searcher_indexes_every_file_of_a_database(tmp_path):
    expected = write_database(tmp_path / "db", sizes=(3, 5, 2, 4))
    env = dict(os.environ, PYTHONPATH=str(CLIP_STAND_IN))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_searcher.py"), "-d", str(tmp_path / "db"),
                             "-t", str(tmp_path / "searcher"), "--knn", "3"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    indexed = np.load(tmp_path / "searcher" / "database.npy")  # the scann stand-in's serialized index
    assert np.allclose(indexed, expected / np.linalg.norm(expected, axis=1, keepdims=True))


def run_knn2img_with_neighbours(model, cwd, *flags):
    """knn2img --use_neighbors in `cwd` (its databases and searchers are under cwd/data/rdm), with the
    clip and scann stand-ins; CLIP's weights are in cwd/home."""
    (cwd / "home" / ".cache" / "clip").mkdir(parents=True, exist_ok=True)
    (cwd / "home" / ".cache" / "clip" / "ViT-L-14.pt").write_bytes(b"CLIP's weights")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(CLIP_STAND_IN), HOME=str(cwd / "home"))
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "knn2img.py"), "--config", str(model / "config.yaml"),
         "--ckpt", str(model / "model.safetensors"), "--H", "32", "--W", "32", "--ddim_steps", "2",
         "--n_samples", "2", "--outdir", str(cwd / "out"), "--use_neighbors", "--knn", "3", *flags],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_knn2img_retrieves_from_a_small_database_without_a_searcher(tiny_retrieval_model, tmp_path):
    """A database under 20,000 entries gets a brute-force searcher on the fly (upstream's branch for
    it was unreachable: a missing searcher folder was scann's traceback); a larger one needs
    train_searcher.py, which the error line gives."""
    write_database(tmp_path / "data" / "rdm" / "retrieval_databases" / "artbench-surrealism", sizes=(10, 20, 7))
    result = run_knn2img_with_neighbours(tiny_retrieval_model, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded a retrieval database of 37 entries from 3 file(s)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["00000.png", "00001.png"]
    write_database(tmp_path / "data" / "rdm" / "retrieval_databases" / "artbench-baroque", sizes=(20_000,))
    last = error_line(run_knn2img_with_neighbours(tiny_retrieval_model, tmp_path, "--database", "artbench-baroque"),
                      returncode=1)
    assert last == ("error: --database artbench-baroque: no searcher in data/rdm/searchers/artbench-baroque for "
                    "this database of 20000 entries: build it with python3 scripts/train_searcher.py -d "
                    "data/rdm/retrieval_databases/artbench-baroque -t data/rdm/searchers/artbench-baroque"), last


def test_knn2img_without_clip_weights_and_network_is_one_line_before_the_model(tiny_retrieval_model, tmp_path):
    """clip.load downloads missing weights with no timeout (urllib's traceback without network);
    the stand-in's URL is a local port nothing listens on."""
    (tmp_path / "home").mkdir()
    last = error_line(run_knn2img(tiny_retrieval_model, tmp_path / "out", tmp_path / "home"), returncode=1)
    cache = tmp_path / "home" / ".cache" / "clip"
    assert last.startswith(f"error: OpenAI CLIP ViT-L/14 is not in {cache} and http://127.0.0.1:9/models/ViT-L-14.pt "
                           "cannot be reached ("), last
    assert last.endswith("or pass the path of its .pt file instead of 'ViT-L/14' (--clip_type)"), last
    assert not (tmp_path / "out").exists()


def test_a_failed_download_is_reported_and_keeps_the_earlier_zip(tmp_path):
    """Upstream's download scripts ran every line regardless, exited 0 with nothing downloaded, and a
    failed re-run truncated the zip an earlier run had fetched (wget -O writes before it fails).
    wget and unzip are stand-ins here: one download fails halfway, the others succeed."""
    (tmp_path / "scripts").mkdir()
    for name in ("download_lib.sh", "download_first_stages.sh"):
        shutil.copy(REPO / "scripts" / name, tmp_path / "scripts" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wget").write_text('#!/bin/bash\n# wget -O FILE URL\ncase $3 in *kl-f8.zip) printf partial > "$2"; '
                                  'exit 4;; esac\nprintf "zip of %s" "$3" > "$2"\n')
    (bin_dir / "unzip").write_text('#!/bin/bash\n# unzip -o -q ZIP -d FOLDER\ncp "$3" "$5/model.ckpt"\n')
    for tool in ("wget", "unzip"):
        (bin_dir / tool).chmod(0o755)
    earlier = tmp_path / "models" / "first_stage_models" / "kl-f8"
    earlier.mkdir(parents=True)
    (earlier / "model.zip").write_text("an earlier download")
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "download_first_stages.sh")], cwd=REPO,
                            env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: 1 download(s) failed (see above): "
                                                      "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip")
    assert sorted(p.name for p in earlier.iterdir()) == ["model.zip"]
    assert (earlier / "model.zip").read_text() == "an earlier download"
    fetched = tmp_path / "models" / "first_stage_models" / "vq-f16" / "model.ckpt"
    assert fetched.read_text() == "zip of https://ommer-lab.com/files/latent-diffusion/vq-f16.zip"


def test_the_openai_clip_text_encoder_truncates_a_long_prompt(tmp_path, monkeypatch):
    """clip.tokenize raised on a prompt over 77 tokens, in the middle of a knn2img run."""
    monkeypatch.syspath_prepend(str(CLIP_STAND_IN))
    monkeypatch.delitem(sys.modules, "clip", raising=False)
    from ldm.modules.encoders.modules import FrozenCLIPTextEmbedder
    (tmp_path / "ViT-L-14.pt").write_bytes(b"CLIP's weights")
    embedder = FrozenCLIPTextEmbedder(str(tmp_path / "ViT-L-14.pt"), unsafe_pickle=True)  # a file: clip.load runs it
    assert embedder.encode(["a chair " * 60]).shape == (1, 1, 8)
