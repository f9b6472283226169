"""Checkpoint loading (ldm.checkpoints): file formats, the weights-only allow-list, key remapping, missing weights."""
import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import FULL_CONFIG, REPO, TINY_CONFIG, fill_zero_weights_, has_plain_file_mode
from ldm.checkpoints import (CheckpointError, WeightsMismatchError, apply_state_dict, build_for_weights,
                            build_with_weights, incomplete_checkpoint, load_model_from_config, load_state_dict,
                            load_weights, remap_clip_text_keys, save_safetensors)
from ldm.modules.ema import LitEma
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config

TEXT = "cond_stage_model.transformer."


class NotAllowListed:
    """A pickled object outside the weights-only allow-list (module-level so that it pickles)."""

    def __init__(self):
        self.payload = "anything"


def tiny_state_dict(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def to_transformers_419_layout(sd):
    """Rename flat CLIP text keys (transformers 5) to the text_model.* layout of SD 1.x checkpoints."""
    out = {}
    for key, value in sd.items():
        if key.startswith(TEXT) and not key.startswith(TEXT + "text_model."):
            key = TEXT + "text_model." + key[len(TEXT):]
        out[key] = value
    return out


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --- load_state_dict -----------------------------------------------------------------------------

def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.ckpt")


def test_unknown_suffix_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "weights.bin.gz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Unsupported checkpoint type"):
        load_state_dict(path)


def test_damaged_file_is_a_one_line_checkpoint_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("save, name", [(torch.save, "model.ckpt"), (save_file, "model.safetensors")])
def test_a_checkpoint_cut_off_anywhere_is_told_from_its_index(tmp_path, save, name):
    """A run killed while saving (or a copy broken off) leaves a file whose end is missing: told
    from the zip directory or the safetensors header alone, before any model is built."""
    whole = tmp_path / name
    save({"w": torch.arange(3000.0), "b": torch.ones(7)}, whole)
    data = whole.read_bytes()
    assert incomplete_checkpoint(whole) is None
    cut = tmp_path / f"cut-{name}"
    for length in (9, 40, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:length])
        assert f"{cut} is not a whole checkpoint" in incomplete_checkpoint(cut), length
        with pytest.raises(CheckpointError):  # read_checkpoint agrees: it cannot read it either
            load_state_dict(cut)
    cut.write_bytes(b"not a checkpoint at all")  # no index to tell from: read_checkpoint's to say
    assert incomplete_checkpoint(cut) is None
    nested = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deeper than json.loads recurses
    cut.write_bytes(len(nested).to_bytes(8, "little") + nested)
    assert incomplete_checkpoint(cut) is None
    with pytest.raises(CheckpointError):
        load_state_dict(cut)
    cut.write_bytes(b"")  # a copy that never started (torch.load said "EOFError: EOFError")
    assert f"{cut} is not a whole checkpoint (it is empty)" in incomplete_checkpoint(cut)
    assert incomplete_checkpoint(tmp_path / "missing.ckpt") is None


@pytest.mark.parametrize("content", [bytes(range(128, 256)) * 3, b"hello world\n"])
def test_a_pickle_file_that_is_no_checkpoint_does_not_suggest_unsafe_pickle(tmp_path, content):
    # --unsafe-pickle cannot read garbage; it is suggested only for a refused class
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a") as info, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        load_state_dict(path)
    assert "unsafe-pickle" not in str(info.value) and "\n" not in str(info.value)
    assert not warned, [str(w.message) for w in warned]  # nothing above the one line (torch's "file an issue")


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_files_load_mapped_or_not(tmp_path, zip_format):
    """mapped=True reads torch's zip files by mmap (their tensors read the file as they are used);
    the format before torch 1.6, which cannot be mapped, is read whole either way."""
    path = tmp_path / "model.ckpt"
    weights = {"w": torch.arange(3000.0).reshape(30, 100), "b": torch.ones(7, dtype=torch.float16)}
    torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=zip_format)
    saved = path.read_bytes()
    for mapped in (True, False):
        loaded = load_state_dict(path, mapped=mapped)
        assert loaded.keys() == weights.keys()
        for name, tensor in weights.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
        loaded["w"] += 1  # weights changed in place (a LoRA merged, fine-tuning) are the process's copy
        del loaded
        assert path.read_bytes() == saved


@pytest.mark.parametrize("name, save", [("model.safetensors", save_file), ("model.ckpt", torch.save)])
def test_weights_read_by_default_are_the_callers_own(tmp_path, name, save):
    """What load_state_dict returns by default is not a view of the file: saving it over the file
    it came from (pruning a checkpoint in place) works, and so does reading on after the file was
    overwritten; a mapped read would end with SIGBUS or see the new contents."""
    path = tmp_path / name
    weights = {"w": torch.arange(3000.0), "b": torch.ones(7)}
    save(weights, str(path))
    loaded = load_state_dict(path)
    save({key: torch.zeros_like(t) for key, t in loaded.items()}, str(path))  # in place: same inode
    assert all(torch.equal(loaded[key], t) for key, t in weights.items())
    save(loaded, str(path))
    assert all(torch.equal(load_state_dict(path)[key], t) for key, t in weights.items())


def test_save_safetensors_never_replaces_a_file_and_leaves_nothing_when_it_fails(tmp_path):
    """The name is claimed before writing: a file there (or one another run wrote meanwhile) stays as
    it is; a write that fails leaves no file; a new one has a plain file's permissions."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_safetensors({"w": torch.ones(2)}, path)
    assert path.read_bytes() == b"someone else's"
    failed = tmp_path / "failed.safetensors"
    with pytest.raises(Exception):
        save_safetensors({"w": "not a tensor"}, failed)
    assert not failed.exists()
    written = tmp_path / "new.safetensors"
    save_safetensors({"w": torch.ones(2)}, written)
    assert torch.equal(load_state_dict(written)["w"], torch.ones(2)) and has_plain_file_mode(written)


def test_lightning_and_numpy_bookkeeping_loads_weights_only(tmp_path):
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    path = tmp_path / "sd14-like.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "global_step": 470000, "epoch": 5,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1),
                                                "kth_value": np.float64(np.inf), "count": np.int64(2)}},
                "hyper_parameters": {"channels": np.uint8(3), "heads": np.int8(1), "name": np.str_("sd")}}, path)
    sd = load_state_dict(path)
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.arange(3.0))


def test_a_numpy_class_outside_the_allow_list_is_named_with_the_unsafe_pickle_hint(tmp_path):
    """torch words such refusals "... but got <class 'numpy.dtypes.ObjectDType'>": a class refused,
    not a damaged file, so --unsafe-pickle is the way to read it if trusted."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "column": np.dtype(object)}, path)
    with pytest.raises(CheckpointError, match=r"refuses \(numpy\.dtypes\.ObjectDType\); .* --unsafe-pickle"):
        load_state_dict(path)


def test_a_bug_in_the_allow_list_is_not_reported_as_a_damaged_file(tmp_path, monkeypatch):
    # numpy 1.26 made building the allow-list raise AttributeError, and every .ckpt read as
    # "damaged or not a checkpoint": a bug of ours must keep its traceback
    import ldm.checkpoints

    def broken():
        raise AttributeError("module 'numpy._core' has no attribute 'multiarray'")
    monkeypatch.setattr(ldm.checkpoints, "numpy_safe_globals", broken)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(AttributeError, match="multiarray"):
        load_state_dict(path)


def test_non_allow_listed_object_needs_unsafe_pickle(tmp_path, caplog):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": NotAllowListed()}, path)
    with pytest.raises(CheckpointError, match="--unsafe-pickle") as info:
        load_state_dict(path)
    assert "NotAllowListed" in str(info.value) and "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoints"):
        sd = load_state_dict(path, unsafe_pickle=True)
    assert torch.equal(sd["w"], torch.ones(2))
    assert any(r.levelno == logging.WARNING and "unpickling" in r.getMessage() for r in caplog.records)


def test_plain_state_dict_without_wrapper_loads(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1), "b": torch.ones(2)}, path)
    assert sorted(load_state_dict(path)) == ["a", "b"]


# --- remap_clip_text_keys on key sets ------------------------------------------------------------

def test_remap_strips_or_adds_text_model_and_drops_unknown_position_ids():
    flat = {TEXT + "embeddings.token_embedding.weight", TEXT + "final_layer_norm.weight", "model.x"}
    nested = {TEXT + "text_model.embeddings.token_embedding.weight", TEXT + "text_model.final_layer_norm.weight",
              TEXT + "text_model.embeddings.position_ids", "model.x"}
    # transformers 4.19 checkpoint -> transformers 5 model
    assert set(remap_clip_text_keys(dict.fromkeys(nested, 0), flat)) == flat
    # transformers 5 checkpoint -> transformers 4.19 model (which still has position_ids: it stays missing)
    assert set(remap_clip_text_keys(dict.fromkeys(flat, 0), nested)) == nested - {TEXT + "text_model.embeddings.position_ids"}


def test_remap_keeps_keys_it_has_no_rule_for():
    sd = {TEXT + "text_model.unknown.weight": 1, "first_stage_model.w": 2}
    assert remap_clip_text_keys(sd, {TEXT + "final_layer_norm.weight", "first_stage_model.w"}) == sd


def test_full_size_text_encoder_keys_from_an_sd14_checkpoint_all_map():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
    expected = {"cond_stage_model." + k for k in encoder.state_dict()}
    sd14 = to_transformers_419_layout(dict.fromkeys(expected, 0))
    sd14[TEXT + "text_model.embeddings.position_ids"] = 0
    assert set(remap_clip_text_keys(sd14, expected)) == expected
    assert len(expected) == 196  # 12 layers x 16 + 2 embeddings + final layer norm (2)


def test_full_size_sd14_layout_maps_with_zero_missing_keys():
    cfg = OmegaConf.load(FULL_CONFIG)
    with torch.device("meta"):  # the full 1B-parameter model, without allocating its memory
        model = instantiate_from_config(cfg.model)
    expected = model.state_dict()
    sd14 = to_transformers_419_layout(dict(expected))
    sd14[TEXT + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd14.update({"model_ema." + k.replace(".", "")[:40]: v for k, v in list(expected.items())[:5]})
    from ldm.checkpoints import _drop_ema_keys  # the EMA step of apply_state_dict
    mapped = remap_clip_text_keys(_drop_ema_keys(sd14, expected), model)
    assert set(mapped) == set(expected)


# --- load_model_from_config ----------------------------------------------------------------------

def test_random_weights_warns_loudly(tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoints"):
        model = load_model_from_config(tiny_config, None, random_weights=True)
    assert not model.training
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_model_round_trips(tmp_path, tiny_config, tiny_model, suffix, caplog):
    sd = tiny_state_dict(tiny_model)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": to_transformers_419_layout(sd), "global_step": 3}, path)
    torch.manual_seed(1)  # different random init, so equality proves the weights were loaded
    with caplog.at_level(logging.INFO, logger="ldm.checkpoints"):
        loaded = load_model_from_config(tiny_config, str(path))
    assert not loaded.training
    assert_same_parameters(loaded, tiny_model)
    if suffix == ".ckpt":
        assert any("global step: 3" in r.getMessage() for r in caplog.records)


def built_then_loaded(config, path):
    """The model built the ordinary way (randomly initialised), then loaded: the reference for
    build_with_weights, which loads into placeholders instead."""
    model = build_for_weights(config, "reference")
    load_weights(model, path)
    return model.eval()


@torch.no_grad()
def assert_same_model(reference, model):
    """Bit for bit: every tensor (values, dtype, requires_grad) and what the model computes from
    them, so that no module kept a stale reference to a placeholder."""
    assert_same_parameters(reference, model)
    for (name, a), (_, b) in zip([*reference.named_parameters(), *reference.named_buffers()],
                                 [*model.named_parameters(), *model.named_buffers()], strict=True):
        assert (a.dtype, a.requires_grad, a.is_meta) == (b.dtype, b.requires_grad, False), name
    c = [m.get_learned_conditioning(["a red chair"]) for m in (reference, model)]
    assert torch.equal(*c)
    x = torch.randn(1, reference.channels, reference.image_size, reference.image_size, generator=torch.Generator())
    t = torch.tensor([500])
    assert torch.equal(reference.apply_model(x, t, c[0]), model.apply_model(x, t, c[0]))
    with reference.ema_scope(), model.ema_scope():
        assert torch.equal(reference.apply_model(x, t, c[0]), model.apply_model(x, t, c[0]))
    assert torch.equal(reference.decode_first_stage(x), model.decode_first_stage(x))


@pytest.mark.parametrize("fmt", ["fp16 safetensors", "fp32 ckpt with EMA"])
def test_weights_load_into_placeholders_exactly_as_into_a_built_model(tmp_path, tiny_model_with_weights, fmt,
                                                                      caplog):
    """SD v1 checkpoints load into parameters that were never initialised (build_with_weights):
    the SD 1.x layout (tiny config: CLIP text, KL autoencoder, UNet), an fp16 file into the
    model's float32, and a Lightning .ckpt whose EMA copy the model keeps (use_ema)."""
    config = OmegaConf.load(TINY_CONFIG)
    sd = tiny_state_dict(tiny_model_with_weights)
    if fmt == "fp16 safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(path))
    else:
        config.model.params.use_ema = True
        ema = LitEma(fill_zero_weights_(instantiate_from_config(config.model).model))  # other weights than sd's
        sd.update({f"model_ema.{k}": v for k, v in ema.state_dict().items()})
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": sd, "global_step": 7}, path)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoints"):
        model, global_step = build_with_weights(config, path)
    assert "unset" not in caplog.text  # the placeholders took the file's tensors: no second, ordinary build
    assert global_step == (7 if path.suffix == ".ckpt" else None)
    assert_same_model(built_then_loaded(config, path), model.eval())
    if path.suffix == ".ckpt":  # ema_scope samples with the file's EMA weights
        expected = copy.deepcopy(tiny_model_with_weights.model)
        ema.copy_to(expected)
        with model.ema_scope():
            assert_same_parameters(model.model, expected)


@pytest.mark.parametrize("name, save", [("model.safetensors", save_file),
                                        ("model.ckpt", lambda sd, path: torch.save({"state_dict": sd}, path))])
def test_a_checkpoint_rewritten_in_place_after_loading_leaves_the_model_as_loaded(tmp_path, tiny_model, name, save):
    """Files are read by mmap; the model's weights are copies, not views of the file: `cp` over it,
    or a training run saving last.ckpt in place (pytorch-lightning 2.1), while a process samples
    must neither change its weights nor end it with SIGBUS."""
    config = OmegaConf.load(TINY_CONFIG)
    path = tmp_path / name
    save(tiny_state_dict(tiny_model), str(path))
    model, _ = build_with_weights(config, path)
    save({k: torch.zeros_like(v) for k, v in tiny_state_dict(tiny_model).items()}, str(tmp_path / "other"))
    with open(path, "r+b") as f:  # in place, as cp and open(path, "wb") write: same inode
        f.write((tmp_path / "other").read_bytes())
        f.truncate()
    assert_same_parameters(model, tiny_model)


def test_the_shipped_model_loads_into_placeholders_exactly_as_into_a_built_model(caplog):
    config = OmegaConf.load(REPO / "configs/embedded/procedural-t2i-16px.yaml")
    path = REPO / "models/embedded/procedural-t2i-16px.safetensors"
    with caplog.at_level(logging.INFO, logger="ldm.checkpoints"):
        model = build_with_weights(config, path)[0].eval()
    assert "unset" not in caplog.text
    assert_same_model(built_then_loaded(config, path), model)


def test_a_checkpoint_that_leaves_a_parameter_unset_is_loaded_into_an_initialised_model(tmp_path, tiny_model,
                                                                                        caplog):
    """An optional parameter the file lacks (here the learnt log-variance, outside the required
    autoencoder, UNet and text encoder) has no value to take in a placeholder: that model is
    built the ordinary way, and the parameter keeps its initial value, as it always did."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.learn_logvar = True
    path = tmp_path / "without_logvar.safetensors"
    save_file(tiny_state_dict(tiny_model), str(path))
    with caplog.at_level(logging.INFO, logger="ldm.checkpoints"):
        model, _ = build_with_weights(config, path)
    assert "leaves 1 tensors unset (e.g. logvar): building the model with initialised weights" in caplog.text
    assert not model.logvar.is_meta and torch.equal(model.logvar, torch.zeros_like(model.logvar))
    assert_same_parameters(model.model, tiny_model.model)


def test_a_safetensors_file_linked_to_upstreams_ckpt_path_loads(tmp_path, tiny_config, tiny_model):
    """README: `ln -s sd-v1-5.safetensors models/ldm/stable-diffusion-v1/model.ckpt`; the format
    is read from the file, not from its name."""
    save_file(tiny_state_dict(tiny_model), str(tmp_path / "tiny.safetensors"))
    (tmp_path / "model.ckpt").symlink_to(tmp_path / "tiny.safetensors")
    torch.manual_seed(1)
    assert_same_parameters(load_model_from_config(tiny_config, str(tmp_path / "model.ckpt")), tiny_model)


@pytest.mark.parametrize("ema_weights", [0, 1])
def test_an_ema_copy_is_sampled_only_when_the_file_holds_all_its_weights(tmp_path, tiny_model_with_weights,
                                                                           ema_weights):
    """A use_ema config swaps its EMA copy in for sampling (ema_scope). A file pruned down to the
    copy's counters has none of its weights: the UNet weights sample, as with no model_ema.* at
    all. Some of them without the rest would leave the others random: refused."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.use_ema = True
    sd = tiny_state_dict(tiny_model_with_weights)
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int)})
    ema = LitEma(tiny_model_with_weights.model)
    sd.update({f"model_ema.{k}": v for k, v in list(ema.state_dict().items())[2:2 + ema_weights]})
    path = tmp_path / "pruned.safetensors"
    save_file(sd, str(path))
    if ema_weights:
        with pytest.raises(WeightsMismatchError, match=r"holds 1 of the \d+ EMA weights .* use_ema: false"):
            load_model_from_config(config, str(path))
        return
    model = load_model_from_config(config, str(path))
    assert model.use_ema is False
    with model.ema_scope():
        assert_same_parameters(model.model, tiny_model_with_weights.model)


def test_ema_weights_are_ignored_when_the_config_has_no_ema(tmp_path, tiny_config, tiny_model):
    sd = tiny_state_dict(tiny_model)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    path = tmp_path / "with_ema.safetensors"
    save_file(sd, str(path))
    assert_same_parameters(load_model_from_config(tiny_config, str(path)), tiny_model)


def test_missing_unet_weight_fails_loudly(tmp_path, tiny_config, tiny_model):
    sd = tiny_state_dict(tiny_model)
    del sd["model.diffusion_model.out.2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"lacks 1 weights .*model\.diffusion_model\.out\.2\.weight"):
        load_model_from_config(tiny_config, str(path))


def test_wrong_shape_fails_loudly(tmp_path, tiny_config, tiny_model):
    sd = tiny_state_dict(tiny_model)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="shapes"):
        load_model_from_config(tiny_config, str(path))


def _renamed(sd, old, new):
    return {k.replace(old, new, 1): v for k, v in sd.items()}


def _first_conv_with(channels):
    def edit(sd):
        weight = sd["model.diffusion_model.input_blocks.0.0.weight"]
        return {**sd, "model.diffusion_model.input_blocks.0.0.weight": weight.new_zeros(weight.shape[0], channels,
                                                                                       *weight.shape[2:])}
    return edit


@pytest.mark.parametrize("edit, kind", [
    (lambda sd: {"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), **_renamed(
        sd, "cond_stage_model.", "conditioner.embedders.0.")}, "an SDXL checkpoint"),
    (lambda sd: _renamed(sd, "cond_stage_model.", "cond_stage_model.model."),
     "an SD 2.x checkpoint (its text encoder is OpenCLIP's)"),
    (lambda sd: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
     "a LoRA (weights to add to a model), not a model"),
    (_first_conv_with(9), "an inpainting checkpoint (its UNet reads 9 channels, a text-to-image one 4)"),
    (_first_conv_with(8), "an image-editing (instruct-pix2pix) checkpoint (its UNet reads 8 channels"),
    (lambda sd: {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")},
     "an autoencoder (VAE) alone"),
    (lambda sd: {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "mid_block.x": torch.zeros(1)},
     "one part of a diffusers pipeline (pass the pipeline folder itself)"),
    (lambda sd: {"control_model.input_hint_block.0.weight": torch.zeros(1)}, "a ControlNet alone"),
    (lambda sd: {"controlnet_cond_embedding.conv_in.weight": torch.zeros(1), "down_blocks.0.x": torch.zeros(1)},
     "a ControlNet alone"),  # diffusers', which has down_blocks too
    (lambda sd: {"conv_in.weight": torch.zeros(1), "body.0.block1.weight": torch.zeros(1)},
     "a T2I-Adapter, not a model (txt2img, img2img and adapter_benchmark take it as --adapter)"),
    (lambda sd: {"adapter.body.0.in_conv.weight": torch.zeros(1)}, "a T2I-Adapter, not a model (txt2img"),
    (lambda sd: {k: v for k, v in sd.items() if "out.2" not in k}, "is it a checkpoint for this config?"),
])
def test_a_file_of_another_kind_is_named_in_the_error(tiny_model, edit, kind):
    """The files users with SD weights most often pass instead of an SD 1.x text-to-image one."""
    with pytest.raises(CheckpointError) as raised:
        apply_state_dict(copy.deepcopy(tiny_model), edit(tiny_state_dict(tiny_model)), "model.safetensors")
    message = str(raised.value)
    assert message.startswith("model.safetensors ") and kind in message, message


def test_the_configs_own_checkpoint_paths_are_not_read_when_sampling(tmp_path, tiny_config, tiny_model, caplog):
    """A training config names its pretrained first stage (first_stage_config.params.ckpt_path),
    which a full checkpoint holds anyway: upstream read it first, so sampling needed a file it then
    overwrote, and --random-weights needed it too."""
    config = copy.deepcopy(tiny_config)
    config.model.params.first_stage_config.params.ckpt_path = str(tmp_path / "not-downloaded.ckpt")
    save_file(tiny_state_dict(tiny_model), str(tmp_path / "tiny.safetensors"))
    with caplog.at_level(logging.INFO, logger="ldm.checkpoints"):
        assert_same_parameters(load_model_from_config(config, str(tmp_path / "tiny.safetensors")), tiny_model)
        load_model_from_config(config, None, random_weights=True)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Not reading")] == [
        "Not reading model.params.first_stage_config.params.ckpt_path: the checkpoint holds the whole model",
        "Not reading model.params.first_stage_config.params.ckpt_path: random weights"]
    assert config.model.params.first_stage_config.params.ckpt_path  # the caller's config is left as it was


# --- --vae: another autoencoder --------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_autoencoder():
    """The tiny config's autoencoder with other random weights than tiny_model's."""
    torch.manual_seed(1)
    return instantiate_from_config(OmegaConf.load(TINY_CONFIG).model).first_stage_model


@pytest.mark.parametrize("layout", ["vae file", "prefixed", "whole checkpoint"])
def test_vae_replaces_the_autoencoder_and_nothing_else(tmp_path, tiny_config, tiny_model, other_autoencoder, layout):
    """A CompVis VAE file (with the training loss's entries, as vae-ft-mse-840000 has them), the same
    keys under first_stage_model., or a whole model's checkpoint: the autoencoder comes from --vae,
    the UNet and text encoder from the checkpoint."""
    save_file(tiny_state_dict(tiny_model), str(tmp_path / "model.safetensors"))
    vae = {k: v.clone().contiguous() for k, v in other_autoencoder.state_dict().items()}
    if layout == "vae file":
        vae["loss.logvar"] = torch.zeros(())
    else:
        vae = {"first_stage_model." + k: v for k, v in vae.items()}
    if layout == "whole checkpoint":
        vae.update({k: torch.zeros_like(v) for k, v in tiny_state_dict(tiny_model).items()
                    if not k.startswith("first_stage_model.")})
    save_file(vae, str(tmp_path / "vae.safetensors"))
    model = load_model_from_config(tiny_config, str(tmp_path / "model.safetensors"),
                                   vae=str(tmp_path / "vae.safetensors"))
    assert_same_parameters(model.first_stage_model, other_autoencoder)
    assert_same_parameters(model.model, tiny_model.model)
    assert_same_parameters(model.cond_stage_model, tiny_model.cond_stage_model)


def test_vae_with_random_weights_and_its_errors(tmp_path, tiny_config, other_autoencoder):
    vae = {k: v.clone().contiguous() for k, v in other_autoencoder.state_dict().items()}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    model = load_model_from_config(tiny_config, None, random_weights=True, vae=str(tmp_path / "vae.safetensors"))
    assert_same_parameters(model.first_stage_model, other_autoencoder)
    del vae["decoder.conv_out.bias"]
    save_file(vae, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"partial.safetensors lacks 1 autoencoder weights \(e\.g\. "
                                              r"decoder\.conv_out\.bias\); is it an SD 1\.x VAE"):
        load_model_from_config(tiny_config, None, random_weights=True, vae=str(tmp_path / "partial.safetensors"))
    vae["decoder.conv_out.bias"] = torch.zeros(4)  # 3 output channels
    save_file(vae, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="has 1 autoencoder weights of other shapes than this model's"):
        load_model_from_config(tiny_config, None, random_weights=True, vae=str(tmp_path / "other.safetensors"))
