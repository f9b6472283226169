"""Per-image prompts in one batch (repeated --prompt, --from-file): each image is conditioned on
its own text while consistent attention shares self-attention across the batch."""

import argparse

import pytest
import torch

from conftest import TINY_CONFIG, load_script
from ldm.script_helpers import prompt_batches

PROMPTS = ["a red chair", "a blue table", "a green face"]


@pytest.fixture(scope="module")
def txt2img():
    return load_script("txt2img")


@pytest.fixture(scope="module")
def model(tiny_model_with_weights):
    return tiny_model_with_weights


def options(txt2img, *argv):
    parser = txt2img.build_parser()
    base = ["--config", str(TINY_CONFIG), "--random-weights", "--H", "64", "--W", "64", "--ddim_steps", "3"]
    return txt2img.validate_options(parser, parser.parse_args(base + [str(a) for a in argv]))


def test_one_prompt_is_repeated_for_the_batch(txt2img):
    opt = options(txt2img, "--prompt", "a red chair", "--n_samples", 3)
    assert prompt_batches(opt) == [3 * ["a red chair"]]
    assert prompt_batches(options(txt2img, "--n_samples", 2)) == [2 * ["a painting of a virus monster "
                                                                             "playing guitar"]]


def test_repeated_prompt_gives_one_prompt_per_image(txt2img):
    argv = [a for p in PROMPTS for a in ("--prompt", p)]
    assert prompt_batches(options(txt2img, *argv, "--n_samples", 3)) == [PROMPTS]


def test_prompt_file_lines_are_the_images_of_a_batch(txt2img, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS + ["a chair at night", ""]) + "\n")
    batches = prompt_batches(options(txt2img, "--from-file", path, "--n_samples", 3))
    assert batches == [PROMPTS, ["a chair at night"]]
    # saved by Windows Notepad: a byte-order mark, CRLF line ends (the mark was part of prompt 1)
    path.write_bytes(("\r\n".join(PROMPTS) + "\r\n").encode("utf-8-sig"))
    assert prompt_batches(options(txt2img, "--from-file", path, "--n_samples", 3)) == [PROMPTS]


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "a", "--prompt", "b", "--n_samples", "3"], "2 prompts given (one per image of the batch) "
                                                             "but --n_samples is 3: pass --n_samples 2"),
    (["--prompt", "a", "--prompt", "b", "--n_samples", "2", "--from-file", "FILE"], "choose one source"),
    (["--prompt", "a", "--from-file", "FILE"], "choose one source"),  # upstream dropped the prompt silently
    (["--from-file", "EMPTY"], "has no prompts; pass a text file with one prompt per line"),
    # no unconditional half to keep plain: the flag would do nothing
    (["--consistent-attn", "--share-cfg", "cond", "--scale", "1"], "--scale 1 runs no unconditional half"),
    (["--write-reference", "NEW", "--share-cfg", "cond", "--scale", "1"], "--scale 1 runs no unconditional half"),
])
def test_prompt_count_mismatch_is_one_error_line(txt2img, tmp_path, capsys, argv, message):
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    files = {"FILE": str(tmp_path / "p.txt"), "EMPTY": str(tmp_path / "empty.txt"),
             "NEW": str(tmp_path / "new.safetensors")}
    argv = [files.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        options(txt2img, *argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_each_image_gets_its_own_prompt_and_the_batch_still_shares(txt2img, model, monkeypatch):
    argv = [a for p in PROMPTS for a in ("--prompt", p)]
    opt = options(txt2img, *argv, "--n_samples", 3, "--consistent-attn", "--share-mode", "anchor",
                  "--share-groups", "all")
    opt.C, opt.f = 4, 8
    [prompts] = prompt_batches(opt)
    sampler = txt2img.make_sampler(opt, model, txt2img.SAMPLERS)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    seen = []
    apply_model = model.apply_model
    monkeypatch.setattr(model, "apply_model", lambda x, t, c, *a, **k: seen.append(c) or apply_model(x, t, c, *a, **k))
    with torch.no_grad():
        shared = txt2img.sample_batch(opt, model, sampler, prompts, x_T)  # sharing as opt.consistency says
        plain_opt = argparse.Namespace(**{**vars(opt), "consistency": None, "run_anchors": None})
        plain = txt2img.sample_batch(plain_opt, model, sampler, prompts, x_T)
        cond = model.get_learned_conditioning(PROMPTS)
        uncond = model.get_learned_conditioning(3 * [""])
        singles = [model.get_learned_conditioning([p]) for p in PROMPTS]

    assert len(seen) == 2 * opt.ddim_steps
    for c in seen:  # guided_eps layout: [uncond; cond], the cond half in prompt order
        assert torch.equal(c[3:], cond) and torch.equal(c[:3], uncond)
    for i, single in enumerate(singles):  # row i is prompt i's text (not only a permutation of them)
        torch.testing.assert_close(cond[i:i + 1], single, rtol=1e-5, atol=1e-5)
        assert all(not torch.allclose(cond[j:j + 1], single) for j in range(3) if j != i)
    # anchor mode across different prompts: image 0 is the vanilla image, the others read it
    assert torch.equal(shared[0], plain[0])
    assert all(not torch.equal(shared[i], plain[i]) for i in (1, 2))


def test_a_prompt_longer_than_the_text_context_is_a_warning_naming_what_is_cut(txt2img, model, caplog):
    from ldm.script_helpers import warn_truncated_prompts
    tokens = lambda text: len(model.cond_stage_model.tokenizer(text, add_special_tokens=False)["input_ids"])
    filler = " ".join(["in a sunny room with plants"] * 12)
    long = f"a photo of a wooden chair {filler} and a cat"
    assert tokens(long) > 75 >= tokens(f"a photo of a wooden chair {filler}".rsplit(" room", 1)[0])
    opt = options(txt2img, "--prompt", long, "--prompt", "a red chair", "--prompt", long, "--n_samples", 3,
                  "--negative-prompt", "blurry")
    with caplog.at_level("WARNING"):
        warn_truncated_prompts(opt, model)
    [warning] = [r.getMessage() for r in caplog.records]  # once per distinct prompt; short ones are quiet
    assert f"is {tokens(long)} tokens long; the text encoder reads 75" in warning
    assert "from 'room with plants and a cat' on it has no effect" in warning
    caplog.clear()
    opt.negative_prompt = long
    with caplog.at_level("WARNING"):
        warn_truncated_prompts(opt, model)
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [
        "prompt 'a photo of a wooden chair in a sunny ro…'", "--negative-prompt"]
