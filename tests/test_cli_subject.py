"""txt2img --subject / --share-adain as a user runs them, on the tiny config (subprocesses)."""
import numpy as np

from conftest import TINY_CONFIG
from ldm.image_io import read_parameters
from test_cli import assert_ok, assert_one_line_error
from test_cli_consistency import args, pixels, txt2img

PROMPTS = ["--prompt", "a red chair in a kitchen", "--prompt", "a red chair on a beach",
           "--prompt", "a red chair at night"]


def test_subject_masks_and_adain_with_per_image_prompts(tmp_path, tiny_ckpt):  # noqa: F811
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    assert_ok(txt2img(*args(tiny_ckpt, plain, *PROMPTS)))
    assert_ok(txt2img(*args(tiny_ckpt, shared, *PROMPTS, "--consistent-attn", "--share-mode", "anchor",
                            "--share-groups", "all", "--subject", "chair", "--share-adain")))
    before, after = pixels(plain), pixels(shared)
    assert np.array_equal(after[0], before[0])  # the anchor stays the plain image, AdaIN and masks included
    assert all(not np.array_equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))
    meta = read_parameters(shared / "samples" / "00002.png")
    assert meta["prompt"] == "a red chair at night"
    assert meta["extra"]["consistent_attn"]["subjects"] == ["chair"]
    assert meta["extra"]["consistent_attn"]["adain"] is True


def test_subject_missing_from_a_prompt_is_one_error_line_before_the_model_loads(tmp_path):
    # a checkpoint that cannot load: the tokenizer comes from the config, so the word is checked first
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    result = txt2img("--config", TINY_CONFIG, "--ckpt", broken, "--n_samples", 2, "--ddim_steps", 2,
                     "--outdir", tmp_path, "--consistent-attn", "--subject", "chair",
                     "--prompt", "a red chair", "--prompt", "two blue chairs")
    assert_one_line_error(result, "txt2img.py: error: --subject 'chair' is not a word of prompt 2 'two blue chairs'",
                          "put the word in every prompt, or drop --subject")
    assert result.returncode == 2
    assert not (tmp_path / "samples").exists()


def test_subject_without_consistent_attn_is_one_error_line(tmp_path):
    result = txt2img("--config", TINY_CONFIG, "--random-weights", "--outdir", tmp_path, "--subject", "chair")
    assert_one_line_error(result, "--subject takes effect only with --consistent-attn; add it")
