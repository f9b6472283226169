"""Shared test fixtures. Tests never touch the Hugging Face hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "stable-diffusion", "v1-tiny.yaml")
FULL_CONFIG = os.path.join(REPO, "configs", "stable-diffusion", "v1-inference.yaml")


def require_latent_diffusion():
    """Skip the calling test when ldm.models.diffusion.ddpm cannot be imported in this environment."""
    try:
        import ldm.models.diffusion.ddpm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ldm.models.diffusion.ddpm does not import here: {e}")


@pytest.fixture
def tiny_config():
    """configs/stable-diffusion/v1-tiny.yaml: SD v1's layout, small enough for a CPU."""
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture
def tiny_model(tiny_config):
    """The tiny LatentDiffusion with random weights (seed 0), on the CPU, in eval mode."""
    require_latent_diffusion()
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config.model).eval()
