import numpy as np
import pytest
import torch

from ldm.models.autoencoder import VQModel  # noqa: F401  (imports without taming-transformers)
from ldm.modules.vqvae.quantize import VectorQuantizer2
from ldm.util import ConfigError


def test_quantizer_snaps_to_nearest_codebook_entry_with_straight_through_gradient():
    torch.manual_seed(0)
    q = VectorQuantizer2(n_e=16, e_dim=4, beta=0.25, sane_index_shape=True)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    z_q, loss, (_, _, indices) = q(z)
    assert z_q.shape == z.shape and indices.shape == (2, 3, 5)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, q.embedding.weight).argmin(1).reshape(2, 3, 5)
    assert torch.equal(indices, expected)
    assert torch.allclose(z_q, q.get_codebook_entry(indices.reshape(-1), (2, 3, 5, 4)))
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    mse = torch.mean((z_q.detach() - z.detach()) ** 2)
    assert torch.allclose(loss, mse * 1.25)  # legacy: commitment + beta * codebook, equal values


def test_quantizer_remap_round_trip(tmp_path):
    used = np.array([3, 7, 11])
    np.save(tmp_path / "used.npy", used)
    q = VectorQuantizer2(n_e=16, e_dim=4, beta=0.25, remap=str(tmp_path / "used.npy"), unknown_index="extra")
    assert q.re_embed == 4
    inds = torch.tensor([[3, 11, 5]])
    mapped = q.remap_to_used(inds)
    assert mapped.tolist() == [[0, 2, 3]]
    assert q.unmap_to_all(mapped).tolist() == [[3, 11, 3]]  # the unknown "extra" index maps to used[0]


def test_vq_model_with_ema_builds_and_loads_its_own_safetensors(tmp_path):
    """use_ema and ckpt_path used names upstream never imported (LitEma, torch.load of a pickle)."""
    import torch
    from safetensors.torch import save_file
    ddconfig = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, n_embed=16, embed_dim=4)
    torch.manual_seed(0)
    model = VQModel(**kwargs, use_ema=True)
    assert model.model_ema.num_updates == 0
    path = tmp_path / "vq.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    reloaded = VQModel(**kwargs, use_ema=True, ckpt_path=str(path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_ckpt_path_with_ignore_keys_keeps_those_weights_as_initialised(tmp_path):
    """init_from_ckpt, one implementation for every ldm model (ldm.models.lightning.TrainableModule)."""
    from safetensors.torch import save_file
    from ldm.models.autoencoder import AutoencoderKL
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    torch.manual_seed(0)
    saved = AutoencoderKL(**kwargs)
    path = tmp_path / "kl.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    torch.manual_seed(1)
    fresh = AutoencoderKL(**kwargs).state_dict()
    torch.manual_seed(1)  # the same initialisation as `fresh`, then the file without the decoder
    loaded = AutoencoderKL(**kwargs, ckpt_path=str(path), ignore_keys=["decoder."]).state_dict()
    for name, tensor in loaded.items():
        expected = fresh[name] if name.startswith("decoder.") else saved.state_dict()[name]
        assert torch.equal(tensor, expected), name
    assert not torch.equal(fresh["encoder.conv_in.weight"], saved.state_dict()["encoder.conv_in.weight"])


def test_a_ckpt_path_of_which_no_weight_fits_is_an_error(tmp_path):
    """Loading is non-strict (a ckpt_path is often a part of the model), so a checkpoint of another
    model loaded nothing and training went on from random weights without a word."""
    from safetensors.torch import save_file
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.checkpoints import CheckpointError
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    whole = {f"first_stage_model.{k}": v.contiguous() for k, v in AutoencoderKL(**kwargs).state_dict().items()}
    save_file(whole, str(tmp_path / "ldm.safetensors"))  # a whole LDM's file: its autoencoder under a prefix
    with pytest.raises(CheckpointError, match="none of the .* weights of .*ldm.safetensors is one of this "
                                              "AutoencoderKL's .e.g. first_stage_model"):
        AutoencoderKL(**kwargs, ckpt_path=str(tmp_path / "ldm.safetensors"))


@pytest.mark.parametrize("model", ["AutoencoderKL", "VQModel"])
def test_a_misspelt_ddconfig_setting_is_an_error_and_each_half_gets_its_own(model):
    """Encoder and Decoder share one ddconfig and used to swallow any key they did not take, so
    `attn_typ: none` built attention anyway. double_z is the encoder's, tanh_out the decoder's."""
    import ldm.models.autoencoder as autoencoder
    double_z = model == "AutoencoderKL"  # KL's encoder outputs a mean and a log-variance
    ddconfig = dict(double_z=double_z, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, tanh_out=True)
    kwargs = dict(lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                  **({"n_embed": 8} if model == "VQModel" else {}))
    built = getattr(autoencoder, model)(ddconfig=ddconfig, **kwargs)
    assert built.decoder.tanh_out and built.encoder.conv_out.out_channels == (8 if double_z else 4)
    with pytest.raises(ConfigError, match="does not take attn_typ;"):
        getattr(autoencoder, model)(ddconfig={**ddconfig, "attn_typ": "none"}, **kwargs)


def test_a_missing_pretrained_first_stage_names_the_download_script(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.checkpoints import CheckpointError
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    missing = tmp_path / "models" / "first_stage_models" / "kl-f8" / "model.ckpt"
    with pytest.raises(CheckpointError) as raised:
        AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=str(missing))
    assert str(raised.value) == (f"Checkpoint not found: {missing} (the ckpt_path of the config's AutoencoderKL; "
                                 f"scripts/download_first_stages.sh downloads the pretrained first stages)")


def test_a_ckpt_path_without_an_ema_copy_starts_the_ema_from_its_weights(tmp_path):
    """LitEma copies the weights when the model is built, before ckpt_path is read: a file without
    model_ema.* (an export, SD's released weights) left the average at the random initialisation,
    which ema_scope() then swapped in for validation and image logs."""
    from safetensors.torch import save_file
    ddconfig = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, n_embed=16, embed_dim=4)
    torch.manual_seed(0)
    trained = VQModel(**kwargs, use_ema=False)
    path = tmp_path / "exported.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    torch.manual_seed(1)
    reloaded = VQModel(**kwargs, use_ema=True, ckpt_path=str(path))
    with reloaded.ema_scope():
        for name, tensor in trained.state_dict().items():
            assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert reloaded.model_ema.num_updates == 0


def test_a_ckpt_path_with_weights_of_other_shapes_is_one_error(tmp_path):
    """Non-strict loading still refuses other shapes, with a RuntimeError listing every weight
    (874 lines for the 16 px model with a wider UNet): main.py printed it all as a traceback."""
    from safetensors.torch import save_file
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.checkpoints import WeightsMismatchError
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    kwargs = dict(lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    narrow = AutoencoderKL(ddconfig=ddconfig, **kwargs).state_dict()
    save_file({k: v.contiguous() for k, v in narrow.items()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"narrow.safetensors has \d+ weights with shapes other than "
                                                   r"this AutoencoderKL's \(e.g. decoder.conv_in.bias: \(64,\), the "
                                                   r"config's \(128,\)\); is it the checkpoint meant"):
        AutoencoderKL(ddconfig={**ddconfig, "ch": 64}, **kwargs, ckpt_path=str(tmp_path / "narrow.safetensors"))
