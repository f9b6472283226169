"""configs/embedded/procedural-t2i.yaml: the small pixel-space text-to-image model trained on
the procedural scenes builds, has the three consistency groups, and trains its text encoder."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO

EMBEDDED_CONFIG = REPO / "configs" / "embedded" / "procedural-t2i.yaml"
EMBEDDED_16PX_CONFIG = REPO / "configs" / "embedded" / "procedural-t2i-16px.yaml"


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def config():
    return OmegaConf.load(EMBEDDED_CONFIG)


@pytest.fixture(scope="module")
def model(config):
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    return instantiate_from_config(config.model)


def test_parameter_count_fits_one_16_mib_float16_file(model):
    unet, text = count(model.model), count(model.cond_stage_model)
    assert 3e6 < unet < 6e6
    assert 2e6 < text < 4e6
    assert (unet + text) * 2 < 16 * 2**20  # the float16 export must fit a 16 MiB file


def test_all_three_consistency_groups_have_self_attention(model):
    from ldm.modules.consistency import Group, self_attention_sites
    groups = {site.group for site, _ in self_attention_sites(model)}
    assert groups == set(Group)
    sides = {(site.group, site.side) for site, _ in self_attention_sites(model)}
    assert (Group.INNER, "middle") in sides


def test_the_16px_stand_in_has_the_same_groups_with_a_sixth_of_the_unet():
    from ldm.modules.consistency import Group, self_attention_sites
    from ldm.util import instantiate_from_config
    model = instantiate_from_config(OmegaConf.load(EMBEDDED_16PX_CONFIG).model)
    assert {site.group for site, _ in self_attention_sites(model)} == set(Group)
    assert model.image_size == 16 and model.channels == 3 and model.clip_denoised
    assert count(model.model) < 1e6  # 739,939 against 4,306,243


def test_pixel_space_first_stage_and_trainable_text_encoder(model):
    from ldm.models.autoencoder import IdentityFirstStage
    assert isinstance(model.first_stage_model, IdentityFirstStage)
    assert model.scale_factor == 1.0 and model.channels == 3 and model.image_size == 32
    assert model.clip_denoised  # samplers keep predicted x0 in the pixels' [-1, 1]
    assert model.cond_stage_trainable
    assert all(p.requires_grad for p in model.cond_stage_model.parameters())
    assert model.cond_stage_model.max_length == 32


def test_optimizer_covers_unet_and_text_encoder(model):
    model.learning_rate = 1.5e-4
    optimizers, _ = model.configure_optimizers()
    optimized = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.model.parameters()} <= optimized
    assert {id(p) for p in model.cond_stage_model.parameters()} <= optimized


def test_training_steps_give_finite_loss_and_reach_the_text_encoder(config):
    """The UNet's output layers start at zero (zero_module), so the first step only trains
    those; from the third step on the loss gradient reaches the caption embedding."""
    from ldm.data.procedural import ProceduralScenes
    from ldm.util import instantiate_from_config
    from torch.utils.data import default_collate
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).train()
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()[0][0]
    data = ProceduralScenes(**OmegaConf.to_container(config.data.params.train.params) | {"length": 2})
    batch = default_collate([data[0], data[1]])
    batch["caption"] = ["a red chair on the left", "a face with blue eyes"]  # no empty caption
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss, loss_dict = model.shared_step(batch)
        loss.backward()
        assert torch.isfinite(loss) and 0.1 < loss.item() < 10
        optimizer.step()
    assert set(loss_dict) >= {"train/loss", "train/loss_simple"}
    token_grad = model.cond_stage_model.transformer.embeddings.token_embedding.weight.grad
    caption_ids = model.cond_stage_model.tokenize(batch["caption"]).unique()
    assert token_grad[caption_ids].abs().sum(dim=1).gt(0).all()  # every caption token learns
    unused = torch.ones(len(token_grad), dtype=torch.bool)
    unused[caption_ids] = False
    assert token_grad[unused].abs().sum() == 0


def test_caption_token_budget_covers_the_longest_training_captions(model):
    from ldm.data.procedural import ProceduralScenes
    data = ProceduralScenes(size=32, length=2000, seed=0)
    longest = max(len(model.cond_stage_model.tokenizer(data.scene(i)[1])["input_ids"]) for i in range(2000))
    assert longest <= model.cond_stage_model.max_length


def test_image_logger_arguments_fit_the_model(config, model):
    import main
    logger_params = OmegaConf.to_container(config.lightning.callbacks.image_logger.params)
    assert main.ImageLogger(**logger_params).check_arguments(model) is None
    misspelt = dict(logger_params, log_images_kwargs={"ddim_step": 50})
    assert "'ddim_step'" in main.ImageLogger(**misspelt).check_arguments(model)
