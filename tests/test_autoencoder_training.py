"""Upstream's first-stage training (configs/autoencoder/*.yaml: an autoencoder against a
discriminator, two optimizers, gradients accumulated over two batches) on pytorch-lightning 2,
which steps several optimizers only by hand and then accumulates nothing. The real losses run,
with small stand-ins for taming-transformers' LPIPS and discriminator (gan_stand_ins.py)."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
# the perceptual loss stays in eval mode on purpose (as upstream's LPIPS; main.py says the same)
pytestmark = pytest.mark.filterwarnings("ignore:Found 1 module\\(s\\) in eval mode")

from conftest import REPO  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL, VQModel  # noqa: E402
from ldm.models.lightning import lightning_module  # noqa: E402
from ldm.modules.ema import LitEma  # noqa: E402

DDCONFIG = dict(double_z=True, z_channels=2, resolution=8, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TRAIN_CONFIG = REPO / "tests" / "configs" / "tiny-autoencoder-train.yaml"


def build(cls, disc_start):
    if cls is AutoencoderKL:
        loss = {"target": "gan_stand_ins.LPIPSWithDiscriminator",
                "params": {"disc_start": disc_start, "kl_weight": 1e-6, "disc_weight": 0.5}}
        model = lightning_module(cls)(ddconfig=DDCONFIG, lossconfig=loss, embed_dim=2)
    else:
        loss = {"target": "gan_stand_ins.VQLPIPSWithDiscriminator",
                "params": {"disc_start": disc_start, "disc_weight": 0.5, "n_classes": 16}}
        model = lightning_module(cls)(ddconfig={**DDCONFIG, "double_z": False}, lossconfig=loss,
                                      n_embed=16, embed_dim=2)
    model.learning_rate = 1e-3  # main.py sets it from base_learning_rate
    return model


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


class Changes(pl.Callback):
    """After every batch: have the decoder and the discriminator changed since the batch before?"""
    def on_train_batch_start(self, trainer, model, *args):
        self.before = snapshot(model.decoder), snapshot(model.loss.discriminator)

    def on_train_batch_end(self, trainer, model, *args):
        now = model.decoder, model.loss.discriminator
        self.seen.append(tuple(any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
                               for before, module in zip(self.before, now, strict=True)))

    def on_train_start(self, trainer, model):
        self.seen = []


def fit(model, batches, accumulate, logdir):
    model.accumulate_grad_batches = accumulate
    calls = []  # (optimizer_idx, global_step) of every loss call
    forward = model.loss.forward
    model.loss.forward = lambda *args, **kwargs: calls.append(args[3:5]) or forward(*args, **kwargs)
    changes = Changes()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=pl.loggers.CSVLogger(logdir), log_every_n_steps=1,
                         limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[changes])
    images = torch.rand(2 * batches, 8, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.fit(model, torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=2))
    return trainer, calls, changes.seen


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel], ids=lambda c: c.__name__)
def test_each_batch_trains_the_autoencoder_then_the_discriminator_from_disc_start_on(cls, tmp_path):
    trainer, calls, changed = fit(build(cls, disc_start=2), batches=3, accumulate=1, logdir=tmp_path)
    # the loss's step is the number of updates so far, as Lightning 1's global_step was (Lightning
    # 2's counts both optimizers' steps: 6)
    assert calls == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)] and trainer.global_step == 6
    # (decoder, discriminator) changed in each batch: the discriminator has no loss before step 2
    assert changed == [(True, False), (True, False), (True, True)]


def test_gradients_add_up_over_accumulate_grad_batches(tmp_path):
    trainer, calls, changed = fit(build(AutoencoderKL, disc_start=0), batches=5, accumulate=2, logdir=tmp_path)
    assert [step for _, step in calls] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2] and trainer.global_step == 6
    # updates after the second and fourth batch, and after the last one, though it is alone
    assert changed == [(False, False), (True, True), (False, False), (True, True), (True, True)]


def test_the_ema_averages_once_per_update(tmp_path):
    """VQModel's EMA (use_ema) averaged after every batch: with accumulate 2, twice per update."""
    model = build(VQModel, disc_start=0)
    model.use_ema, model.model_ema = True, LitEma(model)
    fit(model, batches=5, accumulate=2, logdir=tmp_path)
    assert model.model_ema.num_updates == 3  # after the second, the fourth and the last batch


def train_main(logdir, *args):
    """main.py training the tiny autoencoder config (its losses' stand-ins from tests/) on the CPU;
    --devices 1 unless `args` give it, as a later flag wins."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "tests"))
    return subprocess.run([sys.executable, "main.py", "--base", str(TRAIN_CONFIG), "-t", "--accelerator", "cpu",
                           "--devices", "1", "--logdir", str(logdir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_main_trains_the_kl_autoencoder_config_with_accumulation(tmp_path):
    """main.py, as upstream trained configs/autoencoder/*.yaml: the trainer's
    accumulate_grad_batches (2 there) moves to the model, which Lightning 2 would refuse."""
    result = train_main(tmp_path, "--max_steps", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    factors = [float(r["train/disc_factor"]) for r in rows if r.get("train/disc_factor")]
    # 8 optimizer steps = 4 updates of 2 batches each; disc_start 2 (updates): off, off, on, on
    assert factors == [0.0] * 4 + [1.0] * 4
    assert any((run_dir / "csv" / "version_0" / "images" / "train").glob("reconstructions_*.png"))


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel], ids=lambda c: c.__name__)
def test_validation_logs_the_reconstruction_loss(cls, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    images = torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (metrics,) = trainer.validate(build(cls, disc_start=0),
                                  torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=2),
                                  verbose=False)
    # VQModel validates twice, with its weights and with their EMA (the same here: use_ema is off)
    names = {"val/rec_loss"} | ({"val_ema/rec_loss"} if cls is VQModel else set())
    assert names <= metrics.keys() and all(metrics[name] > 0 for name in names)


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel], ids=lambda c: c.__name__)
def test_validation_counts_disc_start_in_updates_as_training_does(cls, monkeypatch):
    """At Lightning 2's global_step 6 (3 updates of both optimizers) a disc_start of 4 has not come:
    validation passed the raw step and logged the discriminator as on."""
    model = build(cls, disc_start=4).eval()  # as Lightning validates
    monkeypatch.setattr(type(model), "global_step", property(lambda self: 6))
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logged.update(values))
    monkeypatch.setattr(model, "log", lambda name, value, **kwargs: logged.update({name: value}))
    images = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        model.validation_step({"image": images}, 0)
    assert model.updates == 3 and float(logged["val/disc_factor"]) == 0.0


def test_a_half_precision_posterior_samples_in_its_dtype():
    """The noise was drawn in float32 and the sample came back float32: a bf16 decoder refused it."""
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16))
    assert posterior.sample().dtype == torch.bfloat16
    model = build(AutoencoderKL, disc_start=0).to(torch.bfloat16)
    with torch.no_grad():
        reconstruction, _ = model(torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16))  # samples the posterior
    assert reconstruction.dtype == torch.bfloat16


def test_vq_codes_decode_to_what_the_quantized_latents_decode_to():
    """decode_code called a quantizer method that does not exist (upstream's too)."""
    model = build(VQModel, disc_start=0).eval()
    with torch.no_grad():
        quant, _, (_, _, indices) = model.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
        codes = indices.reshape(2, *quant.shape[2:])
        # (the straight-through latents differ from the codebook vectors by rounding only)
        assert torch.allclose(model.decode_code(codes), model.decode(quant), atol=1e-5)


def test_the_ema_reconstruction_of_a_segmentation_model_reads_the_segmentation():
    """With more than 3 channels the EMA pass got the 3-channel picture of the input."""
    model = lightning_module(VQModel)(ddconfig={**DDCONFIG, "double_z": False, "in_channels": 5, "out_ch": 5},
                                      lossconfig={"target": "gan_stand_ins.VQLPIPSWithDiscriminator",
                                                  "params": {"disc_start": 0, "disc_in_channels": 5}},
                                      n_embed=16, embed_dim=2, image_key="segmentation", colorize_nlabels=5,
                                      use_ema=True)
    segmentation = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 8, 8)), 5).float()
    with torch.no_grad():
        log = model.log_images({"segmentation": segmentation}, plot_ema=True)
    assert log["reconstructions_ema"].shape == (2, 3, 8, 8)


def test_settings_the_losses_and_the_kl_autoencoder_cannot_use_are_config_errors():
    from ldm.modules.losses import contperceptual, vqperceptual
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="lossconfig.params.disc_loss is 'foo'; it takes one of 'hinge', 'vanilla'"):
        contperceptual.LPIPSWithDiscriminator(disc_start=0, disc_loss="foo")
    with pytest.raises(ConfigError, match="lossconfig.params.pixel_loss is 'l3'"):
        vqperceptual.VQLPIPSWithDiscriminator(disc_start=0, pixel_loss="l3")
    with pytest.raises(ConfigError, match="AutoencoderKL needs model.params.ddconfig.double_z: true"):
        lightning_module(AutoencoderKL)(ddconfig={**DDCONFIG, "double_z": False}, embed_dim=2,
                                        lossconfig={"target": "torch.nn.Identity"})


def test_a_vq_loss_without_n_classes_trains_without_the_perplexity_log(tmp_path):
    """It asserted n_classes at the first training step (the perplexity log needs the codebook size)."""
    model = build(VQModel, disc_start=0)
    model.loss.n_classes = None
    trainer, _, _ = fit(model, batches=1, accumulate=1, logdir=tmp_path)
    assert trainer.global_step == 2


@pytest.mark.skipif(importlib.util.find_spec("taming") is not None, reason="taming-transformers is installed")
def test_the_autoencoder_configs_without_taming_are_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--base", "configs/autoencoder/autoencoder_kl_32x32x4.yaml",
                             "-t", "--accelerator", "cpu", "--devices", "1", "--logdir", str(tmp_path)],
                            cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "The LPIPS/discriminator training losses need taming-transformers" in result.stderr.strip().splitlines()[-1]


def test_main_trains_an_autoencoder_on_two_devices(tmp_path):
    """Each optimizer's pass leaves the other's parameters without gradients, which Lightning 2's
    default DDP refuses (Lightning 1.4's looked for them): main.py asks DDP to (two CPU processes)."""
    result = train_main(tmp_path, "--max_steps", "4", "--devices", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_several_devices_reads_devices_as_the_trainer_will():
    import main
    assert not main.several_devices({"accelerator": "cpu", "devices": 1})
    assert main.several_devices({"accelerator": "cpu", "devices": "2"})
    assert main.several_devices({"accelerator": "gpu", "devices": [0, 1]})
    assert not main.several_devices({"accelerator": "gpu", "devices": "0,"})
    assert main.several_devices({"accelerator": "cpu"}) is False


def test_gradients_are_clipped_before_each_optimizer_steps(tmp_path, monkeypatch):
    """Lightning 2 refuses the trainer's gradient_clip_val for models that step their optimizers
    themselves (main.py failed with a traceback): main.py moves it to the model, which clips."""
    model = build(AutoencoderKL, disc_start=0)
    model.gradient_clip_val, model.gradient_clip_algorithm = 0.5, "value"
    clipped = []
    monkeypatch.setattr(model, "clip_gradients", lambda optimizer, **kwargs: clipped.append(kwargs))
    fit(model, batches=3, accumulate=1, logdir=tmp_path)
    assert clipped == 6 * [{"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}]  # 3 updates, 2 optimizers
    result = train_main(tmp_path / "logs", "--max_steps", "2", "lightning.trainer.gradient_clip_val=1.0")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (REPO / "models" / "first_stage_models").glob(
    "vq-*/config.yaml")))
def test_the_released_vq_configs_name_a_loss_that_takes_the_code_indices(folder):
    """They named taming's loss, whose forward takes no predicted_indices, which VQModel passes: the
    first training step was a TypeError. ldm's copy takes them, with the codebook size."""
    from omegaconf import OmegaConf
    from gan_stand_ins import stand_in_gan_parts
    from ldm.modules.losses import vqperceptual
    from ldm.util import instantiate_from_config
    params = OmegaConf.load(REPO / "models" / "first_stage_models" / folder / "config.yaml").model.params
    with stand_in_gan_parts(vqperceptual):
        loss = instantiate_from_config(params.lossconfig)
    assert isinstance(loss, vqperceptual.VQLPIPSWithDiscriminator) and loss.n_classes == params.n_embed


def test_fp16_gradients_are_clipped_once_unscaled(tmp_path, monkeypatch):
    """Clipping before optimizer.step() saw fp16's scaled gradients (unscaled inside step):
    gradient_clip_val / scale was the real threshold. Lightning's hook comes after the unscaling."""
    from pytorch_lightning.plugins.precision import MixedPrecision
    from torch.amp.grad_scaler import OptState
    scaler = torch.amp.GradScaler("cpu")
    model = build(AutoencoderKL, disc_start=0)
    model.gradient_clip_val = 0.5
    stages = []
    monkeypatch.setattr(model, "clip_gradients", lambda optimizer, **kwargs: stages.append(
        scaler._per_optimizer_states[id(optimizer)]["stage"]))
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    images = torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer.fit(model, torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=2))
    assert stages and all(stage == OptState.UNSCALED for stage in stages), stages
