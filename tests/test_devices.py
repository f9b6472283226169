"""The exact invariants of consistent attention on every device at hand: the CPU (here and in CI)
and CUDA in fp32 and fp16 autocast (a GPU machine: scripts/gpu_session.sh, job `cuda`).

test_consistency.py and test_reference.py check them thoroughly on the CPU. What the README
states as exact is repeated here where other kernels run (CUDA's flash / memory-efficient SDPA,
cuBLAS, cuDNN, fp16): one image shares nothing, the anchors (the first or chosen ones) are the
plain images, CFG halves never mix, a reference reads like in-batch anchors, and the anchor of a
whole DDIM run with step noise, in-process and through txt2img, is the image sampled without
sharing. Only the agreement of SDPA with upstream's einsum attention has a tolerance.

The GPU kernels behind SDPA divide their work by the size of the call (FlashAttention splits the
keys into pieces when batch x heads leaves SMs idle), so an image attended in a call of another
batch size than the plain model's may differ in its last bits; the tiny test model is too small
for that to happen on a GPU. `batch_variant_attention` makes it happen on the CPU, at any size."""
import copy
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import CrossAttention, sdpa_attention, set_attention_backend
from ldm.modules.consistency import ConsistentAttentionConfig, Group, consistent_attention
from ldm.modules.consistency_reference import read_reference, record_reference
from test_cli_consistency import args, pixels, txt2img
from test_cli import assert_ok

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SETTINGS = [pytest.param("cpu", None, id="cpu"),
            pytest.param("cuda", None, id="cuda-fp32", marks=NEEDS_CUDA),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=NEEDS_CUDA)]
ALL = dict(groups=frozenset(Group))
N = 3  # images per CFG half


@pytest.fixture(scope="module")
def models(tiny_model_with_weights):
    """device -> the tiny LatentDiffusion (SD v1's attention layout, every weight non-zero) there."""
    cache = {}

    def on(device):
        if device not in cache:
            cache[device] = copy.deepcopy(tiny_model_with_weights).to(device)
        return cache[device]
    return on


def precision(device, dtype):
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def unet_call(model, x, t, c, dtype, config=None, n=N, sharing=None):
    """One UNet call on the batch (2n images: [uncond; cond]), in float32 on the CPU."""
    sharing = sharing if sharing is not None else consistent_attention(model, config, n)
    with torch.no_grad(), precision(x.device.type, dtype), sharing:
        return model.model.diffusion_model(x, t, context=c).float().cpu()


def batch(device, images=2 * N, seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    x, c = torch.randn(images, 4, 8, 8, generator=g), torch.randn(images, 77, 32, generator=g)
    return x.to(device), torch.full((images,), 500, device=device), c.to(device)


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("mode", ["all", "anchor", "sample"])
def test_one_image_shares_nothing(models, device, dtype, mode):
    model, (x, t, c) = models(device), batch(device, images=1)
    shared = unet_call(model, x, t, c, dtype, ConsistentAttentionConfig(mode=mode, **ALL), n=1)
    assert torch.equal(shared, unet_call(model, x, t, c, dtype))


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("anchor_images", [(), (2,)], ids=["first", "chosen"])
def test_the_anchors_are_the_plain_images(models, device, dtype, anchor_images):
    model, (x, t, c) = models(device), batch(device)
    config = ConsistentAttentionConfig(mode="anchor", anchor_images=anchor_images, **ALL)
    shared, plain = unet_call(model, x, t, c, dtype, config), unet_call(model, x, t, c, dtype)
    anchor = (anchor_images or (0,))[0]
    for half in (0, N):
        readers = [half + i for i in range(N) if i != anchor]
        assert torch.equal(shared[half + anchor], plain[half + anchor])
        assert not torch.equal(shared[readers], plain[readers])


@pytest.mark.parametrize("device,dtype", SETTINGS)
@pytest.mark.parametrize("mode", ["all", "anchor"])
def test_cfg_halves_never_mix(models, device, dtype, mode):
    model, (x, t, c), (x2, _, c2) = models(device), batch(device), batch(device, seed=9)
    config = ConsistentAttentionConfig(mode=mode, **ALL)
    base = unet_call(model, x, t, c, dtype, config)
    cond_changed = unet_call(model, torch.cat([x[:N], x2[N:]]), t, torch.cat([c[:N], c2[N:]]), dtype, config)
    uncond_changed = unet_call(model, torch.cat([x2[:N], x[N:]]), t, torch.cat([c2[:N], c[N:]]), dtype, config)
    assert torch.equal(cond_changed[:N], base[:N])  # new cond images: the uncond half is untouched
    assert torch.equal(uncond_changed[N:], base[N:])  # and the other way round
    plain = unet_call(model, x, t, c, dtype, sharing=nullcontext())  # each half did share
    assert not torch.equal(base[:N], plain[:N]) and not torch.equal(base[N:], plain[N:])


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_a_reference_reads_like_in_batch_anchors(models, device, dtype):
    model, (x, t, c) = models(device), batch(device)
    config = ConsistentAttentionConfig(mode="anchor", **ALL)
    anchored = unet_call(model, x, t, c, dtype, config)
    with record_reference(model, config, N, storage=None) as cache:  # kept on the device, as run anchors are
        written = unet_call(model, x, t, c, dtype, sharing=nullcontext())
    read = unet_call(model, x, t, c, dtype, sharing=read_reference(model, cache, N))
    assert torch.equal(written, unet_call(model, x, t, c, dtype))  # recording changes nothing
    for half in (0, N):
        assert torch.equal(read[half + 1:half + N], anchored[half + 1:half + N])


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_the_anchors_are_the_plain_images_where_a_gpu_kernel_splits_the_keys(models, device, dtype):
    """A 32² latent and N = 4: on an H100 or H200 (132 SMs) FlashAttention-2's heuristic would split
    the keys of an anchors-only call (batch 2) at the 1024-token level four ways, and those of the
    plain call (batch 8) not at all."""
    n, model = 4, models(device)
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2 * n, 4, 32, 32, generator=g).to(device), torch.randn(2 * n, 77, 32, generator=g).to(device)
    t = torch.full((2 * n,), 500, device=device)
    config = ConsistentAttentionConfig(mode="anchor", **ALL)
    shared, plain = unet_call(model, x, t, c, dtype, config, n=n), unet_call(model, x, t, c, dtype, n=n)
    assert torch.equal(shared[[0, n]], plain[[0, n]])
    assert not torch.equal(shared[[1, n + 1]], plain[[1, n + 1]])


@contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in full precision: cuDNN runs fp32 convolutions in TF32 by
    default, and the 1e-6 by which SDPA and einsum attention differ then moves TF32's rounding in
    the convolutions after them (steps of 5e-4 relative) far past this test's 1e-4."""
    settings = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, precision in zip(settings, before):
            s.fp32_precision = precision


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_sdpa_agrees_with_upstream_einsum_attention(models, device, dtype):
    model, (x, t, c) = models(device), batch(device)
    with ieee_fp32():
        fast = unet_call(model, x, t, c, dtype)
        set_attention_backend(model, "einsum")
        try:
            reference = unet_call(model, x, t, c, dtype)
        finally:
            set_attention_backend(model, "sdpa")
    tolerance = 1e-4 if dtype is None else 2e-2  # fp16: ~3 significant digits per layer
    torch.testing.assert_close(fast, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_a_ddim_run_with_step_noise_keeps_the_anchor_image(models, device, dtype):
    """Guidance and eta 1 (fresh noise at every step, drawn on the device): the anchor of the whole
    run is the image sampled without sharing, bit for bit; the others are not."""
    model = models(device)
    prompts = ["a red chair", "a chair in a room", "a chair at night"]
    x_T = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(device)

    def sample(config):
        torch.manual_seed(0)  # the step noise
        with torch.no_grad(), precision(device, dtype), consistent_attention(model, config, N):
            cond, uncond = model.get_learned_conditioning(prompts), model.get_learned_conditioning(N * [""])
            latents, _ = DDIMSampler(model).sample(S=3, conditioning=cond, batch_size=N, shape=[4, 8, 8], x_T=x_T,
                                                   eta=1.0, verbose=False, unconditional_guidance_scale=5.0,
                                                   unconditional_conditioning=uncond)
        return latents.float().cpu()

    plain, shared = sample(None), sample(ConsistentAttentionConfig(anchor_images=(1,), **ALL))
    assert torch.equal(shared[1], plain[1])
    assert not torch.equal(shared[[0, 2]], plain[[0, 2]])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=NEEDS_CUDA)])
def test_txt2img_keeps_the_anchor_image(tmp_path, tiny_ckpt, device):  # noqa: F811
    """The CPU's run of this is tests/test_cli_consistency.py."""
    plain, chosen = tmp_path / "plain", tmp_path / "chosen"
    on_device = ["--device", device, "--precision", "autocast"]
    assert_ok(txt2img(*args(tiny_ckpt, plain, *on_device)))
    assert_ok(txt2img(*args(tiny_ckpt, chosen, *on_device, "--consistent-attn", "--share-groups", "all",
                            "--anchor-images", "1")))
    before, after = pixels(plain), pixels(chosen)
    assert np.array_equal(after[1], before[1])
    assert not any(np.array_equal(after[i], before[i]) for i in (0, 2))


def batch_variant_attention(q, k, v, mask=None):
    """SDPA through a kernel whose rounding depends on the call's shape, as a GPU's does: the same
    call gives the same numbers, a call with another batch size or key count differs in its last
    bits (a relative 2^-20 per image and key)."""
    return sdpa_attention(q, k, v, mask) * (1 + 2.0 ** -20 * (q.shape[0] + k.shape[2]))


@contextmanager
def batch_variant_kernel(model):
    for layer in model.modules():
        if isinstance(layer, CrossAttention):
            layer.attend = batch_variant_attention
    try:
        yield
    finally:
        set_attention_backend(model, "sdpa")


@pytest.mark.parametrize("device,dtype", SETTINGS)
def test_a_training_loss_and_its_gradients_on_the_device(device, dtype):
    """main.py's training step (LatentDiffusion.forward: random timesteps, p_losses) where it trains:
    upstream's logvar stayed a CPU tensor, indexed with CUDA timesteps, an error on the first step."""
    model = build_tiny_model().to(device).train()
    x, _, c = batch(device)
    with precision(device, dtype):
        loss, logged = model(x, c)
    loss.backward()
    grads = [p.grad for p in model.model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert set(logged) == {"train/loss_simple", "train/loss_vlb", "train/loss"}


def test_the_batch_variant_kernel_differs_between_batch_sizes():
    q, k, v = (torch.randn(4, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert torch.equal(batch_variant_attention(q, k, v), batch_variant_attention(q, k, v))
    assert not torch.equal(batch_variant_attention(q[:1], k[:1], v[:1]), batch_variant_attention(q, k, v)[:1])


SUBJECT_TOKENS = torch.zeros(N, 77, dtype=torch.bool)
SUBJECT_TOKENS[:, 2] = True


@pytest.mark.parametrize("settings,plain_images", [
    (dict(mode="anchor"), [0, N]),
    (dict(mode="anchor", anchor_images=(2,)), [2, N + 2]),
    (dict(mode="anchor", n_anchors=2, adain=True), [0, 1, N, N + 1]),
    (dict(mode="anchor", subjects=("chair",)), [0, N]),
    (dict(mode="all", cfg="cond"), list(range(N))),
], ids=["anchor", "chosen-anchor", "two-anchors-adain", "anchor-subject", "cond-only-uncond-half"])
def test_images_promised_plain_are_plain_with_a_kernel_that_rounds_by_batch_size(models, settings, plain_images):
    """They are rows of the plain model's own attention call, not of a smaller call of their own."""
    model, (x, t, c) = models("cpu"), batch("cpu")
    config = ConsistentAttentionConfig(**ALL, **settings)
    with batch_variant_kernel(model):
        plain = unet_call(model, x, t, c, None)
        sharing = consistent_attention(model, config, N, subject_tokens=SUBJECT_TOKENS)
        with torch.no_grad(), sharing:
            unet = model.model.diffusion_model
            if config.subjects:  # the first call finds the subject; the second reads through its masks
                unet(x, t, context=c)
            shared = unet(x, t, context=c)
    readers = [i for i in range(2 * N) if i not in plain_images]
    assert torch.equal(shared[plain_images], plain[plain_images])
    assert not torch.equal(shared[readers], plain[readers])


@pytest.mark.parametrize("settings", [dict(), dict(anchor_images=(1,)), dict(subjects=("chair",), adain=True)],
                         ids=["first", "chosen", "subject+adain"])
def test_a_reference_reads_like_in_batch_anchors_with_a_kernel_that_rounds_by_batch_size(models, settings):
    """In-batch readers are attended in one call with the anchors' rows (dropped), the shape of a
    batch reading the recorded anchors. Two UNet calls: subject masks come from the call before."""
    model, (x, t, c) = models("cpu"), batch("cpu")
    config = ConsistentAttentionConfig(mode="anchor", **ALL, **settings)
    readers = [i for i in range(N) if i not in (settings.get("anchor_images") or (0,))]
    unet = model.model.diffusion_model

    def second_call(sharing):
        with torch.no_grad(), sharing:
            unet(x, t, context=c)
            return unet(x, t, context=c)

    with batch_variant_kernel(model):
        anchored = second_call(consistent_attention(model, config, N, subject_tokens=SUBJECT_TOKENS))
        with record_reference(model, config, N, storage=None, subject_tokens=SUBJECT_TOKENS) as cache:
            second_call(nullcontext())
        read = second_call(read_reference(model, cache, N))
    for half in (0, N):
        assert torch.equal(read[[half + i for i in readers]], anchored[[half + i for i in readers]])
