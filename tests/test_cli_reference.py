"""txt2img --write-reference / --read-reference end to end on the tiny config (subprocesses)."""
import numpy as np

from conftest import TINY_CONFIG
from ldm.image_io import read_parameters
from ldm.modules.consistency_reference import ReferenceCache
from test_cli import assert_ok, assert_one_line_error
from test_cli_consistency import args, pixels, tiny_ckpt, txt2img  # noqa: F401 (tiny_ckpt is a fixture)


def test_write_then_read_a_reference(tmp_path, tiny_ckpt):  # noqa: F811
    ref = tmp_path / "chair.safetensors"
    plain, written, read = tmp_path / "plain", tmp_path / "written", tmp_path / "read"
    assert_ok(txt2img(*args(tiny_ckpt, plain)))
    assert_ok(txt2img(*args(tiny_ckpt, written, "--write-reference", ref, "--share-groups", "all")))
    # recording does not change the images
    assert all(np.array_equal(a, b) for a, b in zip(pixels(written), pixels(plain)))
    cache = ReferenceCache.load(ref)
    assert cache.header["run"]["prompts"] == ["a painting of a virus monster playing guitar"]
    assert cache.header["settings"]["groups"] == ["inner", "middle", "outer"]
    assert all(t.dtype.itemsize == 2 for t in cache.tensors.values())  # fp16 on disk
    assert read_parameters(written / "samples" / "00000.png")["extra"]["reference"]["write"] == str(ref)

    assert_ok(txt2img(*args(tiny_ckpt, read, "--read-reference", ref, "--seed", "7")))
    assert all(not np.array_equal(a, b) for a, b in zip(pixels(read), pixels(plain)))
    meta = read_parameters(read / "samples" / "00001.png")["extra"]["reference"]
    assert meta["read"] == str(ref) and meta["reference_run"]["seed"] == 42

    # refused: overwriting the reference, another image size, another model, share flags on read
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "x", "--write-reference", ref)), "never overwritten")
    assert_one_line_error(run_at(128, tiny_ckpt, tmp_path / "x", "--read-reference", ref),
                          "recorded with H 64, this run uses 128")
    assert_one_line_error(txt2img("--config", TINY_CONFIG, "--random-weights", "--n_samples", 2, "--ddim_steps", 4,
                                  "--skip_grid", "--outdir", tmp_path / "x", "--read-reference", ref), "another model")
    assert_one_line_error(txt2img(*args(tiny_ckpt, tmp_path / "x", "--read-reference", ref, "--share-groups", "outer")),
                          "uses the settings the reference was recorded with")
    assert not (tmp_path / "x" / "samples").exists() or not pixels(tmp_path / "x")


def run_at(size, ckpt, outdir, *extra):
    from test_cli import run
    return run("txt2img.py", "--H", size, "--W", size, *args(ckpt, outdir, *extra))
