"""scripts/heldout_loss.py: paired held-out loss of weight files, on the shipped 16 px model."""
import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO
from test_cli import assert_ok, assert_one_line_error, run
from test_embedded_16px import CONFIG, WEIGHTS as REPO_WEIGHTS


def rows_of(stdout):
    """[(path, loss, difference to the first)] from the printed table."""
    rows = [line.split("|")[1:4] for line in stdout.splitlines() if line.startswith("| ") and "±" in line]
    return [(path.strip(), float(loss.split("±")[0]), float(diff.split("±")[0])) for path, loss, diff in rows]


def test_paired_losses_rank_a_broken_copy_below_the_shipped_weights(tmp_path):
    weights = load_file(REPO / REPO_WEIGHTS)
    out_conv = [k for k in weights if k.startswith("model.diffusion_model.out.2.")]
    assert out_conv, sorted(weights)[:5]
    broken = {k: v.clone().zero_() if k in out_conv else v for k, v in weights.items()}  # predicts zero noise
    save_file(broken, tmp_path / "broken.safetensors")

    result = run("heldout_loss.py", "--config", CONFIG, "--ckpt", REPO_WEIGHTS, tmp_path / "broken.safetensors",
                 REPO_WEIGHTS, "--n", "48", "--batch-size", "16", "--threads", "1")
    assert_ok(result)
    shipped, broken, again = rows_of(result.stdout)
    assert [shipped[0], broken[0], again[0]] == [REPO_WEIGHTS, str(tmp_path / "broken.safetensors"), REPO_WEIGHTS]
    assert 0.002 < shipped[1] < 0.05 and shipped[2] == 0.0, shipped
    assert again[1:] == shipped[1:]  # the same file again: the same scenes, timesteps and noise
    assert 0.8 < broken[1] < 1.2 and broken[2] > 0.7, broken  # zero prediction: the loss is E[noise²] = 1


def test_a_checkpoint_with_an_ema_copy_is_scored_on_it_as_txt2img_samples_with_it(tmp_path):
    """A training .ckpt holds the raw weights and the EMA copy (model_ema.*, LitEma's names); txt2img
    samples with the copy, and so must the loss that compares it with an export."""
    weights = load_file(REPO / REPO_WEIGHTS)
    ema = {f"model_ema.{k[len('model.'):].replace('.', '')}": v.clone()  # LitEma's buffer names
           for k, v in weights.items() if k.startswith("model.diffusion_model.")}
    raw = {k: v.clone().zero_() if k.startswith("model.diffusion_model.out.2.") else v for k, v in weights.items()}
    save_file({**raw, **ema}, tmp_path / "last-ema.safetensors")

    result = run("heldout_loss.py", "--config", CONFIG, "--ckpt", REPO_WEIGHTS, tmp_path / "last-ema.safetensors",
                 "--n", "16", "--batch-size", "16", "--threads", "1")
    assert_ok(result)
    shipped, with_ema = rows_of(result.stdout)
    assert with_ema[1:] == shipped[1:3] and with_ema[2] == 0.0, (shipped, with_ema)


def test_a_missing_weight_file_is_one_error_line(tmp_path):
    assert_one_line_error(run("heldout_loss.py", "--config", CONFIG, "--ckpt", tmp_path / "none.safetensors"),
                          "none.safetensors", "no such file")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_out_of_range_is_one_error_line(seed):
    assert_one_line_error(run("heldout_loss.py", "--ckpt", REPO_WEIGHTS, "--n", "8", "--seed", seed),
                          f"--seed must be between 0 and 4294967295, got {seed}")


def test_without_config_the_weights_choose_it(tmp_path):
    result = run("heldout_loss.py", "--ckpt", REPO_WEIGHTS, "--n", "8", "--batch-size", "8")
    assert_ok(result)
    assert "8 validation scenes of configs/embedded/procedural-t2i-16px.yaml" in result.stdout
    unknown = tmp_path / "weights.safetensors"  # weights that say nothing of their model: a layout no config names
    save_file({key: t for key, t in load_file(REPO / REPO_WEIGHTS).items() if not key.startswith("cond_stage")},
              unknown)
    assert_one_line_error(run("heldout_loss.py", "--ckpt", unknown), f"the weights {unknown} do not say which model",
                          "pass --config")


def test_a_weight_file_cut_off_is_one_error_line_before_any_is_scored(tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((REPO / REPO_WEIGHTS).read_bytes()[:-1])
    result = run("heldout_loss.py", "--config", CONFIG, "--ckpt", REPO_WEIGHTS, cut, "--n", "8")
    assert_one_line_error(result, f"--ckpt: {cut} is not a whole checkpoint")
    assert "Loading model weights" not in result.stderr


def test_a_config_without_validation_data_is_one_error_line():
    result = run("heldout_loss.py", "--config", "configs/stable-diffusion/v1-inference.yaml", "--ckpt", REPO_WEIGHTS)
    assert_one_line_error(result, "data.params.validation")


def tiny_latent_model(tmp_path):
    """v1-tiny (a KL first stage, random weights) with the procedural validation data, as one config."""
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    config = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-tiny.yaml"),
                             OmegaConf.load(REPO / "tests" / "configs" / "tiny-train-data.yaml"))
    OmegaConf.save(config, tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    torch.nn.init.normal_(model.model.diffusion_model.out[2].weight, std=0.1)  # zero at init: the loss read no x
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    return tmp_path / "config.yaml", tmp_path / "model.safetensors"


def test_a_kl_first_stage_draws_the_same_latents_for_every_file(tmp_path):
    """Its posterior was sampled from the unseeded global generator: the same file twice differed."""
    config, weights = tiny_latent_model(tmp_path)
    result = run("heldout_loss.py", "--config", config, "--ckpt", weights, weights, "--n", "8", "--batch-size", "4")
    assert_ok(result)
    first, again = rows_of(result.stdout)
    assert again[1:] == first[1:] and again[2] == 0.0, (first, again)


def test_a_config_whose_data_or_text_cannot_be_read_is_one_error_line(tmp_path):
    assert_one_line_error(run("heldout_loss.py", "--config", "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml",
                              "--ckpt", REPO_WEIGHTS), "validation dataset (ldm.data.lsun.LSUNChurchesValidation) "
                                                       "cannot give 1024 scenes here")
    assert_one_line_error(run("heldout_loss.py", "--config", "docs/first-command.png", "--ckpt", REPO_WEIGHTS),
                          "cannot read config docs/first-command.png")
