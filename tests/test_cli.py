"""The txt2img/img2img scripts as a user runs them: subprocesses on the tiny config."""
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_CONFIG, interrupt_script_when, load_script, write_flagging_safety_checker
from ldm.image_io import read_parameters
from ldm.outputs import ctrl_c_deferred
from ldm.script_helpers import computed_precision, precision_context

TINY = ["--config", str(TINY_CONFIG), "--random-weights", "--H", "64", "--W", "64",
        "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "3"]


def run(script, *args, cwd=REPO):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the script imports this checkout's ldm itself
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def txt2img():
    return load_script("txt2img")


def pngs(outdir):
    return sorted(p.relative_to(outdir).as_posix() for p in outdir.rglob("*.png"))


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_txt2img_each_sampler_writes_images_with_metadata(tmp_path, sampler):
    assert_ok(run("txt2img.py", *TINY, "--sampler", sampler, "--outdir", tmp_path, "--prompt", "a red chair"))
    assert pngs(tmp_path) == ["grid-0000.png", "samples/00000.png", "samples/00001.png"]
    meta = read_parameters(tmp_path / "samples" / "00001.png")
    assert meta["sampler"] == sampler and meta["prompt"] == "a red chair" and meta["steps"] == 3
    assert meta["H"] == meta["W"] == 64 and meta["seed"] == 42 and meta["random_weights"] is True
    assert read_parameters(tmp_path / "grid-0000.png")["sampler"] == sampler
    assert Image.open(tmp_path / "samples" / "00000.png").size == (64, 64)


def test_txt2img_ddim_second_run_does_not_overwrite_and_is_reproducible(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00007.png").write_bytes(b"not mine")  # a gap: numbering goes past it
    for _ in range(2):
        assert_ok(run("txt2img.py", *TINY, "--sampler", "ddim", "--outdir", tmp_path, "--display-scale", "2"))
    assert pngs(tmp_path) == ["grid-0000.png", "grid-0001.png", "samples/00007.png", "samples/00008.png",
                              "samples/00009.png", "samples/00010.png", "samples/00011.png"]
    assert (tmp_path / "samples" / "00007.png").read_bytes() == b"not mine"
    samples = tmp_path / "samples"
    # same seed -> identical PNG bytes (pixels and metadata)
    assert (samples / "00008.png").read_bytes() == (samples / "00010.png").read_bytes()
    assert (samples / "00009.png").read_bytes() == (samples / "00011.png").read_bytes()
    assert Image.open(samples / "00008.png").size == (128, 128)  # --display-scale 2
    assert read_parameters(samples / "00008.png")["sampler"] == "ddim"


def test_step_noise_follows_from_the_seed_not_from_how_the_weights_were_loaded(txt2img, tmp_path, monkeypatch):
    """At DDIM eta 1 (the shipped 16 px model's config) every step draws noise. Loading into
    placeholders draws no random numbers, building the ordinary way draws millions: the images
    must not depend on it. Nor may the step noise restart the start noise's stream (same seed,
    same CPU generator), which left these images speckled (pixel noise 0.045 instead of 0.012)."""
    import contextlib

    import ldm.checkpoints
    from ldm.data.procedural import pixel_noise
    common = ["--config", "configs/embedded/procedural-t2i-16px.yaml", "--prompt", "a chair", "--n_samples", "4",
              "--n_iter", "1", "--ddim_steps", "10", "--skip_grid"]
    monkeypatch.chdir(REPO)
    placeholders = txt2img.main([*common, "--outdir", str(tmp_path / "placeholders")])
    monkeypatch.setattr(ldm.checkpoints, "parameters_as_placeholders", contextlib.nullcontext)
    built = txt2img.main([*common, "--outdir", str(tmp_path / "built")])
    assert [Path(p).read_bytes() for p in placeholders] == [Path(p).read_bytes() for p in built]
    assert pixel_noise([np.array(Image.open(p))[::16, ::16] for p in placeholders]) < 0.03


def test_img2img_runs_on_a_generated_png(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (70, 64), (200, 40, 40)).save(init)  # 70 wide: cropped to 64
    out = tmp_path / "out"
    assert_ok(run("img2img.py", "--config", TINY_CONFIG, "--random-weights", "--init-img", init,
                  "--n_samples", "2", "--steps", "4", "--strength", "0.5", "--outdir", out))  # = --ddim_steps
    assert pngs(out) == ["grid-0000.png", "samples/00000.png", "samples/00001.png"]
    meta = read_parameters(out / "samples" / "00000.png")
    assert meta["extra"]["strength"] == 0.5 and meta["sampler"] == "ddim" and (meta["H"], meta["W"]) == (64, 64)
    assert meta["steps"] == 4


@pytest.mark.parametrize("args, fragments", [
    (["--H", "100"], ["--H must be a positive multiple of 64", "nearest valid size: 128"]),
    (["--W", "0"], ["--W must be a positive multiple of 64"]),
    (["--n_samples", "0"], ["argument --n_samples: must be at least 1, got 0"]),
    (["--ddim_steps", "0"], ["argument --ddim_steps/--steps: must be at least 1, got 0"]),
    (["--n_samples", "0", "--consistent-attn"], ["argument --n_samples: must be at least 1"]),  # named --share-anchors
    (["--plms", "--sampler", "dpm"], ["--plms contradicts --sampler dpm"]),
    (["--plms", "--dpm_solver"], ["contradict"]),
    (["--sampler", "dpm", "--ddim_steps", "1"], ["--sampler dpm needs --ddim_steps 2 or more"]),
    (["--plms", "--ddim_eta", "0.5"], ["--sampler plms is deterministic", "--ddim_eta"]),
    (["--config", "configs/nope.yaml"], ["config not found: configs/nope.yaml", "--config"]),
    # checked before the model loads, instead of a traceback after it or black images
    (["--ddim_steps", "1000"], ["--ddim_steps must be below the model's 1000 training timesteps"]),
    (["--ddim_eta", "5"], ["--ddim_eta must be between 0", "got 5.0"]),
    (["--scale", "nan"], ["--scale must be a finite number"]),
    (["--seed", str(2**32)], ["--seed must be between 0 and 4294967295"]),
    (["--from-file", "configs"], ["--from-file configs: a folder"]),
    (["--outdir", "README.md"], ["--outdir README.md is a file, not a folder"]),
    (["--outdir"], ["--outdir needs a folder"]),
    (["--vae", "missing.safetensors"], ["--vae missing.safetensors not found"]),
    (["--vae", "README.md", "--config", "configs/embedded/procedural-t2i-16px.yaml"],
     ["--vae: configs/embedded/procedural-t2i-16px.yaml samples in pixel space, with no autoencoder to replace"]),
    (["--vae", "README.md"], ["--vae: Unsupported checkpoint type '.md' for", "expected one of .safetensors"]),
    (["--write-reference", "README.md/ref.safetensors"], ["--write-reference", "is a file, not a folder"]),
])
def test_txt2img_bad_input_is_one_error_line(txt2img, tmp_path, monkeypatch, capsys, args, fragments):
    """In-process: these checks end the run before any model is built, so a subprocess per case
    would only time imports (the tests around this one run the real command)."""
    monkeypatch.chdir(REPO)  # the cases name repository files by relative path, as a user would
    parser = txt2img.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        txt2img.validate_options(parser, parser.parse_args([*map(str, TINY), "--outdir", str(tmp_path), *args]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), errors
    assert not any(tmp_path.iterdir())


def test_one_ddim_step_is_a_warning_that_the_images_stay_noise(txt2img, tmp_path, caplog):
    """Upstream's single step is at timestep 1 (sqrt(1 - alpha_bar_1) = 0.04 on SD v1's schedule): the
    sample barely differs from its start noise."""
    parser = txt2img.build_parser()
    for steps in (1, 2):
        caplog.clear()
        txt2img.validate_options(parser, parser.parse_args([*map(str, TINY), "--ddim_steps", str(steps),
                                                            "--outdir", str(tmp_path / str(steps))]))
        warned = [r.getMessage() for r in caplog.records if "--ddim_steps 1" in r.getMessage()]
        assert warned == ([] if steps == 2 else ["--ddim_steps 1 takes its one step at timestep 1 of 1000, where the "
                                                 "start noise counts as an almost finished image: the images are "
                                                 "that noise; take 2 or more"])


def test_img2img_with_one_ddim_step_warns_that_the_init_image_stays(tmp_path, caplog):
    """At any --strength the one step noises to timestep 1 only (sqrt(alpha_bar_1) = 0.999): the
    help's "1.0: full destruction of the init image" did not hold, silently."""
    img2img = load_script("img2img")
    parser = img2img.build_parser()
    for steps in (1, 2):
        caplog.clear()
        img2img.validate_options(parser, parser.parse_args(["--config", str(TINY_CONFIG), "--random-weights",
                                                            "--init-img", "docs/reference-chair.png",
                                                            "--strength", "1", "--ddim_steps", str(steps),
                                                            "--outdir", str(tmp_path / str(steps))]))
        warned = [r.getMessage() for r in caplog.records if "--ddim_steps 1" in r.getMessage()]
        assert warned == ([] if steps == 2 else ["--ddim_steps 1 noises the init image to timestep 1 of 1000 only, "
                                                 "whatever --strength: the images are the init image almost "
                                                 "unchanged; take more (strength 1 noises to the last of their "
                                                 "timesteps)"])


def test_images_far_above_the_models_size_are_a_warning(txt2img, tmp_path, caplog):
    """On the 16 px model: 40x40 is 6x its pixels (warned, with the fix), 32x32 4x (not); img2img
    reads a 48x48 image pixel for pixel with --display-scale 1 (9x, warned), at 16x16 with 3."""
    config = REPO / "configs/embedded/procedural-t2i-16px.yaml"
    parser = txt2img.build_parser()

    def warnings():
        return [r.getMessage() for r in caplog.records if "the pixels of this model's 16x16" in r.getMessage()]

    for size, expected in ((32, []), (40, ["--H/--W give images of 40x40, 6x the pixels of this model's 16x16: each "
                                           "sampling step costs at least that much more, and far above its own size "
                                           "a model tends to repeat its subjects; take a smaller --H/--W"])):
        caplog.clear()
        txt2img.validate_options(parser, parser.parse_args(["--config", str(config), "--H", str(size), "--W", str(size),
                                                            "--outdir", str(tmp_path / str(size))]))
        assert warnings() == expected
    Image.new("RGB", (48, 48), (200, 40, 40)).save(tmp_path / "init.png")
    img2img = load_script("img2img")
    shrink = "shrink the image, or read it at the model's --display-scale 16"
    for extra, expected in ((["--display-scale", "3"], []), (["--display-scale", "1"], [shrink])):
        caplog.clear()
        img2img.main([str(a) for a in ["--config", config, "--init-img", tmp_path / "init.png", "--n_samples", "1",
                                       "--ddim_steps", "2", "--skip_grid", "--outdir", tmp_path / "img2img", *extra]])
        assert [w.split("; ")[-1] for w in warnings()] == expected


def test_txt2img_vae_decodes_with_the_given_autoencoder_and_records_it(txt2img, tmp_path):
    """In-process. The tiny model with random weights: the same latents, decoded by another
    autoencoder, are other pixels; the PNG names the file."""
    from omegaconf import OmegaConf
    from ldm.checkpoints import save_safetensors
    from ldm.util import instantiate_from_config
    torch.manual_seed(1)
    other = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model).first_stage_model
    save_safetensors({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "vae.safetensors")
    common = [*map(str, TINY), "--n_samples", "1", "--skip_grid"]
    plain = txt2img.main([*common, "--outdir", str(tmp_path / "plain")])
    swapped = txt2img.main([*common, "--outdir", str(tmp_path / "vae"), "--vae", str(tmp_path / "vae.safetensors")])
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(swapped[0])))
    assert read_parameters(swapped[0])["vae"] == str(tmp_path / "vae.safetensors")
    assert "vae" not in read_parameters(plain[0])


def test_txt2img_skip_grid_and_skip_save_write_nothing_and_say_why(txt2img, tmp_path, caplog):
    """Upstream's flags, kept: --n_rows only lays out the grid, so with --skip_grid it is named as
    having no effect, and a run that saves nothing says which flags asked for that."""
    caplog.set_level("INFO")
    paths = txt2img.main([*map(str, TINY), "--outdir", str(tmp_path), "--skip_grid", "--skip_save", "--n_rows", "1"])
    assert paths == [] and pngs(tmp_path) == []
    assert "--n_rows 1 lays out the grid, which --skip_grid leaves out" in caplog.text
    assert "no files written: --skip_save and --skip_grid" in caplog.text


def test_a_file_where_the_samples_go_is_one_error_line_before_loading_and_no_matter_with_skip_save(txt2img, tmp_path):
    """OutputWriter made outdir/samples after the model had loaded: a file of that name was a
    traceback then, even under --skip_save, which writes no sample."""
    (tmp_path / "samples").write_text("an earlier file")
    result = run("txt2img.py", *TINY, "--outdir", tmp_path, "--n_samples", "1", "--n_iter", "1")
    assert_one_line_error(result, f"--outdir {tmp_path} holds a file named samples, where the samples go: move it, "
                                  "or pass another --outdir")
    assert "Loading model" not in result.stderr
    assert txt2img.main([*map(str, TINY), "--outdir", str(tmp_path), "--n_samples", "1", "--skip_save"])
    assert pngs(tmp_path) == ["grid-0000.png"] and (tmp_path / "samples").read_text() == "an earlier file"


def test_txt2img_prompt_file_that_is_not_text_is_one_error_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(bytes(range(128, 256)))
    assert_one_line_error(run("txt2img.py", *TINY, "--outdir", tmp_path / "out", "--from-file", prompts),
                          "is not UTF-8 text")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, args, message", [
    ("txt2img.py", ["--scale", "nan"], "--scale must be a finite number"),
    ("img2img.py", ["--init-img", "docs/reference-chair.png", "--strength", "1.5"], "--strength must be in (0.0, 1.0]"),
    ("img2img.py", ["--init-img", "docs/reference-chair.png", "--strength", "0"],
     "--strength must be in (0.0, 1.0], got 0.0 (0 would return the init image unchanged)"),
])
def test_bad_input_after_a_warning_is_the_error_line_alone(tmp_path, script, args, message):
    """--n_rows with --skip_grid is warned about while the input is checked; when a later check
    fails, stderr is the error line alone: the warning was about a run that does not happen (and in
    a fresh clone the warning that the stand-in model runs would precede every error)."""
    result = run(script, "--config", "configs/embedded/procedural-t2i-16px.yaml", "--n_rows", 2, "--skip_grid",
                 *args, "--outdir", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: {message}"), lines
    assert not (tmp_path / "out").exists()


def test_checking_replays_what_it_held_once_the_checks_pass(caplog):
    from ldm.script_helpers import ArgumentParser
    log = logging.getLogger("test_checking")
    with caplog.at_level(logging.INFO):
        with ArgumentParser.checking():
            log.warning("first")
            log.info("second")
            assert caplog.messages == []  # held
        assert caplog.messages == ["first", "second"]
        caplog.clear()
        with pytest.raises(SystemExit), ArgumentParser.checking():
            log.warning("about a run that will not happen")
            raise SystemExit(2)
        with pytest.raises(ValueError), ArgumentParser.checking():
            log.warning("what led up to a crash")
            raise ValueError
        assert caplog.messages == ["what led up to a crash"]


def test_txt2img_from_another_folder_finds_the_repositorys_default_model_and_writes_below_it(tmp_path):
    """Upstream's defaults are relative paths (configs/..., models/...); run by path from elsewhere,
    the script falls back to the repository's files, and its outputs stay in the working folder."""
    result = run("txt2img.py", "--prompt", "a chair", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2",
                 "--outdir", "out", cwd=tmp_path)
    assert_ok(result)
    weights = REPO / "models" / "embedded" / "procedural-t2i-16px.safetensors"
    assert f"Loading model weights from {weights}" in result.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "out/grid-0000.png", "out/samples/00000.png"]

    relative = run("txt2img.py", "--config", "configs/stable-diffusion/v1-tiny.yaml", "--random-weights", "--H", "64",
                   "--W", "64", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "1", "--outdir", "tiny", cwd=tmp_path)
    assert_ok(relative)  # a relative --config that is not below the working folder: the repository's
    # and the README's inputs named from the repository: a --reference-image, an --init-img
    assert_ok(run("txt2img.py", "--prompt", "a chair", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2",
                  "--consistent-attn", "--reference-image", "docs/reference-chair.png", "--outdir", "ref", cwd=tmp_path))
    assert_ok(run("img2img.py", "--prompt", "a chair", "--init-img", "docs/reference-chair.png", "--n_samples", "1",
                  "--n_iter", "1", "--ddim_steps", "4", "--outdir", "i2i", cwd=tmp_path))


WEIGHTS_16PX = "models/embedded/procedural-t2i-16px.safetensors"


@pytest.mark.parametrize("script, args, written", [
    ("consistency_benchmark.py", ["--random-weights", "--n", "2", "--steps", "1", "--seeds", "0",
                                  "--settings", "none", "--outdir", "out"], "out/run-001/table.md"),
    ("heldout_loss.py", ["--config", "configs/embedded/procedural-t2i-16px.yaml", "--ckpt", WEIGHTS_16PX,
                         "--n", "4", "--batch-size", "4"], None),
    ("benchmark_train_step.py", ["--batch", "1", "--size", "16", "--flops"], None),
])
def test_research_scripts_from_another_folder_read_the_repositorys_configs_and_weights(tmp_path, script, args,
                                                                                      written):
    """Their default --config and relative --config/--ckpt fall back to the repository like txt2img's."""
    assert_ok(run(script, *args, cwd=tmp_path))
    if written:
        assert (tmp_path / written).is_file()


def test_adapter_scripts_resolve_relative_paths_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = "models/embedded/procedural-16px-outline-adapter.safetensors"
    opt = load_script("adapter_benchmark").build_parser().parse_args(["--adapter", adapter, "--ckpt", WEIGHTS_16PX])
    assert (opt.adapter, opt.ckpt) == (str(REPO / adapter), str(REPO / WEIGHTS_16PX))
    assert opt.config is None  # then the config of those weights (test_consistency_benchmark.py runs it):
    from ldm.model_choice import config_of_weights
    assert config_of_weights(opt.ckpt) == str(REPO / "configs" / "embedded" / "procedural-t2i-16px.yaml")
    train_adapter = load_script("train_adapter")
    parser = train_adapter.build_parser()
    opt = parser.parse_args(["--random-weights", "--out", "a.safetensors"])
    train_adapter.validate(parser, opt)
    assert opt.config == str(REPO / "configs" / "embedded" / "procedural-t2i.yaml")
    opt = parser.parse_args(["--ckpt", WEIGHTS_16PX, "--out", "a.safetensors"])
    train_adapter.validate(parser, opt)  # the config of those weights
    assert opt.config == str(REPO / "configs" / "embedded" / "procedural-t2i-16px.yaml")
    (tmp_path / "configs").mkdir()  # a file of that name in the working folder wins
    (tmp_path / "configs" / "mine.yaml").write_text("model: {}\n")
    assert load_script("benchmark_attention").build_parser().parse_args(["--config", "configs/mine.yaml"]).config \
        == "configs/mine.yaml"


def test_txt2img_missing_checkpoint_says_what_to_pass(tmp_path):
    result = run("txt2img.py", "--config", TINY_CONFIG, "--ckpt", tmp_path / "missing.ckpt", "--outdir", tmp_path)
    assert_one_line_error(result, "checkpoint not found", "--ckpt", "--random-weights")


@pytest.mark.parametrize("script", ["txt2img.py", "img2img.py"])
def test_a_file_of_no_checkpoint_type_is_refused_before_the_model_is_built(script, tmp_path):
    # --ckpt alone with a wrong file used to build SD v1 first (the config naming no such file)
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    init = ["--init-img", REPO / "docs" / "reference-chair.png"] if script == "img2img.py" else []
    result = run(script, "--ckpt", notes, *init, "--outdir", tmp_path / "out")
    assert_one_line_error(result, f"{script}: error: --ckpt: Unsupported checkpoint type '.txt' for {notes}; "
                                  f"expected one of")
    assert result.returncode == 2 and "Loading model weights" not in result.stderr and "params" not in result.stderr

    cut = tmp_path / "cut.safetensors"  # the shipped weights, copied in part
    cut.write_bytes((REPO / "models" / "embedded" / "procedural-t2i-16px.safetensors").read_bytes()[:100_000])
    result = run(script, "--ckpt", cut, *init, "--outdir", tmp_path / "out")
    assert_one_line_error(result, f"{script}: error: --ckpt: {cut} is not a whole checkpoint (100000 of its")
    assert "params" not in result.stderr


def test_txt2img_unreadable_checkpoint_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    args = [a for a in TINY if a != "--random-weights"]
    result = run("txt2img.py", *args, "--ckpt", bad, "--outdir", tmp_path / "out" / "run1")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    # --outdir was created before loading, to check it early; the failed run leaves no empty folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]
    (tmp_path / "mine").mkdir()  # but a folder that was there before stays, empty or not
    assert run("txt2img.py", *args, "--ckpt", bad, "--outdir", tmp_path / "mine").returncode != 0
    assert (tmp_path / "mine").is_dir()


def test_txt2img_checkpoint_of_another_model_names_the_config_it_was_checked_against(tmp_path):
    """The shipped 16 px weights with SD v1's layout: the error says which config's model they did
    not fit (for a --ckpt alone that is SD v1's default, which the user never named)."""
    args = [a for a in TINY if a != "--random-weights"]
    result = run("txt2img.py", *args, "--ckpt", REPO / "models/embedded/procedural-t2i-16px.safetensors",
                 "--outdir", tmp_path)
    assert_one_line_error(result, "procedural-t2i-16px.safetensors lacks", "weights this config needs",
                          f"(the model of {TINY_CONFIG}; --config names the checkpoint's own)")


def test_txt2img_with_a_class_conditional_model_is_one_error_line(tmp_path):
    args = ["--config", REPO / "configs/latent-diffusion/cin256-v2.yaml", *TINY[2:]]
    result = run("txt2img.py", *args, "--outdir", tmp_path / "out")
    assert_one_line_error(result, "cin256-v2.yaml is a model conditioned on class labels, not a text-to-image model; "
                                  "pass one such as configs/stable-diffusion/v1-inference.yaml")
    assert not any(tmp_path.iterdir())


def tiny_with_edited_config(tmp_path, old, new):
    """(the config's path, TINY's arguments with it): the tiny config with `old` replaced by `new` once."""
    config = tmp_path / "mine.yaml"
    config.write_text(TINY_CONFIG.read_text().replace(old, new, 1))
    return config, [a if a != str(TINY_CONFIG) else str(config) for a in TINY]


def test_txt2img_context_longer_than_the_text_encoders_positions_is_one_error_line(tmp_path):
    config, args = tiny_with_edited_config(tmp_path, "        text_config:", "        max_length: 100\n        text_config:")
    result = run("txt2img.py", *args, "--outdir", tmp_path / "out")  # had been an IndexError traceback
    assert_one_line_error(result, "max_length 100 does not fit the CLIP text encoder's 77 positions")
    assert not (tmp_path / "out").exists()


def test_txt2img_config_setting_outside_its_choices_is_one_error_line(tmp_path):
    config, args = tiny_with_edited_config(tmp_path, "    linear_start:", "    loss_type: l3\n    linear_start:")
    result = run("txt2img.py", *args, "--outdir", tmp_path / "out")
    assert_one_line_error(result, "model.params.loss_type is 'l3'; it takes one of 'l1', 'l2'", f"(set in {config})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


def test_txt2img_config_with_a_misspelt_parameter_is_one_error_line(tmp_path):
    config, args = tiny_with_edited_config(tmp_path, "        num_heads:", "        num_head:")
    assert_one_line_error(run("txt2img.py", *args, "--outdir", tmp_path / "out"),
                          "error: ldm.modules.diffusionmodules.openaimodel.UNetModel does not take the config's "
                          "parameters as given: UNetModel.__init__() got an unexpected keyword argument 'num_head' "
                          f"(set in {config})")


def test_img2img_strength_one_noises_the_init_image_completely(tmp_path):
    # upstream indexed one DDIM step past the schedule at strength 1.0 (IndexError)
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    assert_ok(run("img2img.py", "--config", TINY_CONFIG, "--random-weights", "--init-img", init, "--n_samples", "1",
                  "--ddim_steps", "3", "--strength", "1.0", "--outdir", tmp_path / "out"))
    assert pngs(tmp_path / "out") == ["grid-0000.png", "samples/00000.png"]


@pytest.mark.parametrize("strength, steps, t_enc", [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29),
                                                     (0.5, 4, 2), (0.35, 4, 1), (1.0, 3, 3)])
def test_img2img_denoises_the_whole_steps_of_strength_times_steps(strength, steps, t_enc):
    # int(0.29 * 100) is 28: the float product is 28.999999999999996
    opt = load_script("img2img").build_parser().parse_args(["--strength", str(strength), "--ddim_steps", str(steps)])
    assert load_script("img2img").encode_steps(opt) == t_enc


def test_img2img_rejects_plms_and_missing_init_img(tmp_path):
    assert_one_line_error(run("img2img.py", "--config", TINY_CONFIG, "--random-weights", "--plms",
                              "--init-img", "x.png", "--outdir", tmp_path), "plms")
    assert_one_line_error(run("img2img.py", "--config", TINY_CONFIG, "--random-weights",
                              "--outdir", tmp_path), "--init-img")


def test_optional_extras_fail_with_one_line_when_unavailable(tmp_path):
    for flag in ("--safety-checker", "--watermark"):  # 256 px: invisible-watermark's smallest
        result = run("txt2img.py", *TINY, "--H", "256", "--W", "256", flag, "--outdir", tmp_path / flag.strip("-"))
        if result.returncode == 0:
            continue  # the optional dependency and its weights happen to be available
        assert_one_line_error(result, flag)


def test_pngs_record_the_device_and_the_precision_computed_in(tmp_path):
    """--precision autocast (the default) is float16 only on CUDA: on a CPU the run says, and
    records, float32, which another machine needs to know to reproduce the images."""
    result = run("txt2img.py", *TINY, "--outdir", tmp_path, "--precision", "autocast", "--device", "cpu")
    assert_ok(result)
    assert "model on cpu, float32, sampler ddim" in result.stderr
    meta = read_parameters(tmp_path / "samples" / "00000.png")
    assert (meta["device"], meta["precision"]) == ("cpu", "float32")


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the autocast object is made, not entered
def test_only_cuda_computes_in_float16_autocast():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert computed_precision("autocast", cuda) == "float16 autocast"
    assert computed_precision("full", cuda) == computed_precision("autocast", cpu) == "float32"
    assert isinstance(precision_context("autocast", cuda), torch.autocast)
    assert not isinstance(precision_context("autocast", cpu), torch.autocast)


def test_ctrl_c_keeps_the_finished_batches_and_gives_them_their_grid(tmp_path):
    """A long run stopped with Ctrl-C: exit status 130 and one line saying what was saved, no
    traceback; the finished batches' samples stay and their grid is written."""
    args = [*TINY, "--n_iter", "500", "--outdir", tmp_path]  # far longer than the test waits
    four_samples = lambda: len(list(tmp_path.glob("samples/*.png"))) >= 4  # noqa: E731
    process, (_, stderr) = interrupt_script_when("txt2img.py", args, four_samples, stderr=subprocess.PIPE)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    samples = sorted(tmp_path.glob("samples/*.png"))
    assert len(samples) >= 4 and len(samples) % 2 == 0  # whole batches of --n_samples 2
    assert f"interrupted after {len(samples) // 2} finished batch(es): {len(samples) + 1} files written" in stderr
    (grid,) = tmp_path.glob("grid-*.png")
    assert Image.open(grid).size == (2 + 2 * 66, 2 + len(samples) // 2 * 66)  # 2 per row, 64 px + padding


def test_ctrl_c_while_a_batch_is_written_takes_effect_once_it_is_written():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, at once, in the main thread
            done.append("the rest of the batch")
    assert done == ["the rest of the batch"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture(scope="module")
def pipeline_with_a_checker(tmp_path_factory):
    pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("pipeline")
    write_flagging_safety_checker(folder)
    return folder


def test_safety_checker_from_a_pipeline_folder_blacks_out_what_it_flags(pipeline_with_a_checker, tmp_path):
    """Offline, with the weights at hand: a pipeline folder (or its checker's own folder) loads
    without the hub, and the images it flags are black."""
    pipeline, checker = pipeline_with_a_checker, pipeline_with_a_checker / "safety_checker"
    (checker / "preprocessor_config.json").write_bytes(
        (pipeline / "feature_extractor" / "preprocessor_config.json").read_bytes())  # the hub repository's layout
    for name, folder in (("pipeline", pipeline), ("checker", checker)):
        result = run("txt2img.py", *TINY, "--safety-checker", folder, "--outdir", tmp_path / name)
        assert_ok(result)
        assert f"safety checker: {folder}" in result.stderr
        samples = sorted((tmp_path / name / "samples").glob("*.png"))
        assert len(samples) == 2 and not any(np.asarray(Image.open(s)).any() for s in samples)
        assert not np.asarray(Image.open(tmp_path / name / "grid-0000.png")).any()  # blanked before the grid


def test_safety_checker_folder_that_is_not_there_is_one_line(tmp_path):
    assert_one_line_error(run("txt2img.py", *TINY, "--safety-checker", tmp_path / "nope", "--outdir", tmp_path / "o"),
                          f"--safety-checker {tmp_path / 'nope'}: no such folder")
    assert not (tmp_path / "o").exists()


def test_safety_checker_sources():
    from ldm.outputs import SAFETY_MODEL_ID, safety_checker_sources
    assert safety_checker_sources("", None) == (SAFETY_MODEL_ID, SAFETY_MODEL_ID)
    assert safety_checker_sources("", "models/ldm/stable-diffusion-v1/model.ckpt") == (SAFETY_MODEL_ID,) * 2


def test_watermark_on_images_too_small_for_it_is_one_line_before_sampling(tmp_path):
    """invisible-watermark refuses images under 256x256: the embedded models' 16 and 32 px ones
    ended in its traceback after sampling."""
    assert_one_line_error(run("txt2img.py", *TINY, "--watermark", "--display-scale", "2", "--outdir", tmp_path / "out"),
                          "--watermark needs images of 256x256 pixels or more", "this run saves 128x128")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, display_scale", [(256, 1), (64, 4)])
def test_watermark_changes_the_pixels_of_every_file_as_saved(tmp_path, size, display_scale):
    """Each sample and the grid are marked as a whole, at the size they are saved (upstream marked
    each file): a grid of marked samples, or a mark upscaled with the image, is no mark a reader of
    that file can decode. Small images saved large (--display-scale) can be marked."""
    pytest.importorskip("imwatermark")
    pytest.importorskip("cv2")
    args = [*TINY, "--H", str(size), "--W", str(size), "--display-scale", str(display_scale)]
    for name, extra in (("plain", []), ("marked", ["--watermark"])):
        assert_ok(run("txt2img.py", *args, *extra, "--outdir", tmp_path / name))

    def pixels(name, file):
        return np.asarray(Image.open(tmp_path / name / file)).astype(int)
    for file in ("samples/00000.png", "grid-0000.png"):
        plain, marked = pixels("plain", file), pixels("marked", file)
        assert plain.shape == marked.shape and plain.shape[0] >= 256
        assert 0 < np.abs(plain - marked).mean() < 8  # hidden: small changes, but changes
        border, saved = 2 * display_scale, size * display_scale  # the grid's first image lies after its border
        tile = marked[border:border + saved, border:border + saved]
        if file.startswith("grid"):
            assert not np.array_equal(tile, pixels("marked", "samples/00000.png"))  # marked as one file
        elif display_scale > 1:
            # marked after the upscale: the blocks of one model pixel no longer share one colour
            blocks = marked[::display_scale, ::display_scale]
            assert not np.array_equal(marked, np.repeat(np.repeat(blocks, display_scale, 0), display_scale, 1))
    reader = run("tests/test_watermark.py", tmp_path / "marked" / "grid-0000.png")  # upstream's reader of the mark
    assert reader.returncode == 0 and len(reader.stdout.splitlines()) == 1, reader.stderr
    assert_one_line_error(run("tests/test_watermark.py", tmp_path / "none.png"), "cannot read")


def test_a_watermark_that_cannot_be_read_back_is_a_warning(tmp_path):
    """The 16 px model's flat images, saved 16x larger: invisible-watermark's decoder reads the mark
    back from some of the files only (3 of the 6 samples of seed 0); the run says so once."""
    pytest.importorskip("imwatermark")
    pytest.importorskip("cv2")
    result = run("txt2img.py", "--prompt", "a chair", "--n_samples", "6", "--n_iter", "1", "--seed", "0",
                 "--watermark", "--outdir", tmp_path)
    assert_ok(result)
    assert result.stderr.count("the invisible watermark cannot be read back from some of this run's files") == 1


def test_fixed_code_starts_every_iteration_from_the_same_noise(tmp_path):
    """Upstream's --fixed_code: one start code for the whole run, so with deterministic DDIM each
    --n_iter batch repeats the first; without it every batch draws its own."""
    for name, extra in (("fixed", ["--fixed_code"]), ("fresh", [])):
        assert_ok(run("txt2img.py", *TINY, "--n_iter", "2", "--ddim_eta", "0", *extra, "--outdir", tmp_path / name))

    def batches(name):
        images = [np.asarray(Image.open(tmp_path / name / "samples" / f"{i:05}.png")) for i in range(4)]
        return np.stack(images[:2]), np.stack(images[2:])
    first, second = batches("fixed")
    assert np.array_equal(first, second) and not np.array_equal(first[0], first[1])
    first, second = batches("fresh")
    assert not np.array_equal(first, second)
    # each PNG says how its noise was drawn: the same seed, batch and position give another image without it
    for name, fixed in (("fixed", True), ("fresh", False)):
        meta = read_parameters(tmp_path / name / "samples" / "00003.png")
        assert (meta["fixed_code"], meta["n_samples"], meta["batch"], meta["position"]) == (fixed, 2, 1, 1)
