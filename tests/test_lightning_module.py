"""ldm.models.lightning: main.py trains ldm's plain nn.Module models with LightningModule mixed in."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_CONFIG

pl = pytest.importorskip("pytorch_lightning")

from ldm.models.diffusion.ddpm import LatentDiffusion  # noqa: E402
from ldm.models.lightning import TrainableModule, lightning_module  # noqa: E402


def build_tiny_lightning_model():
    torch.manual_seed(0)
    return lightning_module(LatentDiffusion)(**OmegaConf.load(TINY_CONFIG).model.params)


def test_the_model_class_comes_first_and_is_built_once():
    mixed = lightning_module(LatentDiffusion)
    assert mixed.__mro__[1] is LatentDiffusion and issubclass(mixed, pl.LightningModule)
    assert mixed.device is TrainableModule.device  # not LightningModule's, which only Lightning moves
    assert lightning_module(LatentDiffusion) is mixed and lightning_module(mixed) is mixed
    assert not issubclass(LatentDiffusion, pl.LightningModule)  # sampling never imports Lightning


def test_a_pickled_model_loads_in_a_fresh_process(tmp_path):
    """What a Lightning strategy that spawns processes does with the model (and torch.save(model)):
    the fresh process has not built the mixed class yet, and pickle's lookup by module and name
    would find the plain LatentDiffusion."""
    model = build_tiny_lightning_model()
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    expected = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
    load = ("import pickle, sys; import pytorch_lightning as pl; "
            "m = pickle.load(open(sys.argv[1], 'rb')); "
            "print(type(m).__name__, isinstance(m, pl.LightningModule), "
            "repr(sum(float(t.double().sum()) for t in m.state_dict().values() if t.is_floating_point())))")
    result = subprocess.run([sys.executable, "-c", load, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LatentDiffusion", "True", repr(expected)]



class ReportingLatentDiffusion(lightning_module(LatentDiffusion)):
    """A subclass of the mixed class, as user code may write one."""


def test_a_subclass_of_the_mixed_class_pickles_as_itself():
    torch.manual_seed(0)
    model = ReportingLatentDiffusion(**OmegaConf.load(TINY_CONFIG).model.params)
    assert type(pickle.loads(pickle.dumps(model))) is ReportingLatentDiffusion


def test_the_frozen_stages_stay_in_eval_mode_and_return_themselves():
    """The first stage and text encoder keep eval mode (no dropout) when Lightning calls train() on
    the model, while the UNet trains; their eval()/train() return the module, as nn.Module's do
    (upstream's returned the mode passed, and train() without one was a TypeError), in a copy too."""
    model = build_tiny_lightning_model()
    model.train()
    assert model.model.training
    for stage in (model.first_stage_model, model.cond_stage_model):
        assert not stage.training and not any(p.requires_grad for p in stage.parameters())
        assert stage.eval() is stage and stage.train() is stage and not stage.training
    clone = copy.deepcopy(model)
    assert clone.first_stage_model.train() is clone.first_stage_model


@pytest.mark.parametrize("config, overrides", [
    (TINY_CONFIG, {}),
    (TINY_CONFIG, {"learn_logvar": True}),
    (REPO / "configs" / "embedded" / "procedural-t2i.yaml", {}),  # what gpu_train_embedded.sh trains
])
def test_every_tensor_the_model_holds_follows_it_to_another_device(config, overrides):
    """A plain tensor attribute stays on the CPU when the model moves; indexed with the batch's
    timesteps on a GPU it is an error (upstream's logvar, in every training step). The meta device
    stands in for CUDA here."""
    params = OmegaConf.merge(OmegaConf.load(config).model.params, overrides)
    torch.manual_seed(0)
    model = LatentDiffusion(**params).to("meta")
    left_behind = [f"{name or 'model'}.{attribute}" for name, module in model.named_modules()
                   for attribute, value in vars(module).items() if isinstance(value, torch.Tensor) and not value.is_meta]
    assert left_behind == []
