"""Upstream's noisy-latent classifier (ldm/models/diffusion/classifier.py: a class predictor on a
trained class-conditional LDM's noised latents, for classifier guidance) trains on
pytorch-lightning 2. Upstream's `get_x_noisy` asked DDPM for a continuous-noise mode no DDPM has,
so training stopped at the first batch."""
import pytest
import torch
from omegaconf import OmegaConf

pl = pytest.importorskip("pytorch_lightning")

from conftest import TINY_CONFIG  # noqa: E402
from ldm.models.diffusion.classifier import NoisyLatentImageClassifier  # noqa: E402
from ldm.models.lightning import lightning_module  # noqa: E402

N_CLASSES = 3  # fewer than the top-5 accuracy it reports (which raised an error below 5)


@pytest.fixture
def run_dir(tmp_path):
    """A main.py log folder of a class-conditional LDM (the tiny SD config with cin256's class
    embedder and attention heads by channel, as the attention pool needs): only its project config."""
    config = OmegaConf.load(TINY_CONFIG)
    params = config.model.params
    params.first_stage_key, params.cond_stage_key, params.cond_stage_trainable = "image", "class_label", True
    params.cond_stage_config = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                "params": {"embed_dim": 32, "n_classes": N_CLASSES, "key": "class_label"}}
    params.unet_config.params.num_head_channels = 16
    (tmp_path / "run" / "configs").mkdir(parents=True)
    OmegaConf.save(config, tmp_path / "run" / "configs" / "2026-12-05T00-00-00-project.yaml")
    return tmp_path / "run"


def test_the_classifier_trains_on_noisy_latents_and_leaves_the_diffusion_model_alone(run_dir, tmp_path):
    torch.manual_seed(0)
    model = lightning_module(NoisyLatentImageClassifier)(diffusion_path=str(run_dir), num_classes=N_CLASSES,
                                                         pool="attention")
    model.learning_rate = 1e-3  # main.py sets it from base_learning_rate
    diffusion, classifier = ([p.detach().clone() for p in m.parameters()]
                             for m in (model.diffusion_model, model.model))
    examples = [{"image": torch.rand(64, 64, 3) * 2 - 1, "class_label": i % N_CLASSES} for i in range(6)]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
                         limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(examples, batch_size=2)
    trainer.fit(model, loader, loader)

    assert trainer.global_step == 3 and torch.isfinite(trainer.logged_metrics["train/loss_step"])
    assert all(not torch.equal(b, p)
               for b, p in zip(classifier, model.model.parameters(), strict=True) if p.requires_grad)
    assert all(torch.equal(b, p) for b, p in zip(diffusion, model.diffusion_model.parameters(), strict=True))
    # validation measured the accuracy at every logged noise level of the trajectory
    assert set(model.noisy_acc) == set(range(0, 1000, 200)) and all(len(a["acc@1"]) == 1 for a in model.noisy_acc.values())
    assert all(a["acc@5"] == [1.0] for a in model.noisy_acc.values())  # the top 5 of 3 classes hold every label


def test_a_misspelt_unet_argument_is_an_error_not_ignored():
    """UNetModel.forward and EncoderUNetModel took **kwargs, so `contxt=` or a misspelt config key
    ran without them. The classifier drops the full UNet's own settings by name instead."""
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel
    from ldm.util import instantiate_from_config

    unet_config = OmegaConf.load(TINY_CONFIG).model.params.unet_config
    unet = instantiate_from_config(unet_config)
    with pytest.raises(TypeError, match="contxt"):
        unet(torch.zeros(1, 4, 8, 8), torch.zeros(1), contxt=torch.zeros(1, 1, 32))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        EncoderUNetModel(**unet_config.params)


def test_where_the_diffusion_model_or_the_label_is_wrong_it_says_so(run_dir, tmp_path):
    """A folder without the run's configs was an IndexError; the config's label_key lost to the
    diffusion model's cond_stage_key, and one the classifier cannot predict was a bare NotImplementedError."""
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match=f"model.params.diffusion_path {tmp_path}: no configs/\\*-project.yaml in it"):
        NoisyLatentImageClassifier(diffusion_path=str(tmp_path), num_classes=N_CLASSES)
    with pytest.raises(ConfigError, match="model.params.label_key is 'caption'; it takes one of 'class_label', "
                                          "'segmentation'"):
        NoisyLatentImageClassifier(diffusion_path=str(run_dir), num_classes=N_CLASSES, label_key="caption")
