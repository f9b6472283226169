"""--consistent-attn end to end: txt2img and img2img as a user runs them, on the tiny config.

The tiny config's random init zeroes the UNet's output layers (upstream's zero_module), so its
noise prediction would not depend on attention at all; the `tiny_ckpt` checkpoint (conftest.py)
gives every weight a value, so that sharing visibly changes images."""
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY_CONFIG
from ldm.image_io import read_parameters
from test_cli import assert_ok, assert_one_line_error, run


def args(ckpt, outdir, *extra, n=3):
    return ["--config", TINY_CONFIG, "--ckpt", ckpt, "--n_samples", n, "--n_iter", "1", "--ddim_steps", "4",
            "--skip_grid", "--outdir", outdir, *extra]


def txt2img(*argv):
    return run("txt2img.py", "--H", "64", "--W", "64", *argv)


def pixels(outdir):
    """The samples of a run, in order; none is an error, so that comparisons over them cannot hold
    for want of images."""
    files = sorted((outdir / "samples").glob("*.png"))
    assert files, f"no samples in {outdir}"
    return [np.asarray(Image.open(p)) for p in files]


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm"])
def test_anchor_image_is_the_vanilla_image_and_the_others_change(tmp_path, tiny_ckpt, sampler):
    """--consistent-attn's default mode is anchor: the first image is the one sampled without it."""
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    assert_ok(txt2img(*args(tiny_ckpt, plain, "--sampler", sampler)))
    assert_ok(txt2img(*args(tiny_ckpt, shared, "--sampler", sampler, "--consistent-attn", "--share-groups", "all")))
    before, after = pixels(plain), pixels(shared)
    assert len(before) == len(after) == 3
    assert np.array_equal(after[0], before[0])  # the anchor is computed exactly as without sharing
    assert all(not np.array_equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))
    meta = read_parameters(shared / "samples" / "00001.png")
    assert meta["extra"]["consistent_attn"]["mode"] == "anchor"
    assert meta["extra"]["consistent_attn"]["groups"] == ["inner", "middle", "outer"]
    assert "consistent_attn" not in read_parameters(plain / "samples" / "00001.png")["extra"]


def test_a_run_of_several_batches_follows_the_first_batchs_anchor(tmp_path, tiny_ckpt):
    """--n_iter 2: the second batch reads the first batch's anchor instead of having its own."""
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    assert_ok(txt2img(*args(tiny_ckpt, one, "--consistent-attn", "--n_iter", "1")))
    assert_ok(txt2img(*args(tiny_ckpt, two, "--consistent-attn", "--n_iter", "2")))
    assert_ok(txt2img(*args(tiny_ckpt, plain, "--n_iter", "2")))
    first, run, plain = pixels(one), pixels(two), pixels(plain)
    assert len(run) == 6 and all(np.array_equal(a, b) for a, b in zip(run[:3], first, strict=True))  # batch 1 as alone
    assert np.array_equal(run[0], plain[0])        # the run's anchor is the plain image
    assert not np.array_equal(run[3], plain[3])    # batch 2's first image reads it: no anchor of its own
    assert not any(np.array_equal(a, b) for a, b in zip(run[4:], plain[4:], strict=True))
    assert "run's first batch" in read_parameters(two / "samples" / "00004.png")["extra"]["run_anchors"]["anchors"]
    assert "run_anchors" not in read_parameters(one / "samples" / "00001.png")["extra"]  # one batch: its own


def test_a_chosen_anchor_image_stays_the_plain_image_and_the_run_follows_it(tmp_path, tiny_ckpt):
    """--anchor-images 2: the user picks image 2 of a plain batch; with the same seed it stays exactly
    that image, the others of its batch and every image of the next batch read it."""
    plain, chosen = tmp_path / "plain", tmp_path / "chosen"
    assert_ok(txt2img(*args(tiny_ckpt, plain, "--n_iter", "2")))
    assert_ok(txt2img(*args(tiny_ckpt, chosen, "--n_iter", "2", "--consistent-attn", "--anchor-images", "2")))
    before, after = pixels(plain), pixels(chosen)
    assert np.array_equal(after[2], before[2])
    assert not any(np.array_equal(after[i], before[i]) for i in (0, 1, 3, 4, 5))
    parameters = read_parameters(chosen / "samples" / "00004.png")
    assert (parameters["batch"], parameters["position"]) == (1, 1)  # what --anchor-images takes
    meta = parameters["extra"]
    assert meta["consistent_attn"]["anchor_images"] == [2]
    assert meta["run_anchors"]["anchors"].startswith("image(s) 2 of the run's first batch")


def test_an_anchor_image_beyond_a_short_first_batch_is_one_error_line(tmp_path, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\na blue chair\n")  # a first batch of 2 images, fewer than --n_samples 3
    out = tmp_path / "out"
    result = txt2img(*args(tiny_ckpt, out, "--from-file", prompts, "--consistent-attn", "--anchor-images", "2"))
    assert_one_line_error(result, "--anchor-images 2: the batch has 2 image(s), at positions 0 to 1")
    assert not out.exists()


def test_a_first_batch_shorter_than_the_anchor_count_is_all_anchors(tmp_path, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\n")  # batches of 1 image, fewer than the 2 anchors asked for
    result = txt2img(*args(tiny_ckpt, tmp_path / "out", "--from-file", prompts, "--consistent-attn",
                           "--share-anchors", "2", "--n_iter", "2"))
    assert_ok(result)
    assert len(pixels(tmp_path / "out")) == 2
    # the run says so, and its metadata names the one anchor it had (it said "the first 2")
    assert "--share-anchors 2: the first batch has 1 image(s); they are the anchors" in result.stderr
    extra = read_parameters(sorted((tmp_path / "out" / "samples").glob("*.png"))[1])["extra"]
    assert extra["consistent_attn"]["n_anchors"] == 1
    assert extra["run_anchors"] == {"anchors": "the first 1 image(s) of the run's first batch, read by every later "
                                               "batch"}


@pytest.mark.parametrize("source", ["--prompt", "--from-file"])
def test_a_run_whose_images_are_all_anchors_is_one_error_line(tmp_path, tiny_ckpt, source):
    """One batch of 2 images and 2 anchors leaves nothing to share; a prompt file of 2 lines is such a
    run too (its batches are counted once it is read), not a run of later batches that read them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\na blue chair\n")
    given = ["--from-file", prompts] if source == "--from-file" else ["--prompt", "a red chair"]
    out = tmp_path / "out"
    result = txt2img(*args(tiny_ckpt, out, *given, "--consistent-attn", "--share-anchors", "2", n=2))
    assert_one_line_error(result, "--share-anchors 2 with 2 images per batch leaves no image to read the anchors")
    assert not out.exists()


def test_single_image_warns_and_samples_normally(tmp_path, tiny_ckpt):
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    assert_ok(txt2img(*args(tiny_ckpt, plain, n=1)))
    result = txt2img(*args(tiny_ckpt, shared, "--consistent-attn", n=1))
    assert_ok(result)
    assert "nothing to share" in result.stderr
    assert np.array_equal(pixels(shared)[0], pixels(plain)[0])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\n")  # a run of one image through --from-file
    result = txt2img(*args(tiny_ckpt, tmp_path / "from-file", "--consistent-attn", "--from-file", prompts, n=1))
    assert_ok(result)
    assert "this run is a single image, nothing to share" in result.stderr


def test_one_image_at_a_time_follows_the_runs_first_image(tmp_path, tiny_ckpt):
    """--n_samples 1 --n_iter 3 (one image per batch, as on a GPU that holds one): in anchor mode the
    second and third images read the first one's keys/values; with mode all there is nothing to share."""
    plain, shared, joint = tmp_path / "plain", tmp_path / "shared", tmp_path / "joint"
    assert_ok(txt2img(*args(tiny_ckpt, plain, "--n_iter", "3", n=1)))
    result = txt2img(*args(tiny_ckpt, shared, "--n_iter", "3", "--consistent-attn", n=1))
    assert_ok(result)
    assert "nothing to share" not in result.stderr
    before, after = pixels(plain), pixels(shared)
    assert len(after) == 3 and np.array_equal(after[0], before[0])  # the anchor is the plain image
    assert not any(np.array_equal(after[i], before[i]) for i in (1, 2))
    assert "run's first batch" in read_parameters(shared / "samples" / "00002.png")["extra"]["run_anchors"]["anchors"]
    result = txt2img(*args(tiny_ckpt, joint, "--n_iter", "3", "--consistent-attn", "--share-mode", "all", n=1))
    assert_ok(result)
    assert "nothing to share" in result.stderr
    assert all(np.array_equal(a, b) for a, b in zip(pixels(joint), before, strict=True))
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "two", "--n_iter", "3", "--consistent-attn",
                                        "--share-anchors", "2", n=1)),
                          "--share-anchors 2: the anchors are images of the batch, which holds 1")


def test_img2img_shares_too(tmp_path, tiny_ckpt):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    common = ["--init-img", init, "--strength", "0.75"]
    assert_ok(run("img2img.py", *args(tiny_ckpt, plain, *common)))
    assert_ok(run("img2img.py", *args(tiny_ckpt, shared, *common, "--consistent-attn", "--share-groups", "all",
                                      "--anchor-images", "1")))
    before, after = pixels(plain), pixels(shared)
    assert np.array_equal(after[1], before[1])  # the chosen anchor keeps its noise: the plain variation
    assert not any(np.array_equal(after[i], before[i]) for i in (0, 2))
    assert read_parameters(shared / "samples" / "00000.png")["extra"]["consistent_attn"]["mode"] == "anchor"


@pytest.mark.parametrize("flags,fragment", [
    (["--share-mode", "anchor"], "--share-mode takes effect only with --consistent-attn"),
    (["--consistent-attn", "--share-groups", "outer,sideways"], "unknown attention group"),
    (["--consistent-attn", "--share-window", "0.9:0.1"], "step window"),
])
def test_bad_sharing_flags_are_one_error_line(tmp_path, tiny_ckpt, flags, fragment):
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path, *flags)), fragment)
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("flags", [["--consistent-attn", "--share-groups", "outer"],
                                   ["--consistent-attn", "--share-groups", "outer", "--share-blocks", "decoder",
                                    "--share-mode", "sample"],
                                   ["--write-reference", "{out}/ref.safetensors", "--share-groups", "outer"]])
def test_groups_a_users_unet_has_no_attention_in_are_one_error_line(tmp_path, flags):
    """A UNet without attention at full latent resolution (a config's attention_resolutions [4, 2])
    has no outer group: selecting only it was a ValueError's traceback once the model had loaded."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.attention_resolutions = [4, 2]
    OmegaConf.save(config, tmp_path / "no-outer.yaml")
    flags = [str(f).format(out=tmp_path) for f in flags]
    result = txt2img("--config", tmp_path / "no-outer.yaml", "--random-weights", "--n_samples", "2", "--n_iter", "1",
                     "--ddim_steps", "2", "--outdir", tmp_path / "out", *flags)
    assert_one_line_error(result, "--share-groups/--share-blocks: this UNet has no self-attention layer in groups",
                          "its layers are in groups middle, inner")
    assert result.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-outer.yaml"]


# 4 DDIM steps call the model at 1 - t/1000 = 0.249, 0.499, 0.749, 0.999 of the trajectory
@pytest.mark.parametrize("flags,fragment", [
    (["--consistent-attn", "--share-window", "0.3:0.4"], "holds none of this run's 4 model calls (the nearest at "
                                                         "0.249 and 0.499 of the trajectory"),
    (["--write-reference", "{out}/ref.safetensors", "--share-window", "0:0.2"], "(the nearest at 0.249 of"),
    (["--consistent-attn", "--share-window", "0:0.2", "--sampler", "plms"], "holds none of this run's 5 model calls"),
])
def test_a_step_window_without_a_model_call_is_one_error_line_before_sampling(tmp_path, tiny_ckpt, flags, fragment):
    flags = [str(f).format(out=tmp_path) for f in flags]
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path, *flags)), "--share-window", fragment,
                          "widen it or take more --ddim_steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no image, no reference


def test_img2img_checks_the_window_against_the_steps_its_strength_leaves(tmp_path, tiny_ckpt):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    # strength 0.5 of 4 steps: decoding calls the model at 0.749 and 0.999 only
    common = ["--init-img", init, "--strength", "0.5", "--consistent-attn"]
    result = run("img2img.py", *args(tiny_ckpt, tmp_path / "early", *common, "--share-window", "0:0.6"))
    assert_one_line_error(result, "holds none of this run's 2 model calls (the nearest at 0.749 of",
                          "raise --strength")  # more steps would not reach the window
    assert_ok(run("img2img.py", *args(tiny_ckpt, tmp_path / "late", *common, "--share-window", "0.7:1")))


def test_a_negative_prompt_steers_the_unconditional_half_and_the_anchor_stays_its_plain_image(tmp_path, tiny_ckpt):
    plain, negative, shared = tmp_path / "plain", tmp_path / "negative", tmp_path / "shared"
    assert_ok(txt2img(*args(tiny_ckpt, plain)))
    assert_ok(txt2img(*args(tiny_ckpt, negative, "--negative-prompt", "blurry")))
    assert_ok(txt2img(*args(tiny_ckpt, shared, "--negative-prompt", "blurry", "--consistent-attn")))
    assert all(not np.array_equal(a, b) for a, b in zip(pixels(negative), pixels(plain), strict=True))
    assert np.array_equal(pixels(shared)[0], pixels(negative)[0])  # the halves still share apart
    assert read_parameters(negative / "samples" / "00000.png")["negative_prompt"] == "blurry"
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "off", "--negative-prompt", "blurry", "--scale", "1")),
                          "--negative-prompt", "--scale 1")
    assert not (tmp_path / "off").exists()


def reference_png(path, colour):
    Image.new("RGB", (64, 64), colour).save(path)
    return path


def test_a_reference_image_is_read_as_the_anchor_and_is_no_output(tmp_path, tiny_ckpt):
    red, blue = reference_png(tmp_path / "red.png", "red"), reference_png(tmp_path / "blue.png", "blue")
    runs = {name: tmp_path / name for name in ("plain", "red", "red-again", "blue")}
    assert_ok(txt2img(*args(tiny_ckpt, runs["plain"], "--consistent-attn")))
    for name, image in (("red", red), ("red-again", red), ("blue", blue)):
        assert_ok(txt2img(*args(tiny_ckpt, runs[name], "--consistent-attn", "--reference-image", image)))
    images = {name: pixels(folder) for name, folder in runs.items()}
    assert [len(v) for v in images.values()] == [3, 3, 3, 3]  # n_samples each: the anchor is not saved
    assert all(np.array_equal(a, b) for a, b in zip(images["red"], images["red-again"], strict=True))
    # every image reads the reference: another image changes all of them, and none is the plain anchor
    assert all(not np.array_equal(a, b) for a, b in zip(images["red"], images["blue"], strict=True))
    assert not np.array_equal(images["red"][0], images["plain"][0])
    assert read_parameters(runs["red"] / "samples" / "00000.png")["extra"]["reference_image"] == {"images": [str(red)]}


def test_img2img_reads_a_reference_image_as_the_anchor(tmp_path, tiny_ckpt):
    """img2img's decode keeps the extra anchor at the reference as DDIM sampling does; the
    reference is resized to the init image's size (here 96x96 into 64x64)."""
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    red, blue = (tmp_path / "red.png", tmp_path / "blue.png")
    for path, colour in ((red, "red"), (blue, "blue")):
        Image.new("RGB", (96, 96), colour).save(path)
    common = ["--init-img", init, "--strength", "0.75", "--consistent-attn"]
    for name, extra in (("plain", []), ("red", ["--reference-image", red]), ("red-again", ["--reference-image", red]),
                        ("blue", ["--reference-image", blue])):
        assert_ok(run("img2img.py", *args(tiny_ckpt, tmp_path / name, *common, *extra, n=2)))
    images = {name: pixels(tmp_path / name) for name in ("plain", "red", "red-again", "blue")}
    assert [len(v) for v in images.values()] == [2, 2, 2, 2]  # the anchor is no output
    assert all(np.array_equal(a, b) for a, b in zip(images["red"], images["red-again"], strict=True))
    assert all(not np.array_equal(a, b) for a, b in zip(images["red"], images["blue"], strict=True))
    assert not np.array_equal(images["red"][0], images["plain"][0])  # image 0 reads the reference, not itself
    meta = read_parameters(tmp_path / "red" / "samples" / "00000.png")["extra"]
    assert meta["reference_image"] == {"images": [str(red)]} and meta["strength"] == 0.75
    result = run("img2img.py", *args(tiny_ckpt, tmp_path / "alone", "--init-img", init, "--reference-image", red))
    assert_one_line_error(result, "add --consistent-attn")
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_every_sampler_reads_the_reference_image(tmp_path, tiny_ckpt, sampler):
    red, blue = reference_png(tmp_path / "red.png", "red"), reference_png(tmp_path / "blue.png", "blue")
    for image in (red, blue):
        assert_ok(txt2img(*args(tiny_ckpt, tmp_path / image.stem, "--sampler", sampler, "--consistent-attn",
                                "--reference-image", image, n=2)))
    assert all(not np.array_equal(a, b)
               for a, b in zip(pixels(tmp_path / "red"), pixels(tmp_path / "blue"), strict=True))
    assert len(pixels(tmp_path / "red")) == 2


def test_several_reference_images_are_one_anchor_each(tmp_path, tiny_ckpt):
    """Views of one object: every image reads all of them (anchor mode with one anchor per image)."""
    red, blue = reference_png(tmp_path / "red.png", "red"), reference_png(tmp_path / "blue.png", "blue")
    for name, images in (("red", [red]), ("blue", [blue]), ("both", [red, blue])):
        assert_ok(txt2img(*args(tiny_ckpt, tmp_path / name, "--consistent-attn", "--reference-image", *images)))
    both = pixels(tmp_path / "both")
    assert len(both) == 3  # n_samples: no anchor is an output
    for one in ("red", "blue"):
        assert all(not np.array_equal(a, b) for a, b in zip(both, pixels(tmp_path / one), strict=True))
    meta = read_parameters(tmp_path / "both" / "samples" / "00000.png")["extra"]
    assert meta["reference_image"] == {"images": [str(red), str(blue)]}
    assert meta["consistent_attn"]["n_anchors"] == 2


def test_one_image_and_a_reference_image_share(tmp_path, tiny_ckpt):
    """--n_samples 1 has nothing to share within the batch, but the reference is one more image."""
    red, blue = reference_png(tmp_path / "red.png", "red"), reference_png(tmp_path / "blue.png", "blue")
    for image in (red, blue):
        assert_ok(txt2img(*args(tiny_ckpt, tmp_path / image.stem, "--consistent-attn", "--reference-image", image,
                                n=1)))
    assert not np.array_equal(pixels(tmp_path / "red")[0], pixels(tmp_path / "blue")[0])


@pytest.mark.parametrize("extra, message", [
    ([], "add --consistent-attn"),
    (["--consistent-attn", "--share-mode", "all"], "--share-mode anchor"),
    (["--consistent-attn", "--share-anchors", "2"], "--share-anchors"),
    (["--consistent-attn", "--share-anchors", "1"], "--share-anchors"),  # the default's value, still not used
    (["--consistent-attn", "--anchor-images", "1"], "--anchor-images"),
    # not "add --consistent-attn", which --write-reference refuses in turn
    (["--write-reference", "REF"], "choose --reference-image or --write-/--read-reference"),
])
def test_reference_image_misuse_is_one_error_line(tmp_path, tiny_ckpt, extra, message):
    image = reference_png(tmp_path / "red.png", "red")
    extra = [tmp_path / "ref.safetensors" if a == "REF" else a for a in extra]
    result = txt2img(*args(tiny_ckpt, tmp_path / "out", "--reference-image", image, *extra))
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ref.safetensors").exists()


def test_an_unreadable_reference_image_is_one_error_line(tmp_path, tiny_ckpt):
    (tmp_path / "notes.png").write_text("not an image")
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "out", "--consistent-attn", "--reference-image",
                                        tmp_path / "notes.png")), "cannot read --reference-image")
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "out", "--consistent-attn", "--reference-image",
                                        tmp_path / "missing.png")), "cannot read --reference-image")
