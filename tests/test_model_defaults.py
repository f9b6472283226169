"""Which model and size txt2img/img2img use when the user does not say: read from the config."""
import argparse
import json
import shutil

import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, load_script
from test_cli import assert_ok, assert_one_line_error, pngs, run
from ldm import model_choice, script_helpers
from ldm.data import procedural
from ldm.data.procedural import KINDS
from ldm.image_io import read_parameters
from ldm.model_choice import (DEFAULT_CONFIGS, EMBEDDED_CONFIG, PRELIMINARY_CONFIG, SD_V1_CONFIG, load_config,
                              read_geometry, resolve_model)


@pytest.mark.parametrize("path, channels, factor, multiple, size, scale, steps", [
    (SD_V1_CONFIG, 4, 8, 64, 512, 1, 50),                   # SD v1: 4 latent channels, 8x VAE
    (EMBEDDED_CONFIG, 3, 1, 8, 32, 8, 50),                  # pixel space, identity first stage
    (PRELIMINARY_CONFIG, 3, 1, 8, 16, 16, 20),             # its preliminary CPU-trained stand-in
    ("configs/stable-diffusion/v1-tiny.yaml", 4, 8, 64, 512, 1, 50),  # no sampling block: upstream defaults
])
def test_geometry_is_read_from_the_model_definition(path, channels, factor, multiple, size, scale, steps):
    geometry = read_geometry(load_config(REPO / path))
    assert (geometry.channels, geometry.factor, geometry.multiple) == (channels, factor, multiple)
    assert (geometry.height, geometry.width, geometry.display_scale) == (size, size, scale)
    assert geometry.steps == steps


@pytest.mark.parametrize("path, not_text", [
    (SD_V1_CONFIG, None), (EMBEDDED_CONFIG, None), ("configs/latent-diffusion/txt2img-1p4B-eval.yaml", None),
    ("configs/latent-diffusion/cin256-v2.yaml", "a model conditioned on class labels"),
    ("models/ldm/celeba256/config.yaml", "an unconditional model (scripts/sample_diffusion.py samples those)"),
    ("models/ldm/inpainting_big/config.yaml", "a model conditioned on a masked image (scripts/inpaint.py runs it)"),
    ("models/ldm/semantic_synthesis256/config.yaml", "a model conditioned on segmentation maps"),
])
def test_which_configs_are_text_to_image_models(path, not_text):
    # upstream's txt2img fed the prompts to a class embedder or to nothing: a traceback at sampling
    assert read_geometry(load_config(REPO / path)).not_text == not_text


@pytest.mark.parametrize("path, kinds", [
    (EMBEDDED_CONFIG, KINDS), (PRELIMINARY_CONFIG, KINDS), (SD_V1_CONFIG, None),
    ("configs/stable-diffusion/v1-tiny.yaml", None),
    ("configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml", None),  # a training dataset, but no text model
])
def test_the_training_vocabulary_is_read_where_the_config_can_list_it(path, kinds):
    vocabulary = read_geometry(load_config(REPO / path)).vocabulary
    assert vocabulary == (None if kinds is None else frozenset(procedural.vocabulary(kinds)))


def test_prompt_words_outside_the_training_vocabulary_are_named_once(caplog):
    geometry = read_geometry(load_config(REPO / PRELIMINARY_CONFIG))
    warn = lambda *texts: script_helpers.warn_unseen_words(geometry, PRELIMINARY_CONFIG, list(texts))  # noqa: E731
    warn("a photo of a Wooden chair", "a photo of a red chair", "a chair", "blurry, a circle")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "'photo', 'of', 'wooden', 'blurry', 'circle':" in warnings[0]  # the 16 px model saw no shapes
    assert f"only the {len(geometry.vocabulary)} words" in warnings[0] and PRELIMINARY_CONFIG in warnings[0]
    caplog.clear()
    warn("A red chair, on the left", "")
    assert not caplog.records
    warn(" ".join("abcdefghij"), "blurry, a circle")
    assert "'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i' and 3 more:" in caplog.text  # 'a' is a known word


def options(**given):
    defaults = dict(config=None, ckpt=None, random_weights=False, C=None, f=None, H=None, W=None, display_scale=None,
                    scale=None, default_scale=7.5, ddim_steps=None, vae=None)
    return argparse.Namespace(**{**defaults, **given})


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A checkout with the default configs and no weights: the working folder, and the repository
    relative paths fall back to (model_choice.in_repo)."""
    for path in DEFAULT_CONFIGS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, tmp_path / path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_choice, "REPO_ROOT", str(tmp_path))
    return tmp_path


def no_tensors(path):
    """A whole checkpoint file holding no tensors at `path`: where weights stand, for what is decided
    before any are read (an empty file is refused there as cut off)."""
    import torch
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({}, path) if path.suffix == ".safetensors" else torch.save({}, path)
    return path


def put_weights(workdir, config):
    return no_tensors(workdir / read_geometry(load_config(config)).weights)


def test_without_any_weights_the_error_says_every_way_out(workdir):
    with pytest.raises(ValueError, match="no model weights found") as error:
        resolve_model(Parser(), options())
    for fragment in ("models/ldm/stable-diffusion-v1/model.ckpt", "--ckpt", "models/embedded/README.md",
                     "models/embedded/procedural-t2i.safetensors", "--random-weights"):
        assert fragment in str(error.value)


def test_the_embedded_model_runs_when_no_sd_weights_are_in_place(workdir):
    put_weights(workdir, EMBEDDED_CONFIG)
    opt = options()
    resolve_model(Parser(), opt)
    assert (opt.config, opt.ckpt) == (EMBEDDED_CONFIG, "models/embedded/procedural-t2i.safetensors")
    assert (opt.C, opt.f, opt.H, opt.W, opt.display_scale, opt.scale) == (3, 1, 32, 32, 8, 5.0)
    given = options(scale=3.0)
    resolve_model(Parser(), given)
    assert given.scale == 3.0  # a given --scale wins over the config's


def test_the_preliminary_model_runs_when_nothing_better_is_in_place_and_says_so(workdir, caplog):
    put_weights(workdir, PRELIMINARY_CONFIG)
    opt = options()
    resolve_model(Parser(), opt)
    assert (opt.config, opt.ckpt) == (PRELIMINARY_CONFIG, "models/embedded/procedural-t2i-16px.safetensors")
    assert (opt.H, opt.W, opt.display_scale, opt.ddim_steps) == (16, 16, 16, 20)
    assert "preliminary 16 px model" in caplog.text
    caplog.clear()
    put_weights(workdir, EMBEDDED_CONFIG)  # the 32 px model, once trained, wins over its stand-in
    resolve_model(Parser(), winner := options())
    assert winner.config == EMBEDDED_CONFIG and "preliminary" not in caplog.text


def test_a_fresh_clones_first_command_runs_a_trained_model(tmp_path):
    """README's first command, without --config/--ckpt: the first default whose weights are in the
    checkout (in a fresh clone, the preliminary 16 px model, whose weights are committed)."""
    expected = next(path for path in DEFAULT_CONFIGS
                    if (REPO / read_geometry(load_config(REPO / path)).weights).is_file())
    result = run("txt2img.py", "--prompt", "a chair", "--consistent-attn", "--n_samples", "2", "--n_iter", "1",
                 "--ddim_steps", "2", "--skip_grid", "--outdir", tmp_path)
    assert_ok(result)
    meta = read_parameters(tmp_path / "samples" / "00000.png")
    assert meta["config"] == expected and meta["ckpt"] != ""
    assert meta["eta"] == read_geometry(load_config(REPO / expected)).eta  # the model's own default
    assert ("preliminary 16 px model" in result.stderr) == (expected == PRELIMINARY_CONFIG)


def test_a_link_at_a_default_weights_path_that_points_nowhere_is_one_error_line(workdir):
    """README's `ln -s /path/to/sd-v1-4.ckpt models/ldm/stable-diffusion-v1/model.ckpt` with a
    wrong path ran the 16 px stand-in instead, with a warning that there were no SD weights."""
    put_weights(workdir, PRELIMINARY_CONFIG)
    link = workdir / "models/ldm/stable-diffusion-v1/model.ckpt"
    link.parent.mkdir(parents=True)
    link.symlink_to(workdir / "nowhere" / "sd-v1-4.ckpt")
    with pytest.raises(ValueError, match=r"model.ckpt is a link to .*nowhere/sd-v1-4.ckpt, which does not exist: "
                                         r"point it at the weights"):
        resolve_model(Parser(), options())
    link.unlink()
    link.symlink_to(no_tensors(workdir / "elsewhere" / "sd-v1-4.ckpt"))  # fixed: SD v1 runs, as upstream
    resolve_model(Parser(), opt := options())
    assert opt.config == SD_V1_CONFIG


@pytest.mark.parametrize("link_in", ["working folder", "repository"])
def test_the_working_folders_weights_path_decides_before_the_repositorys(workdir, tmp_path_factory, monkeypatch,
                                                                         link_in):
    """A link to nothing stops the run only where it is the file the run would read: the working
    folder's path when that exists (as a file or a link), else the repository's."""
    repository, elsewhere = workdir, tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    weights = "models/ldm/stable-diffusion-v1/model.ckpt"
    broken, good = (elsewhere, repository) if link_in == "working folder" else (repository, elsewhere)
    (broken / weights).parent.mkdir(parents=True)
    (broken / weights).symlink_to(broken / "nowhere.ckpt")
    no_tensors(good / weights)
    if link_in == "working folder":
        with pytest.raises(ValueError, match=rf"^{weights} is a link to .*nowhere.ckpt, which does not exist"):
            resolve_model(Parser(), options())
    else:
        resolve_model(Parser(), opt := options())
        assert (opt.config, opt.ckpt) == (str(repository / SD_V1_CONFIG), weights)


def test_sd_weights_at_upstreams_path_win_and_keep_upstream_defaults(workdir):
    put_weights(workdir, EMBEDDED_CONFIG)
    put_weights(workdir, SD_V1_CONFIG)
    opt = options(H=768)
    resolve_model(Parser(), opt)
    assert (opt.config, opt.ckpt) == (SD_V1_CONFIG, "models/ldm/stable-diffusion-v1/model.ckpt")
    assert (opt.C, opt.f, opt.H, opt.W, opt.display_scale) == (4, 8, 768, 512, 1)  # a given --H wins
    assert opt.scale == 7.5  # SD v1's config names no scale: the script's default, as upstream
    assert opt.ddim_steps == 50  # nor steps: upstream's 50


def test_a_ckpt_given_alone_runs_with_the_config_that_names_it_else_sd_v1s(workdir):
    """`--ckpt models/embedded/procedural-t2i-16px.safetensors` (as the model card's commands pass
    it) needs no --config; upstream built SD v1 for it (860 M parameters) and then failed."""
    shipped = put_weights(workdir, PRELIMINARY_CONFIG)
    for given in (str(shipped), "models/embedded/procedural-t2i-16px.safetensors"):
        resolve_model(Parser(), opt := options(ckpt=given))
        assert opt.config.endswith(PRELIMINARY_CONFIG) and (opt.H, opt.ddim_steps) == (16, 20)
    other = no_tensors(workdir / "sd-v1-4.safetensors")
    resolve_model(Parser(), opt := options(ckpt=str(other)))
    assert opt.config.endswith(SD_V1_CONFIG) and opt.H == 512


def test_a_copy_of_a_shipped_models_weights_runs_with_its_config_as_they_do(workdir):
    """The shipped 16 px weights copied elsewhere (or any checkpoint of the same tensors) were built
    as SD v1 and failed with "lacks 314 weights"; the tensors' names and shapes, read from the
    files' indexes (a safetensors header, a torch.save zip's pickle), tell that its config fits
    them, EMA copies aside (a training checkpoint moved out of its run). Other tensors, or torch's
    format before 1.6, are still SD v1's; weights in a main.py run keep the run's config (its
    overrides, which no tensor shape shows)."""
    import torch
    from safetensors.torch import save_file
    shipped = {"unet.w": torch.zeros(2, 3), "vae.b": torch.zeros(4)}
    save_file(shipped, put_weights(workdir, PRELIMINARY_CONFIG))
    save_file({key: t + 1 for key, t in shipped.items()}, copy := workdir / "mine.safetensors")  # fine-tuned, say
    save_file({**shipped, "unet.w": torch.ones(2, 4)}, other := workdir / "other.safetensors")
    torch.save(shipped, pickled := workdir / "mine.ckpt")
    torch.save({"state_dict": {**shipped, "model_ema.unetw": torch.zeros(2, 3)}, "global_step": 9100,
                "optimizer_states": [{"lr": 1e-4}]}, moved := workdir / "last.ckpt")
    torch.save(shipped, legacy := workdir / "legacy.ckpt", _use_new_zipfile_serialization=False)
    run = workdir / "logs" / "2026-12-06T09-00-00_procedural-t2i-16px"  # a main.py run's own config wins
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.load(REPO / PRELIMINARY_CONFIG), project := run / "configs" / "2026-12-06-project.yaml")
    save_file(shipped, trained := run / "checkpoints" / "last.safetensors")
    expected = {copy: PRELIMINARY_CONFIG, other: SD_V1_CONFIG, pickled: PRELIMINARY_CONFIG, moved: PRELIMINARY_CONFIG,
                legacy: SD_V1_CONFIG, trained: str(project)}
    for ckpt, config in expected.items():
        resolve_model(Parser(), opt := options(ckpt=str(ckpt)))
        assert opt.config.endswith(config), ckpt


def test_a_ckpt_of_a_main_py_run_samples_with_the_runs_newest_config(workdir):
    """`--ckpt logs/RUN/checkpoints/last.ckpt` of a model trained with main.py: upstream built SD v1
    for it and failed on its weights; the run keeps its config (a resumed run one per start)."""
    run = workdir / "logs" / "2026-12-06T05-32-36_procedural-t2i-16px"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    no_tensors(run / "checkpoints" / "last.ckpt")
    for started in ("2026-12-06T05-32-36", "2026-12-06T07-00-00"):  # the first start, then a --resume
        config = OmegaConf.load(REPO / PRELIMINARY_CONFIG)
        config.sampling.steps = 20 if started.endswith("36") else 30
        OmegaConf.save(config, run / "configs" / f"{started}-project.yaml")
    (run / "configs" / "2026-12-06T07-00-00-lightning.yaml").write_text("lightning: {}\n")
    resolve_model(Parser(), opt := options(ckpt=f"logs/{run.name}/checkpoints/last.ckpt"))
    assert opt.config == f"logs/{run.name}/configs/2026-12-06T07-00-00-project.yaml"
    assert (opt.H, opt.ddim_steps) == (16, 30)
    # weights exported from it (scripts/export_checkpoint.py), whose sidecar names the run's checkpoint
    no_tensors(workdir / "exported.safetensors")
    (workdir / "exported.json").write_text(json.dumps({"source": str(run / "checkpoints" / "last.ckpt")}))
    resolve_model(Parser(), opt := options(ckpt="exported.safetensors"))
    assert opt.config == str(run / "configs" / "2026-12-06T07-00-00-project.yaml")
    (run / "checkpoints" / "last.ckpt").rename(run / "last.ckpt")  # not in a run's checkpoints/: SD v1
    for ckpt in (str(run / "last.ckpt"), "exported.safetensors"):  # nor is the exported file's source now
        resolve_model(Parser(), opt := options(ckpt=ckpt))
        assert opt.config.endswith(SD_V1_CONFIG)


def test_a_diffusers_folder_linked_at_upstreams_path_is_found_and_checked(workdir):
    """`ln -s ~/sd-v1-4-diffusers models/ldm/stable-diffusion-v1/model.ckpt`: the default search
    takes the folder as it takes a file, and a folder that is no pipeline is one error line."""
    put_weights(workdir, EMBEDDED_CONFIG)
    folder = workdir / read_geometry(load_config(SD_V1_CONFIG)).weights
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="model.ckpt is a folder without unet/"):
        resolve_model(Parser(), options())
    for part, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        (folder / part).mkdir()
        (folder / part / f"{file}.safetensors").write_bytes(b"")
    resolve_model(Parser(), opt := options())
    assert (opt.config, opt.ckpt) == (SD_V1_CONFIG, "models/ldm/stable-diffusion-v1/model.ckpt")


def test_a_config_that_names_its_steps_sets_the_default_and_a_given_flag_wins():
    config = "configs/embedded/procedural-t2i-16px.yaml"
    opt = options(config=config, random_weights=True)
    resolve_model(Parser(), opt)
    assert opt.ddim_steps == 20
    given = options(config=config, random_weights=True, ddim_steps=7)
    resolve_model(Parser(), given)
    assert given.ddim_steps == 7


def validated_txt2img(tmp_path, *argv):
    txt2img = load_script("txt2img")
    parser = txt2img.build_parser()
    opt = parser.parse_args(["--random-weights", "--outdir", str(tmp_path), *argv])
    return txt2img.validate_options(parser, opt)


def test_a_config_that_names_its_eta_sets_the_ddim_default_and_a_given_flag_wins(tmp_path, caplog):
    config = ["--config", PRELIMINARY_CONFIG]
    assert validated_txt2img(tmp_path, *config).ddim_eta == 1.0
    assert "speckled" not in caplog.text
    # upstream's commands often give --ddim_eta 0.0: honoured, with the same word of warning
    assert validated_txt2img(tmp_path, *config, "--ddim_eta", "0").ddim_eta == 0.0
    assert "ddim eta 1: --ddim_eta 0 draws no step noise and can leave its images speckled" in caplog.text
    caplog.clear()
    validated_txt2img(tmp_path, *config, "--sampler", "plms", "--ddim_eta", "0")  # the sampler is the cause
    assert "--sampler plms draws no step noise" in caplog.text and "--ddim_eta 0 draws" not in caplog.text
    caplog.clear()
    # plms and dpm draw no step noise: the config's eta is not theirs, and not an error either,
    # but the user hears that this model samples cleanly only with ddim
    assert validated_txt2img(tmp_path, *config, "--sampler", "plms").ddim_eta == 0.0
    assert "ddim eta 1: --sampler plms draws no step noise and can leave its images speckled" in caplog.text
    caplog.clear()
    assert validated_txt2img(tmp_path, "--config", SD_V1_CONFIG, "--plms").ddim_eta == 0.0  # upstream's 0
    assert "speckled" not in caplog.text  # SD names no eta: nothing to warn about
    bad = load_config(REPO / PRELIMINARY_CONFIG)
    bad.sampling.eta = 1.5
    with pytest.raises(ValueError, match="sampling.eta must be between 0 and 1, got 1.5"):
        read_geometry(bad)


def test_random_weights_without_config_build_sd_v1_as_upstream(workdir):
    opt = options(random_weights=True)
    resolve_model(Parser(), opt)
    assert opt.config == SD_V1_CONFIG and (opt.C, opt.f) == (4, 8)


def test_a_latent_shape_flag_that_contradicts_the_model_is_an_error(workdir):
    with pytest.raises(ValueError, match="--C 4 does not match the model: .* has --C 3"):
        resolve_model(Parser(), options(config=EMBEDDED_CONFIG, random_weights=True, C=4))
    opt = options(config=EMBEDDED_CONFIG, random_weights=True, C=3, f=1)  # upstream habit: stating them
    resolve_model(Parser(), opt)
    assert (opt.C, opt.f) == (3, 1)


def test_txt2img_runs_the_embedded_config_at_its_native_size(tmp_path):
    """No --H/--W/--C/--f: 32x32 pixel-space images, saved 8x upscaled for viewing."""
    result = run("txt2img.py", "--config", EMBEDDED_CONFIG, "--random-weights", "--n_samples", "2", "--n_iter", "1",
                 "--ddim_steps", "2", "--skip_grid", "--outdir", tmp_path, "--prompt", "a red chair")
    assert_ok(result)
    assert "learnt nothing" not in result.stderr  # every word of the prompt is a caption word
    assert pngs(tmp_path) == ["samples/00000.png", "samples/00001.png"]
    assert Image.open(tmp_path / "samples" / "00000.png").size == (256, 256)
    meta = read_parameters(tmp_path / "samples" / "00000.png")
    assert meta["H"] == meta["W"] == 32 and meta["config"] == EMBEDDED_CONFIG


def test_txt2img_size_check_uses_the_models_multiple(tmp_path):
    result = run("txt2img.py", "--config", EMBEDDED_CONFIG, "--random-weights", "--H", "37", "--outdir", tmp_path)
    assert_one_line_error(result, "--H must be a positive multiple of 8", "nearest valid size: 40")
    assert not any(tmp_path.iterdir())


def test_img2img_crops_to_the_models_multiple(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (45, 40), (200, 40, 40)).save(init)  # pixel-space model: cropped to 40x40, not 0x0
    out = tmp_path / "out"
    result = run("img2img.py", "--config", EMBEDDED_CONFIG, "--random-weights", "--init-img", init, "--display-scale",
                 "1", "--n_samples", "1", "--ddim_steps", "2", "--strength", "0.5", "--outdir", out, "--skip_grid")
    assert_ok(result)
    assert Image.open(out / "samples" / "00000.png").size == (40, 40)
    # upstream's default prompt, which the embedded models have no words for
    assert "learnt nothing for the prompt word(s) 'painting', 'of', 'virus', 'monster'" in result.stderr


def test_img2img_reads_the_small_models_enlarged_pngs_at_the_models_size(tmp_path):
    """txt2img saves the 16 px model's images 16x enlarged; img2img takes such a PNG back at
    16x16 (it ran the model on all 256x256 pixels, for many minutes) and saves its result
    enlarged again. A PNG too small for that is one error line that says why."""
    common = ["--config", PRELIMINARY_CONFIG, "--random-weights", "--n_samples", "1", "--n_iter", "1",
              "--ddim_steps", "2", "--skip_grid"]
    assert_ok(run("txt2img.py", *common, "--outdir", tmp_path / "made"))
    made = tmp_path / "made" / "samples" / "00000.png"
    assert Image.open(made).size == (256, 256)
    result = run("img2img.py", *common, "--init-img", made, "--strength", "0.5", "--outdir", tmp_path / "varied")
    assert_ok(result)
    assert "read at (16, 16)" in result.stderr
    assert Image.open(tmp_path / "varied" / "samples" / "00000.png").size == (256, 256)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    result = run("img2img.py", *common, "--init-img", small, "--outdir", tmp_path / "none")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "img2img.py: error: --init-img must be at least 128x128 pixels: the model reads it shrunk 16x, its display scale, "
        "and needs 8x8 (--display-scale 1 reads it pixel for pixel)")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_a_config_without_a_unet_is_one_error_line(tmp_path):
    result = run("txt2img.py", "--config", "configs/autoencoder/autoencoder_kl_32x32x4.yaml", "--random-weights",
                 "--outdir", tmp_path)
    assert_one_line_error(result, "is not a diffusion model config", SD_V1_CONFIG)


def test_a_hub_text_encoder_offline_is_one_error_line(tmp_path):
    config = tmp_path / "hub.yaml"
    hub = OmegaConf.load(REPO / "configs/stable-diffusion/v1-tiny.yaml")
    hub.model.params.cond_stage_config.params = {"version": "openai/clip-vit-base-patch32"}
    OmegaConf.save(hub, config)
    result = run("txt2img.py", "--config", config, "--random-weights", "--H", "64", "--W", "64",
                 "--outdir", tmp_path / "out")
    assert_one_line_error(result, "Cannot load text encoder: 'openai/clip-vit-base-patch32' is neither a local folder "
                                  "nor in the Hugging Face cache", "the hub is switched off (HF_HUB_OFFLINE)")
    hub.model.params.cond_stage_config.params = {"version": "openai/clip-vit-base-patch32",
                                                  "text_config": {"hidden_size": 32}}
    OmegaConf.save(hub, config)
    result = run("txt2img.py", "--config", config, "--random-weights", "--H", "64", "--W", "64",
                 "--outdir", tmp_path / "out")
    assert_one_line_error(result, "text_config is only used with version='openai/clip-vit-large-patch14'")


def test_laion400m_with_random_weights_takes_its_config_and_no_checkpoint(tmp_path):
    """--laion400m filled in its checkpoint before the --ckpt/--random-weights check, which then
    named a flag the user had not given."""
    opt = validated_txt2img(tmp_path, "--laion400m", "--H", "64", "--W", "64")
    assert opt.config.endswith("configs/latent-diffusion/txt2img-1p4B-eval.yaml") and opt.ckpt is None


def test_an_empty_path_is_not_read_as_the_repositorys_root():
    from ldm.model_choice import in_repo
    assert in_repo("") == ""  # was the repository's folder: `--init-img ""` then named a folder never given
