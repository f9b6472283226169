"""Reference cache (ldm/modules/consistency_reference.py): written once, read by later batches,
bit-exactly equal to in-batch anchor mode on the tiny UNet / tiny LatentDiffusion (CPU)."""
import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FULL_CONFIG, TINY_CONFIG, has_plain_file_mode
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.consistency import ConsistentAttentionConfig, Group, consistent_attention, self_attention_sites
from ldm.modules.consistency_reference import (ReferenceCache, ReferenceMismatch, ReferenceRun, read_reference,
                                               record_reference, reference_nbytes, run_anchors)
from ldm.util import instantiate_from_config

ANCHOR = ConsistentAttentionConfig(groups=frozenset(Group), mode="anchor", n_anchors=1)
N = 3  # images per CFG half


@pytest.fixture(scope="module")
def model(tiny_model_with_weights):
    return tiny_model_with_weights


def batch(seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * N, 4, hw, hw, generator=g), torch.full((2 * N,), 500), torch.randn(2 * N, 77, 32, generator=g)


def unet_call(model, x, t, c):
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=c)


def test_unet_reading_the_reference_of_image_0_equals_anchor_mode(model):
    x, t, c = batch()
    plain = unet_call(model, x, t, c)
    with consistent_attention(model, ANCHOR, N):
        anchored = unet_call(model, x, t, c)
    with record_reference(model, ANCHOR, N) as cache:
        written = unet_call(model, x, t, c)
    assert torch.equal(written, plain)  # recording never changes the reference run
    with read_reference(model, cache, N):
        read = unet_call(model, x, t, c)
    for half in (0, N):  # the readers equal in-batch anchor mode, in both CFG halves
        assert torch.equal(read[half + 1:half + N], anchored[half + 1:half + N])
        # image 0 reads its own K/V twice: the same softmax average, up to rounding
        torch.testing.assert_close(read[half], plain[half], rtol=1e-4, atol=1e-5)
    assert cache.tensors  # and the model is restored
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(model))
    assert not model.model.diffusion_model._forward_pre_hooks
    assert torch.equal(unet_call(model, x, t, c), plain)


def ddim(model, x_T, cond, uncond, steps=3):
    with torch.no_grad():
        latents, _ = DDIMSampler(model).sample(S=steps, conditioning=cond, batch_size=x_T.shape[0],
                                               shape=list(x_T.shape[1:]), verbose=False, x_T=x_T,
                                               unconditional_guidance_scale=5.0, unconditional_conditioning=uncond)
    return latents


PROMPTS = ["a red chair", "a chair in a room", "a chair at night"]


@pytest.fixture(scope="module")
def sampled(model):
    """DDIM on the tiny LatentDiffusion: plain, in-batch anchors, and a reference of image 0."""
    with torch.no_grad():
        cond = model.get_learned_conditioning(PROMPTS)
        uncond = model.get_learned_conditioning(N * [""])
    x_T = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    run = lambda: ddim(model, x_T, cond, uncond)
    with consistent_attention(model, ANCHOR, N):
        anchored = run()
    with record_reference(model, ANCHOR, N) as cache:
        written = run()
    return dict(plain=run(), anchored=anchored, written=written, cache=cache, run=run, cond=cond, uncond=uncond)


def test_sampling_with_the_reference_equals_anchor_mode(model, sampled):
    assert torch.equal(sampled["written"], sampled["plain"])  # the reference image is the vanilla one
    with read_reference(model, sampled["cache"], N):
        read = sampled["run"]()
    assert torch.equal(read[1:], sampled["anchored"][1:])
    assert not torch.equal(read[1:], sampled["plain"][1:])
    assert len(sampled["cache"].header["timesteps"]) == 3  # one UNet call per DDIM step


def test_run_anchors_sample_the_first_batch_in_anchor_mode_and_later_batches_read_its_anchors(model, sampled):
    """--consistent-attn over several batches (--n_iter): one set of anchors for the whole run."""
    anchors = run_anchors(ANCHOR, batches=2)
    with anchors.batch(model, PROMPTS):
        first = sampled["run"]()
    assert torch.equal(first, sampled["anchored"])  # keeping the anchors' K/V changes nothing
    with anchors.batch(model, PROMPTS):  # a later batch reads them instead of having its own anchor
        later = sampled["run"]()
    assert torch.equal(later[1:], sampled["anchored"][1:])  # as if the first batch's anchor were in it
    # image 0 reads its own K/V twice: the plain image up to rounding, summed over the 3 steps
    torch.testing.assert_close(later[0], sampled["plain"][0], rtol=1e-3, atol=1e-4)
    # a later batch of other images reads the first batch's anchor, not an anchor of its own
    other_x_T = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with anchors.batch(model, PROMPTS):
        other = ddim(model, other_x_T, sampled["cond"], sampled["uncond"])
    with read_reference(model, sampled["cache"], N):  # the reference of the first batch's image 0
        reading_the_first = ddim(model, other_x_T, sampled["cond"], sampled["uncond"])
    with consistent_attention(model, ANCHOR, N):
        own_anchor = ddim(model, other_x_T, sampled["cond"], sampled["uncond"])
    assert torch.equal(other, reading_the_first) and not torch.equal(other[1:], own_anchor[1:])
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(model))
    # mode all and sample have no images a later batch could read; one batch needs nothing kept
    assert run_anchors(dataclasses.replace(ANCHOR, mode="all"), batches=2) is None
    assert run_anchors(ANCHOR, batches=1) is None and run_anchors(None, batches=2) is None
    with pytest.raises(ValueError, match="anchor mode only"):
        with record_reference(model, dataclasses.replace(ANCHOR, mode="all"), N, share=True):
            pass


@pytest.mark.parametrize("extras", [dict(subjects=("chair",)), dict(adain=True), dict(subjects=("chair",), adain=True)],
                         ids=["subject", "adain", "subject+adain"])
def test_subject_masks_and_adain_read_from_a_reference_equal_anchor_mode(model, sampled, extras, tmp_path):
    config = dataclasses.replace(ANCHOR, **extras)
    with consistent_attention(model, config, N, prompts=PROMPTS):
        anchored = sampled["run"]()
    assert not torch.equal(anchored[1:], sampled["anchored"][1:])  # masks / statistics change the readers
    with record_reference(model, config, N, prompts=PROMPTS) as cache:
        written = sampled["run"]()
    assert torch.equal(written, sampled["plain"])  # recording still changes nothing
    assert cache.header["format"] == "sd-consistency-reference/2"  # a /1 reader would drop masks/statistics
    masks = {key: t for key, t in cache.tensors.items() if key.startswith("mask|")}
    stats = [key for key in cache.tensors if key.endswith(("_mean", "_std"))]
    if config.subjects:  # one (1, T) map per token resolution and call, none at the first call (no maps yet)
        assert {int(key.split("|")[2]) for key in masks} == {1, 2}
        assert all(t.dtype == torch.bool and t.shape[0] == 1 for t in masks.values())
    else:
        assert not masks
    assert len(stats) == (4 * len([k for k in cache.tensors if k.endswith("|k")]) if config.adain else 0)

    cache.save(tmp_path / "ref.safetensors")  # K/V in fp16; masks and statistics as recorded
    loaded = ReferenceCache.load(tmp_path / "ref.safetensors")
    assert all(torch.equal(loaded.tensors[key], cache.tensors[key]) for key in [*masks, *stats])
    # the reader needs no prompts and no subject word: the reference's masks are used
    with read_reference(model, cache, N):
        read = sampled["run"]()
    assert torch.equal(read[1:], anchored[1:])
    # and over a run of batches: the first samples as in-batch anchor mode, a later one reads it
    anchors = run_anchors(config, batches=2)
    for _ in range(2):
        with anchors.batch(model, PROMPTS):
            batch = sampled["run"]()
        assert torch.equal(batch[1:], anchored[1:])


@pytest.mark.parametrize("extras", [dict(), dict(subjects=("chair",), adain=True)], ids=["kv", "subject+adain"])
def test_a_chosen_anchor_image_is_recorded_and_read_like_the_first(model, sampled, extras):
    """--anchor-images 2: image 2 is the anchor in the batch, in a reference and over a run; only
    its prompt needs the subject word."""
    config = dataclasses.replace(ANCHOR, anchor_images=(2,), **extras)
    prompts = ["a table", "a lamp", PROMPTS[2]]  # where the recorded image's subject is: only its own prompt
    readers = [0, 1]
    with consistent_attention(model, config, N, prompts=PROMPTS):
        anchored = sampled["run"]()
    assert torch.equal(anchored[2], sampled["plain"][2])  # the chosen anchor is the plain image
    assert not torch.equal(anchored[readers], sampled["plain"][readers])
    assert not torch.equal(anchored[readers], sampled["anchored"][readers])  # another anchor, another look
    with record_reference(model, config, N, prompts=prompts) as cache:
        assert torch.equal(sampled["run"](), sampled["plain"])
    assert cache.header["n_images"] == 1 and cache.header["settings"]["anchor_images"] == [2]
    with read_reference(model, cache, N):
        read = sampled["run"]()
    assert torch.equal(read[readers], anchored[readers])
    anchors = run_anchors(config, batches=2)
    for _ in range(2):  # the first batch as in-batch anchor mode, the later one reads its image 2
        with anchors.batch(model, PROMPTS):
            batch = sampled["run"]()
        assert torch.equal(batch[readers], anchored[readers])


@pytest.mark.parametrize("extras", [dict(), dict(subjects=("chair",), adain=True)], ids=["kv", "subject+adain"])
def test_reading_a_reference_never_changes_it(model, sampled, extras, tmp_path):
    """Readers take the reference's tensors as they are (no copy on their device): nothing a
    reading batch computes may write into them, in memory or in the file."""
    config = dataclasses.replace(ANCHOR, **extras)
    with record_reference(model, config, N, prompts=PROMPTS) as cache:
        sampled["run"]()
    path = tmp_path / "ref.safetensors"
    cache.save(path, dtype=torch.float32)
    file_bytes = path.read_bytes()
    recorded = {key: t.clone() for key, t in cache.tensors.items()}
    header = copy.deepcopy(cache.header)
    reads = []
    for _ in range(2):
        with read_reference(model, cache, N):
            reads.append(sampled["run"]())
    assert torch.equal(reads[0], reads[1])  # the second batch reads exactly what the first read
    assert cache.header == header and cache.tensors.keys() == recorded.keys()
    assert all(torch.equal(cache.tensors[key], t) for key, t in recorded.items())
    with read_reference(model, ReferenceCache.load(path), N):
        assert torch.equal(sampled["run"](), reads[0])
    assert path.read_bytes() == file_bytes


def test_only_the_recorded_images_need_the_subject_word(model, sampled):
    config = dataclasses.replace(ANCHOR, subjects=("chair",))
    with record_reference(model, config, N, prompts=["a red chair", "a table", "a lamp"]) as cache:
        sampled["run"]()
    assert any(key.startswith("mask|") for key in cache.tensors)
    assert sampled["cache"].header["format"] == "sd-consistency-reference/1"  # nothing but K/V


def test_file_round_trip(model, sampled, tmp_path):
    cache, path = sampled["cache"], tmp_path / "ref.safetensors"
    cache.save(path, dtype=torch.float32)
    assert has_plain_file_mode(path)  # readable by whoever may read the batch's other outputs
    loaded = ReferenceCache.load(path)
    assert loaded.header == cache.header and loaded.tensors.keys() == cache.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in cache.tensors.items())
    with open(path, "r+b") as f:  # overwritten in place (as cp does) after loading: what was loaded stays
        f.write(bytes(path.stat().st_size))
    with read_reference(model, loaded, N):  # read from the file: still exactly anchor mode
        assert torch.equal(sampled["run"]()[1:], sampled["anchored"][1:])
    with pytest.raises(FileExistsError):  # never overwritten
        cache.save(path)
    cache.save(tmp_path / "half.safetensors")  # default fp16: half the bytes, values rounded to fp16
    half = ReferenceCache.load(tmp_path / "half.safetensors")
    assert all(half.tensors[k].dtype == torch.float16 and torch.equal(half.tensors[k], t.half())
               for k, t in cache.tensors.items())
    assert half.nbytes * 2 == cache.nbytes
    damaged = ReferenceCache({k: v for k, v in cache.header.items() if k != "run"}, cache.tensors)
    damaged.save(tmp_path / "damaged.safetensors")
    with pytest.raises(ReferenceMismatch, match="damaged reference file: its header lacks run"):
        ReferenceCache.load(tmp_path / "damaged.safetensors")


def test_only_the_selected_layers_and_window_are_stored_and_the_size_formula_holds(model):
    cfg = ConsistentAttentionConfig(groups={"middle"}, blocks="decoder", window=(0.0, 0.5))
    x_T = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning(N * ["a chair"]), model.get_learned_conditioning(N * [""])
    with record_reference(model, cfg, N) as cache:
        ddim(model, x_T, cond, uncond, steps=4)
    sites = {key.split("|")[0] for key in cache.tensors}
    assert sites == {s.name for s, _ in self_attention_sites(model) if s.group.value == "middle" and s.side == "decoder"}
    t_by_call = cache.header["timesteps"]
    calls = {int(key.split("|")[1]) for key in cache.tensors}
    assert calls == {i for i, t in enumerate(t_by_call) if 1 - t / 1000 <= 0.5} and 0 < len(calls) < 4
    assert cache.nbytes == reference_nbytes(model, cfg, (8, 8), len(calls), halves=2, n_images=1, bytes_per_value=4)


def test_a_reference_from_another_model_size_or_trajectory_is_refused(model, sampled):
    cache = sampled["cache"]
    torch.manual_seed(1)
    other = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model).eval()
    with pytest.raises(ReferenceMismatch, match="another model"):
        with read_reference(other, cache, N):
            pass
    with read_reference(model, cache, N), pytest.raises(ReferenceMismatch, match="latent"):
        unet_call(model, *batch(hw=16))
    with read_reference(model, cache, N), pytest.raises(ReferenceMismatch, match="trajectory"):
        unet_call(model, *batch())  # t=500: not the reference's first step
    with read_reference(model, cache, N), pytest.raises(ReferenceMismatch, match="trajectory"):  # 4 steps, not 3
        ddim(model, torch.randn(N, 4, 8, 8), *(model.get_learned_conditioning(N * [p]) for p in ("a", "")), steps=4)
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(model))
    # the scripts' batch wrapper makes it one error line naming the file, not a traceback
    with pytest.raises(SystemExit, match=r"^error: --read-reference ref.safetensors: the sampling trajectory"):
        with ReferenceRun("ref.safetensors", cache=cache).batch(model, PROMPTS):
            unet_call(model, *batch())
    assert all(attn.kv_sharing is None for _, attn in self_attention_sites(model))


def test_a_model_with_an_ema_copy_reads_back_what_it_recorded_while_sampling(model, tmp_path):
    """txt2img records inside ema_scope (the EMA weights in the UNet) and checks a reference right
    after loading, outside it: the fingerprint is the same, and another EMA copy is another model."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.use_ema = True
    ema_model = instantiate_from_config(config.model).eval()
    ema_model.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for buffer in ema_model.model_ema.buffers():
            if buffer.is_floating_point() and buffer.dim() > 0:
                buffer.add_(0.5)  # EMA weights other than the training weights
    with ema_model.ema_scope(), record_reference(ema_model, ANCHOR, N) as cache:
        unet_call(ema_model, *batch())
    cache.save(tmp_path / "ref.safetensors")
    run = ReferenceRun(str(tmp_path / "ref.safetensors"), cache=ReferenceCache.load(tmp_path / "ref.safetensors"))
    run.check_model(ema_model)  # outside ema_scope, as txt2img's check_against_model
    with ema_model.ema_scope(), read_reference(ema_model, run.cache, N):
        unet_call(ema_model, *batch())
    with torch.no_grad():
        next(b for b in ema_model.model_ema.buffers() if b.dim() > 0).add_(1.0)
    with pytest.raises(ReferenceMismatch, match="another model"):
        run.check_model(ema_model)


def test_sd_v1_reference_size():
    with torch.device("meta"):
        full = instantiate_from_config(OmegaConf.load(FULL_CONFIG).model.params.unet_config)
    all_groups = ConsistentAttentionConfig(groups=frozenset(Group))
    assert reference_nbytes(full, all_groups, (64, 64), calls=50) == 50 * 2 * 2 * 11_550_720 * 2  # 4.62 GB


def _settings(cache, **changes):
    return {**cache.header, "settings": {**cache.header["settings"], **changes}}


@pytest.mark.parametrize("damage,message", [
    (lambda c: (_settings(c, subjects=["chair"]), c.tensors),
     "settings name subjects ['chair'] but it holds no subject masks"),
    (lambda c: (_settings(c, adain=True), c.tensors), "lacks q_mean, q_std, k_mean, k_std"),
    (lambda c: (_settings(c, modee="all"), c.tensors), "its settings are not valid"),
    (lambda c: (_settings(c, n_anchors=0), c.tensors), "its settings are not valid (anchor count"),
    (lambda c: (c.header, {k: t for k, t in c.tensors.items() if not k.endswith("|v")}), "lacks v"),
    (lambda c: (c.header, {k: t.repeat(1, 2, 1, 1, 1) for k, t in c.tensors.items()}), "not (halves, images) = (2, 1)"),
    (lambda c: ({k: v for k, v in c.header.items() if k != "halves"}, c.tensors), "holds no keys/values"),
], ids=["subjects-without-masks", "adain-without-statistics", "unknown-setting", "bad-setting", "keys-without-values",
        "wrong-shape", "no-halves"])
def test_a_damaged_reference_is_refused_on_load_not_while_sampling(sampled, tmp_path, damage, message):
    header, tensors = damage(sampled["cache"])
    path = tmp_path / "ref.safetensors"
    ReferenceCache(header, tensors).save(path, dtype=torch.float32)
    with pytest.raises(ReferenceMismatch, match="damaged reference file") as err:
        ReferenceCache.load(path)
    assert message in str(err.value)


def test_a_reference_recorded_when_share_blocks_was_called_half_still_loads(sampled, tmp_path):
    cache = sampled["cache"]
    settings = {("half" if k == "blocks" else k): v for k, v in cache.header["settings"].items()}
    path = tmp_path / "ref.safetensors"
    ReferenceCache({**cache.header, "settings": settings}, cache.tensors).save(path, dtype=torch.float32)
    assert ReferenceCache.load(path).header["settings"] == cache.header["settings"]


def test_a_window_that_no_step_reaches_records_nothing_and_writes_no_file(model, tmp_path):
    narrow = dataclasses.replace(ANCHOR, window=(0.0, 0.2))  # 4 DDIM steps: progress 0.25, 0.5, 0.75, 1.0
    x_T = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning(N * ["a chair"]), model.get_learned_conditioning(N * [""])
    with record_reference(model, narrow, N) as cache:
        ddim(model, x_T, cond, uncond, steps=4)
    assert not cache.tensors and len(cache.header["timesteps"]) == 4
    with pytest.raises(ValueError, match="nothing was recorded"):
        cache.save(tmp_path / "ref.safetensors")
    assert not (tmp_path / "ref.safetensors").exists()
