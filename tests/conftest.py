import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "tests" / "shim"
TINY_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-tiny.yaml"

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(SHIM))
sys.path.insert(0, str(REPO))

import ldm_test_fallbacks  # noqa: E402  (TEST-ONLY stand-ins, no-op once the real ones exist)

ldm_test_fallbacks.install()


@pytest.fixture(scope="session")
def tiny_model():
    import torch
    from omegaconf import OmegaConf
    import ldm.util

    torch.manual_seed(0)
    config = OmegaConf.load(TINY_CONFIG)
    return ldm.util.load_model_from_config(config, None, torch.device("cpu"), random_weights=True)
