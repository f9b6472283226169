"""DDPM and LatentDiffusion settings: a noise schedule the model cannot sample with is a ConfigError when
it is built, the variational bound weighs x0 and eps predictions alike, and the pixel-space DDPM
trains with the scheduler and learned log-variance its config asks for (upstream's ignored both)."""
import pytest
import torch
from safetensors.torch import save_file

from ldm.models.diffusion.ddpm import DDPM, SCHEDULE_BUFFERS
from ldm.util import ConfigError

UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
                       num_res_blocks=1, channel_mult=[1], num_heads=1)}


def ddpm(**settings):
    torch.manual_seed(0)
    return DDPM(unet_config=UNET, image_size=8, timesteps=20, use_ema=False, **settings)


@pytest.mark.parametrize("settings, message", [
    ({"beta_schedule": "cosin"}, "model.params.beta_schedule is 'cosin'; it takes one of 'linear', 'cosine'"),
    ({"linear_start": -1.0}, "model.params.linear_start and linear_end must be positive, got -1.0 and 0.02"),
    ({"linear_end": 1.2}, "model.params: the noise schedule's betas must lie in (0, 1), got 0.0001 to 1.2 "
                          "(beta_schedule linear, linear_start 0.0001, linear_end 1.2)"),
    ({"given_betas": [0.1] * 19 + [1.0]}, "betas must lie in (0, 1), got 0.1 to 1 (given_betas)"),
])
def test_a_schedule_the_model_cannot_sample_with_is_a_config_error(settings, message):
    """Upstream: a ValueError traceback, a complex linspace, or NaN alphas after numpy warnings
    (and txt2img still wrote its PNGs)."""
    with pytest.raises(ConfigError) as raised:
        ddpm(**settings)
    assert message in str(raised.value)


def test_given_betas_may_be_a_list():
    assert torch.allclose(ddpm(given_betas=[0.01] * 20).betas, torch.full((20,), 0.01))


def test_the_bound_weighs_x0_errors_as_the_eps_errors_they_make():
    """|x0 - x0'|² = (1 - ᾱ)/ᾱ · |eps - eps'|² at one x_t: the two weights must agree through that
    factor (upstream's x0 weight was 0.5 at t = 1 of this 20-step schedule instead of 3705)."""
    eps, x0 = ddpm(), ddpm(parameterization="x0")
    ratio = (1 - eps.alphas_cumprod) / eps.alphas_cumprod
    torch.testing.assert_close((x0.lvlb_weights * ratio)[1:], eps.lvlb_weights[1:], rtol=1e-3, atol=0)


def test_the_pixel_ddpm_trains_its_learned_logvar_and_takes_its_scheduler():
    model = ddpm(learn_logvar=True, scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [1e-6], "f_max": [1.0],
                   "f_min": [1.0]}})
    model.learning_rate = 1e-4
    optimizers, schedulers = model.configure_optimizers()
    assert schedulers[0]["scheduler"].get_last_lr() == [pytest.approx(1e-10)]  # f_start · lr at step 0
    loss, logged = model.p_losses(torch.randn(2, 3, 8, 8), torch.tensor([3, 17]))
    loss.backward()
    assert model.logvar.grad is not None and model.logvar.grad[[3, 17]].abs().min() > 0
    assert {"train/loss_gamma", "logvar"} <= set(logged)


def test_a_learned_logvar_comes_back_from_ckpt_path(tmp_path):
    saved = ddpm(learn_logvar=True)
    with torch.no_grad():
        saved.logvar.fill_(3.0)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "ddpm.safetensors"))
    loaded = ddpm(learn_logvar=True, ckpt_path=str(tmp_path / "ddpm.safetensors"))
    assert torch.equal(loaded.logvar, torch.full((20,), 3.0))


def test_positional_encodings_are_refused_when_built():
    """Upstream accepted the option and failed at the first batch: AttributeError, no
    compute_latent_shifts."""
    with pytest.raises(ConfigError, match="use_positional_encodings is not implemented"):
        ddpm(use_positional_encodings=True)


def latent_diffusion(**settings):
    from omegaconf import OmegaConf
    from conftest import TINY_CONFIG
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.update(settings)
    torch.manual_seed(0)
    return instantiate_from_config(config.model)


def test_scale_by_std_with_a_scale_factor_is_refused_by_a_new_training_only(monkeypatch):
    """Upstream asserted at the first batch of a new training; a model built to sample, or with a
    checkpoint's scale, takes both settings."""
    from lightning_utilities.core.rank_zero import rank_zero_only
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)  # Lightning sets it for a training
    model = latent_diffusion(scale_by_std=True, scale_factor=0.18215)
    model.current_epoch = model.global_step = 0  # what Lightning gives the first batch
    batch = {"jpg": torch.rand(1, 64, 64, 3) * 2 - 1, "txt": ["a chair"]}
    with pytest.raises(ConfigError, match="scale_by_std computes scale_factor from the first batch, and "
                                          "scale_factor is 0.18215: leave one of them out"):
        model.on_train_batch_start(batch, 0)
    model.scale_factor.fill_(1.0)
    model.on_train_batch_start(batch, 0)
    assert model.scale_factor != 1.0


@pytest.mark.parametrize("saved_scale_by_std", [True, False])
def test_scale_by_std_recomputes_the_scale_only_where_the_checkpoint_has_none(tmp_path, saved_scale_by_std):
    """Fine-tuning from weights saved with scale_by_std off (no scale_factor key) kept upstream at
    1.0 for good: the first batch computes it now; a checkpoint's own scale_factor is kept."""
    saved = latent_diffusion(scale_by_std=saved_scale_by_std, scale_factor=1.0)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "ldm.safetensors"))
    assert ("scale_factor" in saved.state_dict()) is saved_scale_by_std
    loaded = latent_diffusion(scale_by_std=True, scale_factor=1.0, ckpt_path=str(tmp_path / "ldm.safetensors"))
    assert loaded.restarted_from_ckpt is saved_scale_by_std


def test_a_hybrid_model_says_what_conditioning_it_takes():
    model = latent_diffusion(conditioning_key="hybrid")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([5])
    with pytest.raises(ValueError, match="a hybrid model .conditioning_key: hybrid. takes its conditioning as a dict"):
        model.apply_model(x, t, torch.randn(1, 77, 32))
    context = torch.randn(1, 77, 32)
    model.model.diffusion_model.input_blocks[0][0] = torch.nn.Conv2d(8, 32, 3, padding=1)  # x and c_concat: 8 in
    out = model.apply_model(x, t, {"c_concat": [torch.randn(1, 4, 8, 8)], "c_crossattn": [context]})
    assert out.shape == x.shape


def test_a_pixel_ddpms_ckpt_path_keeps_the_configs_schedule(tmp_path):
    """Loading moved after the schedule (for a learned logvar) must not let the checkpoint's
    schedule replace the config's, which upstream's order kept for this class."""
    saved = ddpm()
    with torch.no_grad():
        saved.model.diffusion_model.input_blocks[0][0].weight.add_(1.0)  # not what ddpm() initialises
    assert {key for key in saved.state_dict() if "." not in key} == set(SCHEDULE_BUFFERS)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "ddpm.safetensors"))
    loaded = ddpm(linear_end=0.012, ckpt_path=str(tmp_path / "ddpm.safetensors"))
    assert loaded.betas[-1].item() == pytest.approx(0.012)
    assert torch.equal(loaded.model.diffusion_model.input_blocks[0][0].weight,
                       saved.model.diffusion_model.input_blocks[0][0].weight)
    shorter = DDPM(unet_config=UNET, image_size=8, timesteps=10, use_ema=False,
                   ckpt_path=str(tmp_path / "ddpm.safetensors"))
    assert shorter.num_timesteps == 10


def test_patchwise_crops_must_tile_the_input():
    """split_input_params (set by callers) folded crops that did not reach the input's edge: those
    pixels came back NaN. Crops that tile it give the whole-input result."""
    model = latent_diffusion()
    model.model.forward = lambda x, t, **conditioning: torch.tanh(x) * 2  # pixel by pixel: crops change nothing
    model.split_input_params = {"ks": (4, 4), "stride": (2, 2), "patch_distributed_vq": False, "vqf": 1,
                                "tie_braker": False, "clip_min_weight": 0.01, "clip_max_weight": 0.5}
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.zeros(1, 77, 32)
    torch.testing.assert_close(model.apply_model(x, t, context), torch.tanh(x) * 2)
    model.split_input_params.update(stride=(3, 3))
    with pytest.raises(ValueError, match=r"crops of \(4, 4\) every \(3, 3\) do not tile a 8x8 input"):
        model.apply_model(x, t, context)
