"""txt2img and img2img --write-reference / --read-reference end to end on the tiny config. Subprocesses only
where a model is loaded; the option checks run in-process (they end before the model loads)."""
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CONFIG, load_script
from ldm.image_io import read_parameters
from ldm.modules.consistency_reference import ReferenceCache
from test_cli import assert_ok, assert_one_line_error, run
from test_cli_consistency import args, pixels, txt2img


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):  # noqa: F811
    """A reference written by txt2img, and the images of that run."""
    tmp = tmp_path_factory.mktemp("reference")
    ref, written = tmp / "chair.safetensors", tmp / "written"
    assert_ok(txt2img(*args(tiny_ckpt, written, "--write-reference", ref, "--share-groups", "all")))
    return ref, written


def test_write_then_read_a_reference(tmp_path, tiny_ckpt, reference):  # noqa: F811
    ref, written = reference
    cache = ReferenceCache.load(ref)
    assert cache.header["run"]["prompts"] == ["a painting of a virus monster playing guitar"]
    assert cache.header["settings"]["groups"] == ["inner", "middle", "outer"]
    assert all(t.dtype.itemsize == 2 for t in cache.tensors.values())  # fp16 on disk
    assert read_parameters(written / "samples" / "00000.png")["extra"]["reference"]["write"] == str(ref)

    read = tmp_path / "read"
    assert_ok(txt2img(*args(tiny_ckpt, read, "--read-reference", ref)))
    # same seed: image 0 reads its own reference (equal up to fp16 rounding), the others follow it
    assert np.abs(pixels(read)[0].astype(int) - pixels(written)[0]).max() <= 2
    assert all(not np.array_equal(a, b) for a, b in zip(pixels(read)[1:], pixels(written)[1:], strict=True))
    meta = read_parameters(read / "samples" / "00001.png")["extra"]["reference"]
    assert meta["read"] == str(ref) and meta["reference_run"]["seed"] == 42


def test_a_reference_of_a_chosen_image_records_that_image_and_its_prompt(tmp_path, tiny_ckpt):  # noqa: F811
    ref, written, read = tmp_path / "ref.safetensors", tmp_path / "written", tmp_path / "read"
    prompts = ["--prompt", "a red chair", "--prompt", "a blue chair", "--prompt", "a green chair"]
    assert_ok(txt2img(*args(tiny_ckpt, written, *prompts, "--write-reference", ref, "--anchor-images", "1")))
    header = ReferenceCache.load(ref).header
    assert header["run"]["prompts"] == ["a blue chair"] and header["settings"]["anchor_images"] == [1]
    assert_ok(txt2img(*args(tiny_ckpt, read, *prompts, "--read-reference", ref)))
    # same seed: image 1 reads its own reference (equal up to fp16 rounding), the others follow it
    assert np.abs(pixels(read)[1].astype(int) - pixels(written)[1]).max() <= 2
    assert not any(np.array_equal(pixels(read)[i], pixels(written)[i]) for i in (0, 2))


def test_a_txt2img_reference_read_by_img2img_is_one_error_line(tmp_path, tiny_ckpt, reference):  # noqa: F811
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(init)
    result = run("img2img.py", *args(tiny_ckpt, tmp_path / "out", "--init-img", init, "--read-reference", reference[0]))
    assert_one_line_error(result, "recorded by txt2img (the whole trajectory), this run is img2img with --strength")
    assert not (tmp_path / "out").exists()


def test_a_reference_from_another_model_is_one_error_line(tmp_path, reference):
    ref, _ = reference
    result = txt2img("--config", TINY_CONFIG, "--random-weights", "--n_samples", 3, "--ddim_steps", 4,
                     "--outdir", tmp_path, "--read-reference", ref)
    assert_one_line_error(result, f"txt2img.py: error: {ref}: ", "another model")
    assert result.returncode == 2
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("flags,message", [
    (["--write-reference", "REF"], "never overwritten"),
    (["--read-reference", "REF", "--H", "128"], "recorded with H 64, this run uses 128"),
    (["--read-reference", "REF", "--ddim_steps", "5"], "recorded with steps 4, this run uses 5"),
    (["--read-reference", "REF", "--share-groups", "outer"], "uses the settings the reference was recorded with"),
    (["--read-reference", "REF", "--write-reference", "new.safetensors"], "choose one"),
    (["--read-reference", "REF", "--consistent-attn"], "choose one"),
    (["--read-reference", "missing.safetensors"], "reference not found"),
    (["--read-reference", "REF", "--subject", "chair"], "uses the settings the reference was recorded with"),
    (["--write-reference", "NEW", "--share-mode", "sample"], "--share-mode and --share-rate do not apply"),
    (["--write-reference", "NEW", "--share-rate", "0.5"], "--share-mode and --share-rate do not apply"),
    # the reference is recorded from the first batch: one prompt line makes a batch of one
    (["--write-reference", "NEW", "--share-anchors", "2", "--from-file", "ONE_LINE"], "the first batch has 1 image"),
    (["--write-reference", "NEW", "--anchor-images", "1", "--from-file", "ONE_LINE"],
     "--anchor-images 1: the batch has 1 image(s)"),
    (["--read-reference", "REF", "--anchor-images", "1"], "uses the settings the reference was recorded with"),
])
def test_bad_reference_options_are_one_error_line(reference, tiny_ckpt, tmp_path, capsys, flags, message):  # noqa: F811
    script = load_script("txt2img")
    parser = script.build_parser()
    (tmp_path / "one.txt").write_text("a red chair\n")
    files = {"REF": str(reference[0]), "NEW": str(tmp_path / "new.safetensors"), "ONE_LINE": str(tmp_path / "one.txt")}
    argv = [files.get(f, f) for f in flags]
    base = [str(a) for a in args(tiny_ckpt, tmp_path)] + ["--H", "64", "--W", "64"]
    with pytest.raises(SystemExit) as exit_info:
        script.validate_options(parser, parser.parse_args(base + argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_img2img_write_then_read_a_reference(tmp_path, tiny_ckpt):  # noqa: F811
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    img2img = lambda outdir, *flags: run("img2img.py", *args(tiny_ckpt, outdir, "--init-img", init,
                                                             "--strength", "0.75", *flags))
    ref, written, read = tmp_path / "ref.safetensors", tmp_path / "written", tmp_path / "read"
    assert_ok(img2img(written, "--write-reference", ref, "--share-groups", "all"))
    header = ReferenceCache.load(ref).header
    assert header["run"]["strength"] == 0.75 and [header["run"]["H"], header["run"]["W"]] == [64, 64]
    assert len(header["timesteps"]) == 3  # int(0.75 * 4) DDIM steps of img2img's trajectory
    assert_ok(img2img(read, "--read-reference", ref))
    assert np.abs(pixels(read)[0].astype(int) - pixels(written)[0]).max() <= 2  # image 0 reads itself
    assert all(not np.array_equal(a, b) for a, b in zip(pixels(read)[1:], pixels(written)[1:], strict=True))
    assert read_parameters(read / "samples" / "00000.png")["extra"]["reference"]["read"] == str(ref)

    other = run("img2img.py", *args(tiny_ckpt, tmp_path / "other", "--init-img", init, "--strength", "0.5",
                                    "--read-reference", ref))
    assert_one_line_error(other, "recorded with strength 0.75, this run uses 0.5")
    # txt2img's whole trajectory is not img2img's last part: refused before the model loads, both ways
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "t", "--read-reference", ref)),
                          "recorded by img2img with --strength 0.75", "this run is txt2img")
    assert not (tmp_path / "t").exists()


def test_a_reference_with_subject_masks_and_adain_is_read_by_prompts_without_the_word(tmp_path, tiny_ckpt):  # noqa: F811
    ref = tmp_path / "monster.safetensors"
    assert_ok(txt2img(*args(tiny_ckpt, tmp_path / "written", "--write-reference", ref, "--share-groups", "all",
                            "--subject", "monster", "--share-adain")))
    cache = ReferenceCache.load(ref)
    assert cache.header["settings"]["subjects"] == ["monster"] and cache.header["settings"]["adain"] is True
    assert any(key.startswith("mask|") for key in cache.tensors)
    read = tmp_path / "read"
    assert_ok(txt2img(*args(tiny_ckpt, read, "--read-reference", ref, "--prompt", "a chair in a garden")))
    meta = read_parameters(read / "samples" / "00000.png")["extra"]["reference"]
    assert meta["subjects"] == ["monster"] and meta["adain"] is True
    plain = tmp_path / "plain"  # the same seed without the reference: every image read something
    assert_ok(txt2img(*args(tiny_ckpt, plain, "--prompt", "a chair in a garden")))
    assert all(not np.array_equal(a, b) for a, b in zip(pixels(read), pixels(plain), strict=True))


def test_a_subject_missing_from_the_recorded_prompt_is_one_error_line(tmp_path, tiny_ckpt):  # noqa: F811
    ref, out = tmp_path / "ref.safetensors", tmp_path / "out"
    result = txt2img(*args(tiny_ckpt, out, "--write-reference", ref, "--subject", "chair"))
    assert_one_line_error(result, "'chair' is not a word of prompt 1")
    assert not ref.exists() and not (out / "samples").exists()
