"""--adapter end to end: txt2img as a user runs it, on the tiny config with random adapters."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import TINY_CONFIG, build_tiny_model_with_weights, load_script
from ldm.image_io import read_parameters
from ldm.modules.adapters import Adapter, LightAdapter, load_adapter, save_adapter
from test_adapters import TINY_CHANNELS, compact
from test_cli import assert_ok, assert_one_line_error, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model whose every weight is non-zero (upstream zero-initialises the UNet's output
    layers, which would hide any change of the hidden states), two random tiny adapters, and
    condition images."""
    root = tmp_path_factory.mktemp("adapter")
    model = build_tiny_model_with_weights()  # seeds the adapters' random weights below too
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    torch.save({f"adapter.{k}": v for k, v in Adapter(TINY_CHANNELS, cond_channels=1).state_dict().items()},
               root / "canny.pth")
    save_file(LightAdapter(TINY_CHANNELS).state_dict(), str(root / "color.safetensors"))
    with torch.device("meta"):
        sd_size = Adapter(cond_channels=1).state_dict()
    torch.save(compact(sd_size), root / "sd14_sketch.pth")

    photo = Image.new("RGB", (64, 64), (30, 30, 60))
    draw = ImageDraw.Draw(photo)
    draw.rectangle([10, 12, 40, 50], fill=(220, 180, 40))
    draw.ellipse([30, 5, 60, 35], fill=(40, 200, 90))
    photo.save(root / "photo.png")
    Image.new("RGB", (100, 64)).save(root / "wide.png")
    return root


def txt2img(files, outdir, *extra):
    return run("txt2img.py", "--config", TINY_CONFIG, "--ckpt", files / "tiny.safetensors", "--H", "64", "--W", "64",
               "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "3", "--skip_grid", "--outdir", outdir, *extra)


def pixels(outdir):
    return [np.asarray(Image.open(p)) for p in sorted((outdir / "samples").glob("*.png"))]


def one_image(files, outdir, *extra):
    """One image from txt2img run in-process (cheaper than a subprocess), as pixels."""
    load_script("txt2img").main([str(a) for a in [
        "--config", TINY_CONFIG, "--ckpt", files / "tiny.safetensors", "--H", "64", "--W", "64", "--n_samples", "1",
        "--n_iter", "1", "--skip_grid", "--outdir", outdir, *extra]])
    return pixels(outdir)[0]


def test_two_adapters_run_and_are_recorded(tmp_path, files):
    result = txt2img(files, tmp_path,
                     "--adapter", files / "canny.pth", "--cond", files / "photo.png", "--cond-type", "canny",
                     "--adapter", files / "color.safetensors", "--cond", files / "photo.png", files / "photo.png",
                     "--cond-type", "color", "--adapter-weight", "1.0", "--adapter-weight", "0.5",
                     "--cond-tau", "0.7")
    assert_ok(result)
    assert len(pixels(tmp_path)) == 2
    meta = read_parameters(tmp_path / "samples" / "00001.png")["extra"]["t2i_adapter"]
    assert meta["cond_tau"] == 0.7
    canny, color = meta["adapters"]
    assert canny["ckpt"].endswith("canny.pth") and canny["cond_type"] == "canny" and canny["weight"] == 1.0
    assert canny["kind"] == "full" and canny["cond_channels"] == 1 and canny["channels"] == list(TINY_CHANNELS)
    assert color["kind"] == "light" and color["weight"] == 0.5 and len(color["cond"]) == 2


def test_adapter_steers_sampling_only_inside_the_cond_tau_window(tmp_path, files, capsys):
    """In-process (cheaper than more subprocesses). DDIM with 2 steps calls the model at progress
    0.499 and 0.999: --cond-tau 0.6 applies the adapter at the first call only, 0.4 at none, which
    is one error line before sampling (it made the plain image, and its metadata named the adapter)."""
    adapter = ["--adapter", files / "canny.pth", "--cond", files / "photo.png", "--cond-type", "canny"]
    image = lambda name, *extra: one_image(files, tmp_path / name, "--ddim_steps", "2", *extra)
    plain, steered = image("plain"), image("steered", *adapter)
    first_call = image("first-call", *adapter, "--cond-tau", "0.6")
    assert not np.array_equal(steered, plain) and not np.array_equal(first_call, plain)
    assert not np.array_equal(first_call, steered)
    assert "t2i_adapter" not in read_parameters(tmp_path / "plain" / "samples" / "00000.png")["extra"]
    with pytest.raises(SystemExit) as exit_info:
        image("outside", *adapter, "--cond-tau", "0.4")
    assert exit_info.value.code == 2 and not any((tmp_path / "outside").iterdir())  # no image
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--cond-tau 0.4 holds none of this run's 2 model calls (the first at 0.499" in error
    assert "raise it to 0.499 or more or take more --ddim_steps" in error
    # 50 steps: the first call is at 1 - 981/1000 = 0.019000000000000017, so 0.019 is not enough
    with pytest.raises(SystemExit):
        image("fifty", *adapter, "--ddim_steps", "50", "--cond-tau", "0.019")
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "(the first at 0.019 of the trajectory" in error and "raise it to 0.02 or more" in error


def test_a_diffusers_adapter_folder_steers_as_its_weights_in_the_released_layout(tmp_path, files):
    """--adapter FOLDER (diffusers' save_pretrained) samples exactly what the same weights do as
    a released-layout file."""
    diffusers = pytest.importorskip("diffusers")  # the test extra
    torch.manual_seed(1)
    diffusers.T2IAdapter(in_channels=1, channels=list(TINY_CHANNELS), num_res_blocks=2, downscale_factor=8,
                         adapter_type="full_adapter").save_pretrained(tmp_path / "folder")
    save_adapter(load_adapter(tmp_path / "folder"), tmp_path / "released.safetensors")
    cond = ["--cond", files / "photo.png", "--cond-type", "canny"]
    from_folder = one_image(files, tmp_path / "a", "--ddim_steps", "2", "--adapter", tmp_path / "folder", *cond)
    assert np.array_equal(from_folder, one_image(files, tmp_path / "b", "--ddim_steps", "2",
                                                 "--adapter", tmp_path / "released.safetensors", *cond))
    assert not np.array_equal(from_folder, one_image(files, tmp_path / "plain", "--ddim_steps", "2"))


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_every_sampler_passes_the_adapter_features_to_the_unet(tmp_path, files, sampler):
    """The features are added inside the UNet, whatever the sampler calls it with: PLMS's
    multistep estimate and DPM-Solver's continuous times steer like DDIM."""
    image = lambda name, *extra: one_image(files, tmp_path / name, "--ddim_steps", "4", "--sampler", sampler, *extra)
    steered = image("steered", "--adapter", files / "canny.pth", "--cond", files / "photo.png", "--cond-type", "canny")
    assert not np.array_equal(steered, image("plain"))
    assert read_parameters(tmp_path / "steered" / "samples" / "00000.png")["sampler"] == sampler


def test_with_a_reference_image_each_condition_reaches_its_own_image_and_the_anchor_none(tmp_path, files):
    """Layout from the adapter, look from --reference-image. Anchor mode: image 0 reads only itself
    and the reference, so image 1's condition must not change it; were the anchor given a
    condition (image 1's, or the features shifted by one), image 0 would change with it."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    for name, colour in (("b", (200, 40, 40)), ("c", (20, 90, 220))):
        image = Image.new("RGB", (64, 64))
        ImageDraw.Draw(image).ellipse([8, 20, 56, 60], fill=colour)
        image.resize((64, 64)).rotate(40 if name == "b" else 140).save(tmp_path / f"{name}.png")
    script = load_script("txt2img")

    def images(name, *conds):
        adapter = ["--adapter", files / "canny.pth", "--cond", *conds, "--cond-type", "canny"] if conds else []
        script.main([str(a) for a in [
            "--config", TINY_CONFIG, "--ckpt", files / "tiny.safetensors", "--H", "64", "--W", "64",
            "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "3", "--skip_grid", "--outdir", tmp_path / name,
            "--consistent-attn", "--reference-image", tmp_path / "red.png", *adapter]])
        return pixels(tmp_path / name)

    ab = images("ab", files / "photo.png", tmp_path / "b.png")
    ac = images("ac", files / "photo.png", tmp_path / "c.png")
    assert np.array_equal(ab[0], ac[0]) and not np.array_equal(ab[1], ac[1])
    assert not np.array_equal(ab[0], images("no-adapter")[0])  # the condition reaches image 0


def test_rgb_map_into_a_one_channel_adapter_is_one_error_line(tmp_path, files):
    result = txt2img(files, tmp_path, "--adapter", files / "canny.pth", "--cond", files / "photo.png",
                     "--cond-type", "depth")
    assert_one_line_error(result, "--cond-type depth gives 3-channel input but this adapter takes 1 channel")
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "{canny}", "--cond", "{wide}", "--cond-type", "canny"], "is 100x64: both sides must be multiples of 64"),
    (["--adapter", "{canny}", "--cond", "{missing}", "--cond-type", "canny"], "condition image not found"),
    (["--adapter", "{canny}", "--cond", "{photo}", "{photo}", "{photo}", "--cond-type", "canny"],
     "3 condition images for adapter"),
    (["--adapter", "{missing}", "--cond", "{photo}", "--cond-type", "canny"], "adapter checkpoint not found"),
    (["--adapter", "{photo}", "--cond", "{photo}", "--cond-type", "canny"], "Unsupported checkpoint type"),
    (["--adapter", "{model}", "--cond", "{photo}", "--cond-type", "canny"],
     "adapter {model}: not a T2I-Adapter checkpoint: no conv_in.weight or body.0.out_conv.weight (it looks like a "
     "model checkpoint: pass it as --ckpt)"),
    (["--adapter", "{sd14}", "--cond", "{photo}", "--cond-type", "canny"],
     "widths [320, 640, 1280, 1280] but this UNet's levels have [32, 64, 128, 128]"),
    (["--adapter", "{canny}", "--cond", "{photo}"], "1 --adapter given but 0 --cond-type"),
    (["--cond", "{photo}", "--cond-tau", "0.5"], "--cond, --cond-tau take effect only with --adapter"),
    (["--adapter", "{canny}", "--cond", "{photo}", "--cond-type", "canny", "--cond-tau", "0"], "--cond-tau must be in (0, 1]"),
    (["--adapter", "{canny}", "--cond", "{photo}", "--cond-type", "canny", "--adapter-weight", "nan"],
     "--adapter-weight must be finite"),
])
def test_bad_adapter_flags_are_one_error_line(files, capsys, flags, message):
    """In-process (no model is built before these checks), so many cases stay fast."""
    paths = {"canny": files / "canny.pth", "wide": files / "wide.png", "photo": files / "photo.png",
             "missing": files / "missing.png", "sd14": files / "sd14_sketch.pth", "model": files / "tiny.safetensors"}
    script = load_script("txt2img")
    parser = script.build_parser()
    argv = ["--config", str(TINY_CONFIG), "--random-weights", "--H", "64", "--W", "64", "--n_samples", "2",
            *(flag.format(**paths) for flag in flags)]
    with pytest.raises(SystemExit) as exit_info:
        script.validate_options(parser, parser.parse_args(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.format(**paths) in errors[0], errors


def test_a_trusted_pickled_adapter_loads_with_unsafe_pickle_as_the_error_says(files, tmp_path, capsys):
    """A training script's .pth with its argparse arguments: refused by weights-only loading with
    the advice to pass --unsafe-pickle, which then reaches the adapter (it reached only --ckpt)."""
    import argparse
    trusted = tmp_path / "trusted.pth"
    torch.save({"state_dict": torch.load(files / "canny.pth"), "args": argparse.Namespace(lr=1e-4)}, trusted)
    script = load_script("txt2img")
    parser = script.build_parser()
    argv = ["--config", str(TINY_CONFIG), "--random-weights", "--H", "64", "--W", "64", "--n_samples", "2",
            "--adapter", str(trusted), "--cond", str(files / "photo.png"), "--cond-type", "canny"]
    with pytest.raises(SystemExit):
        script.validate_options(parser, parser.parse_args(argv))
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "argparse.Namespace" in error and "pass --unsafe-pickle" in error
    opt = script.validate_options(parser, parser.parse_args([*argv, "--unsafe-pickle"]))
    assert opt.adapters.uses[0].adapter.cond_channels == 1


def test_img2img_takes_adapters_too(tmp_path, files, capsys):
    script = load_script("img2img")
    common = ["--config", TINY_CONFIG, "--ckpt", files / "tiny.safetensors", "--init-img", files / "photo.png",
              "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "4", "--strength", "0.5", "--skip_grid"]

    def image(name, *extra):
        script.main([str(a) for a in [*common, "--outdir", tmp_path / name, *extra]])
        return pixels(tmp_path / name)[0]

    adapter = ["--adapter", files / "color.safetensors", "--cond", files / "photo.png", "--cond-type", "color"]
    steered = image("steered", *adapter)
    assert not np.array_equal(steered, image("plain"))
    meta = read_parameters(tmp_path / "steered" / "samples" / "00000.png")["extra"]
    assert meta["strength"] == 0.5 and meta["t2i_adapter"]["adapters"][0]["kind"] == "light"
    # strength 0.5 of 4 steps calls the model at 0.749 and 0.999 only: more steps would not help
    with pytest.raises(SystemExit):
        image("outside", *adapter, "--cond-tau", "0.5")
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.endswith("raise it to 0.749 or more")
