"""Shared test fixtures. Tests never touch the Hugging Face hub."""
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# an empty hub cache of the suite's own: a model in a developer's ~/.cache/huggingface (CLIP ViT-B/32,
# say) must not turn an "offline, not cached" test into a download-free success
_HF_HOME = tempfile.TemporaryDirectory(prefix="tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME.name
for _cache in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_cache, None)
# test_hub.py's stand-in hubs listen on 127.0.0.1: asked through a developer's proxy, they never answer
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-tiny.yaml"
FULL_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
sys.path.insert(0, str(REPO))


def load_script(name):
    """scripts/<name>.py as a module (scripts/ is no package), to test its functions in-process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace(".", "_"), REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_script(name, env, timeout=900):
    """scripts/<name> run with bash from the repository root, as the device call runs it: the
    environment is this process's with `env` on top (the GPU scripts take their sizes from it)."""
    import subprocess
    return subprocess.run(["bash", str(REPO / "scripts" / name)], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_config():
    """configs/stable-diffusion/v1-tiny.yaml: SD v1's layout, small enough for a CPU."""
    return OmegaConf.load(TINY_CONFIG)


def build_tiny_model():
    """The tiny LatentDiffusion with random weights, seeded 0 (the same weights every call), on the CPU."""
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny LatentDiffusion with random weights (seed 0), on the CPU, in eval mode."""
    return build_tiny_model().eval()


@torch.no_grad()
def fill_zero_weights_(module, std=0.05):
    """Give every all-zero parameter random values, in place; returns the module.

    Upstream initialises the UNet's output convolutions to zero (zero_module), so an untrained
    model's noise prediction ignores whatever attention or adapters do; tests that need those
    effects to reach the output call this first."""
    for p in module.parameters():
        if p.abs().sum() == 0:
            p.normal_(0, std)
    return module


def build_tiny_model_with_weights():
    """`build_tiny_model` with every all-zero weight of its UNet filled, so that attention changes
    reach the noise prediction (the fill follows the build's seed, so the weights are the same every call)."""
    model = build_tiny_model()
    fill_zero_weights_(model.model)
    return model


@pytest.fixture(scope="session")
def tiny_model_with_weights():
    """build_tiny_model_with_weights, in eval mode."""
    return build_tiny_model_with_weights().eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """build_tiny_model_with_weights' weights as a .safetensors file for the scripts' --ckpt:
    sharing then visibly changes their images."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_model_with_weights().state_dict().items()}, str(path))
    return path


def count_ops(fn):
    """(ops dispatched, bytes of the new tensors they return) while fn() runs: what a function
    launches and writes, counted on CPU without timing anything. Outputs that alias an input (views,
    in-place results) are not new; the op's schema says so (torch 2.6 does not flag a slice's
    output as a view inside a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    counts = {"ops": 0, "bytes": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            counts["ops"] += 1
            if not any(r.alias_info is not None for r in func._schema.returns):
                counts["bytes"] += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                       if isinstance(t, torch.Tensor))
            return out

    with Count():
        fn()
    return counts["ops"], counts["bytes"]


def write_clip_vocab_files(folder):
    """vocab.json and merges.txt of the vendored CLIP vocabulary in `folder`: the files of a
    transformers CLIP tokenizer folder, for comparisons with transformers."""
    import json
    from ldm.modules.encoders.modules import read_clip_bpe
    vocab, merges = read_clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def transformers_clip_text_model(config):
    """transformers' CLIPTextModel (eval mode, random weights) with the fields of a clip_text.CLIPTextConfig."""
    from dataclasses import asdict
    import transformers
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**asdict(config))).eval()


def text_transformer_of(clip_text_model):
    """The part of transformers' CLIPTextModel whose parameter names are clip_text.CLIPTextTransformer's:
    transformers 4 nests it under `text_model.`, transformers 5 is it."""
    return getattr(clip_text_model, "text_model", clip_text_model)


def has_plain_file_mode(path):
    """Whether `path` has the permission bits a file written with open() beside it gets (0666 less
    the umask): safetensors 0.8 alone leaves its files 0600 (ldm.checkpoints.save_safetensors)."""
    import stat
    plain = Path(path).with_name(Path(path).name + ".plain")
    plain.write_bytes(b"")
    try:
        return stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(plain.stat().st_mode)
    finally:
        plain.unlink()


def write_flagging_safety_checker(folder):
    """A diffusers SD pipeline folder's safety_checker/ and feature_extractor/ (as
    CompVis/stable-diffusion-v1-4 ships them), with a tiny checker that flags every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=layer, projection_dim=8,
                                                      vision_config=dict(layer, image_size=32, patch_size=8)))
    checker.concept_embeds_weights.data[:] = -10.0  # every image is above every concept's threshold
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")


def interrupt_script_when(script, args, ready, **popen):
    """Run scripts/`script` with `args`, press Ctrl-C (SIGINT) once `ready()` holds (at most 120 s
    on), and return (the process, ended, and what communicate() read)."""
    import signal
    import subprocess
    import time
    # SIGINT handled as under a terminal: a shell running the suite in the background ignores it,
    # and the child would inherit that
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=REPO,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"), text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    return process, process.communicate(timeout=120)
