"""Every `target:` in the shipped YAML configs names something importable (ldm.util.get_obj_from_str).

A target that cannot be imported here must be in ALLOWED_MISSING with its reason, and must fail
with ModuleNotFoundError for exactly the module (or one of the modules) listed there: a misspelt target cannot hide
behind the allow-list. Where the target's own module is in this repository, its name is also
looked up in the module's source, so a misspelt class name is caught even when an optional
import keeps the module from loading.

A training config's pretrained first stage (`ckpt_path`) is the file scripts/download_first_stages.sh
puts in models/first_stage_models/, with the same architecture as that folder's config.yaml.
"""
import ast
import os

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

CONFIG_FILES = sorted(p for folder in ("configs", "models", "tests/configs")
                      for pattern in ("*.yaml", "*.yml") for p in (REPO / folder).rglob(pattern))

# target module (or its package) -> (the module whose absence is expected, why that is fine)
ALLOWED_MISSING = {
    "taming": ("taming", "taming-transformers, optional: upstream's VQ training loss and FFHQ/CelebA-HQ data "
                         "(pip install 'taming-transformers @ git+https://github.com/CompVis/taming-transformers')"),
    # any of its optional imports may be the first one missing (the test extra brings opencv)
    "ldm.data.imagenet": (("cv2", "albumentations", "torchvision", "taming"),
                          "optional: only ImageNet training data needs them (pip install -e '.[data]' torchvision "
                          "and taming-transformers)"),
    # data modules CompVis used to train the released models but never published; only the
    # `data:` section of those configs names them, sampling does not need them
    "ldm.data.faceshq": ("ldm.data.faceshq", "not released by upstream (FFHQ/CelebA-HQ training data)"),
    "ldm.data.landscapes": ("ldm.data.landscapes", "not released by upstream (landscapes training data)"),
    "ldm.data.openimages": ("ldm.data.openimages", "not released by upstream (OpenImages training data)"),
    "ldm.data.previews": ("ldm.data.previews", "not released by upstream (preview training data)"),
}


def targets_in(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target":
                yield value
            yield from targets_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets_in(value)


def collect_targets():
    found = {}
    for path in CONFIG_FILES:
        config = OmegaConf.to_container(OmegaConf.load(path))  # unreadable YAML fails collection
        for target in targets_in(config):
            found.setdefault(target, []).append(str(path.relative_to(REPO)))
    return found


TARGETS = collect_targets()


def allowed_entry(module):
    for prefix, entry in ALLOWED_MISSING.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, entry
    return None, None


def test_the_configs_are_found():
    folders = {p.relative_to(REPO).parts[0] for p in CONFIG_FILES}
    assert {"configs", "models"} <= folders and len(CONFIG_FILES) >= 30, CONFIG_FILES
    assert len(TARGETS) >= 30


def test_every_allow_list_entry_is_used():
    used = {allowed_entry(t.rsplit(".", 1)[0])[0] for t in TARGETS if isinstance(t, str)}
    assert set(ALLOWED_MISSING) <= used, f"stale entries: {set(ALLOWED_MISSING) - used}"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_resolves(target):
    files = TARGETS[target]
    assert isinstance(target, str) and "." in target, f"{files}: target {target!r} is not a dotted name"
    module, name = target.rsplit(".", 1)
    prefix, entry = allowed_entry(module)
    try:
        get_obj_from_str(target)
    except (ModuleNotFoundError, ConfigError) as error:
        # a missing optional package, raised as is from inside one of our modules, or as the ConfigError
        # of a target in a package that is not installed (taming.*); a misspelt name has no such cause
        e = error if isinstance(error, ModuleNotFoundError) else error.__cause__
        assert isinstance(e, ModuleNotFoundError), f"{files}: {target}: {error}"
        assert entry is not None, f"{files}: {target}: {e}"
        expected, reason = entry
        expected = (expected,) if isinstance(expected, str) else expected
        assert e.name in expected, f"{files}: {target} fails on {e.name!r}, not on one of {expected} ({reason}): {e}"
    except Exception as e:  # anything else: a broken module
        pytest.fail(f"{files}: {target}: {type(e).__name__}: {e}")
    else:
        return
    source = REPO / (module.replace(".", "/") + ".py")
    if source.is_file():  # the module is ours, only an optional import is missing: check the name
        tree = ast.parse(source.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        assert name in defined, f"{files}: {target}: {source.relative_to(REPO)} defines no {name}"


def test_dummy_loss_of_the_inpainting_config_builds():
    config = OmegaConf.load(REPO / "models" / "ldm" / "inpainting_big" / "config.yaml")
    loss = instantiate_from_config(config.model.params.first_stage_config.params.lossconfig)
    assert type(loss).__name__ == "DummyLoss" and not list(loss.parameters())


def first_stages_with_a_checkpoint():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        config = OmegaConf.load(path)
        if OmegaConf.select(config, "model.params.first_stage_config.params.ckpt_path"):
            yield str(path.relative_to(REPO)), config.model.params.first_stage_config


FIRST_STAGE_CKPTS = list(first_stages_with_a_checkpoint())


def test_some_configs_name_a_first_stage_checkpoint():
    assert len(FIRST_STAGE_CKPTS) >= 5, FIRST_STAGE_CKPTS


@pytest.mark.parametrize("path, first_stage", FIRST_STAGE_CKPTS, ids=[path for path, _ in FIRST_STAGE_CKPTS])
def test_first_stage_checkpoint_is_where_the_download_script_puts_it(path, first_stage):
    """A training config's first stage loads models/first_stage_models/<name>/model.ckpt, which
    scripts/download_first_stages.sh downloads and unzips, and describes the same autoencoder as
    that folder's config.yaml (upstream's vq configs named configs/first_stage_models/.../model.yaml,
    a file that never existed, so training stopped at 'Checkpoint not found')."""
    ckpt = first_stage.params.ckpt_path
    folder, name = os.path.split(ckpt)
    assert name == "model.ckpt" and os.path.dirname(folder) == "models/first_stage_models", f"{path}: {ckpt}"
    download = (REPO / "scripts" / "download_first_stages.sh").read_text()
    assert f"fetch {folder} " in download, f"{path}: download_first_stages.sh does not fetch {folder}"
    released = OmegaConf.load(REPO / folder / "config.yaml").model.params
    for key in ("ddconfig", "embed_dim", "n_embed"):
        assert first_stage.params.get(key) == released.get(key), f"{path}: {key} differs from {folder}/config.yaml"
