"""Reference cache for consistent attention: write once, read many.

Anchor mode (consistency.py) makes a batch follow its first k images by letting every image read
the anchors' self-attention keys/values. The anchors must then be re-generated in every batch.
Here they are generated once: `record_reference` runs a normal sampling pass (its images are
exactly the plain model's) and keeps the K/V of the first k images of each CFG half, per
selected self-attention layer and per UNet call; `read_reference` lets every image of later
batches read those K/V as extra keys/values, through the same code as in-batch anchors
(`read_with_anchors`). Cost per image is O(1) in the batch size, like anchor mode. The same
machinery, in memory, lets the later batches of a `--consistent-attn` run read the first batch's
anchors (`RunAnchors`), so that a whole run agrees, not each batch on its own.

Keys are (layer site name, UNet call index). The call index, not the timestep, because PLMS
calls the UNet twice in its first step and again at the second call's timestep (3 steps: 667,
334, 334, 1); the timestep of every call is stored too, and a read whose trajectory differs
(another sampler, step count or strength) is refused at the first differing call. Guidance: the
batch is `[uncond; cond]`; the halves are recorded separately and each is read into the matching
half, so the prompt never leaks into the unconditional estimate.

Subject masks and AdaIN (`--subject`, `--share-adain`, consistency_subject.py) work with a
reference too. Recording then also keeps, per UNet call, the reference images' subject masks (one
bool map per token resolution, from the reference run's own cross-attention) and, per layer, the
first reference image's per-channel query/key statistics; a reader reads the reference's tokens
only inside those masks, and its queries/keys are renormalised to those statistics, exactly as an
image reads in-batch anchors. The reader's prompts need not contain the subject word: only the
reference's masks are used. Both are small next to the K/V (a few KB per call).

Size: only the selected layers and the calls inside the step window are stored; per call and
reference image it is halves · 2 (K and V) · Σ_layers tokens · channels values
(`reference_nbytes`, numbers for SD v1 in CONSISTENCY_NOTES.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ldm.modules.diffusionmodules.openaimodel import timestep_of_call
from ldm.script_helpers import check_new_file
from ldm.checkpoints import save_safetensors
from ldm.modules.consistency import (ConsistentAttentionConfig, SharedKV, ShareMode, adain_to, channel_stats,
                                     check_anchor_images, config_from_share_flags, cross_attention_layers,
                                     disable_consistent_attention, given_share_flags, in_window, read_masked,
                                     read_with_anchors, selected_sites, share_per_cfg_group, split_groups,
                                     subject_masks_for, subject_tokens_in, unet_of)

log = logging.getLogger(__name__)

# /2 files also hold subject masks and/or AdaIN statistics: a /1 reader would read them without
# both, so it must refuse them; this reader takes both.
FORMAT, FORMAT_WITH_SUBJECT_OR_ADAIN = "sd-consistency-reference/1", "sd-consistency-reference/2"
ADAIN_STATS = ("q_mean", "q_std", "k_mean", "k_std")
HEADER_KEYS = ("model", "n_images", "settings", "timesteps", "run")  # besides "format"


class ReferenceMismatch(ValueError):
    """The reference was recorded under conditions the current run does not match."""


def model_fingerprint(model) -> str:
    """sha256 of the names, shapes, dtypes and first values of the weights the UNet samples with:
    cheap (no pass over 860M weights), and any other checkpoint or architecture gives another
    fingerprint. A model with an EMA copy (use_ema) samples with that copy, which ema_scope swaps
    into the UNet: its own buffers hold it inside that scope and outside alike, so a reference
    recorded while sampling passes the check a reader makes right after loading."""
    if getattr(model, "use_ema", False):
        shadows = dict(model.model_ema.named_buffers())
        weights = {name: shadows[name] for name in model.model_ema.parts()["diffusion_model"]}  # not its counters
    else:
        weights = unet_of(model).state_dict()
    digest = hashlib.sha256()
    for name, tensor in weights.items():
        head = tensor.detach().flatten()[:8].float().cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode() + head)
    return digest.hexdigest()


@dataclass
class ReferenceCache:
    """Recorded K/V: tensors["site|call|k"] is (halves, n_images, heads, tokens, head_dim).
    With subjects: tensors["mask|tokens|call"], (n_images, tokens) bool; with AdaIN:
    tensors["site|call|q_mean"] etc., (halves, 1, heads, 1, head_dim) float32, of image 0."""
    header: dict
    tensors: dict = field(default_factory=dict)

    def kv(self, site: str, call: int):
        try:
            return self.tensors[f"{site}|{call}|k"], self.tensors[f"{site}|{call}|v"]
        except KeyError:
            raise ReferenceMismatch(f"the reference holds no keys/values for {site} at UNet call {call}") from None

    def to(self, device) -> "ReferenceCache":
        """The same reference with its tensors on `device` (the header is shared)."""
        return ReferenceCache(self.header, {key: t.to(device) for key, t in self.tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def check(self, *, model=None, **expected):
        """Raise ReferenceMismatch naming the first setting that differs, e.g. check(latent=[8, 8])."""
        if model is not None and model_fingerprint(model) != self.header["model"]:
            raise ReferenceMismatch("the reference was recorded with another model (UNet fingerprint differs)")
        for key, value in expected.items():
            if self.header.get(key) != value:
                raise ReferenceMismatch(f"the reference was recorded with {key} {self.header.get(key)}, "
                                        f"this run uses {value}")

    def save(self, path, dtype=torch.float16):
        """safetensors file: the K/V (fp16 by default, half the size; lossless for K/V computed
        under fp16 autocast; masks and statistics as they are) and the header as JSON metadata.
        Never overwrites a file (save_safetensors)."""
        if not self.tensors:
            raise ValueError("nothing was recorded: no UNet call of the sampling run fell inside the step "
                             "window; widen --share-window or take more --ddim_steps")
        tensors = {key: (t.to(dtype) if key.endswith(("|k", "|v")) else t).contiguous()
                   for key, t in self.tensors.items()}
        save_safetensors(tensors, path, metadata={"reference": json.dumps(self.header)})

    @classmethod
    def load(cls, path, device="cpu"):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("reference", "null"))
                # copies, one each (on the CPU too): get_tensor's tensors are views of the mapped
                # file, which a `cp` over it while this run samples would change
                tensors = {key: f.get_tensor(key).to(device, copy=True) for key in f.keys()}
        except Exception as err:  # not a safetensors file at all
            raise ReferenceMismatch(f"{path} is not a reference file: {err}") from None
        if not isinstance(header, dict) or header.get("format") not in (FORMAT, FORMAT_WITH_SUBJECT_OR_ADAIN):
            raise ReferenceMismatch(f"{path} is not a reference file (format {FORMAT_WITH_SUBJECT_OR_ADAIN} "
                                    f"or {FORMAT} expected)")
        missing = [key for key in HEADER_KEYS if key not in header]
        if missing:
            raise ReferenceMismatch(f"{path} is a damaged reference file: its header lacks {', '.join(missing)}")
        if isinstance(header["settings"], dict) and "half" in header["settings"]:
            header["settings"]["blocks"] = header["settings"].pop("half")  # --share-blocks' field until 2026-12-07
        cache = cls(header, tensors)
        damage = cache.damage()
        if damage:
            raise ReferenceMismatch(f"{path} is a damaged reference file: {damage}")
        return cache

    def damage(self) -> str | None:
        """What makes these tensors unable to serve the header's settings, or None. Checked once,
        on load, so that a damaged file fails before the model loads, not halfway through sampling."""
        try:
            config = ConsistentAttentionConfig(**self.header["settings"])
        except (TypeError, ValueError) as err:
            return f"its settings are not valid ({err})"
        entries = {key.rsplit("|", 1)[0] for key in self.tensors if key.endswith(("|k", "|v"))}
        if not entries or "halves" not in self.header:
            return "it holds no keys/values"
        shape = (self.header["halves"], self.header["n_images"])
        for entry in sorted(entries):
            names = ("k", "v") + (ADAIN_STATS if config.adain else ())
            absent = [name for name in names if f"{entry}|{name}" not in self.tensors]
            if absent:
                return f"{entry} lacks {', '.join(absent)}"
            k, v = self.tensors[f"{entry}|k"], self.tensors[f"{entry}|v"]
            if k.dim() != 5 or tuple(k.shape[:2]) != shape or v.shape != k.shape:
                return f"{entry} has keys {tuple(k.shape)} and values {tuple(v.shape)}, not (halves, images) = {shape}"
        calls = {entry.split("|")[1] for entry in entries}
        # the first call of a run has no cross-attention maps yet; every later one records masks
        if config.subjects and len(calls) > 1 and not any(key.startswith("mask|") for key in self.tensors):
            return f"its settings name subjects {list(config.subjects)} but it holds no subject masks"
        return None


@dataclass(eq=False)
class _Pass:
    """State shared by the layers of one recording or reading pass; advanced by a UNet pre-hook."""
    cache: ReferenceCache
    config: ConsistentAttentionConfig
    images_per_group: int
    writing: bool
    dtype: torch.dtype | None = None  # recording: store in this dtype (None: as computed)
    storage: str | None = "cpu"  # recording: keep the K/V on this device (None: where computed)
    subject: object = None  # recording with subjects: the SubjectMasks observer of the reference batch
    sharing: SharedKV | None = None  # recording: how the recorded batch itself attends (None: plainly)
    recorded: tuple = ()  # recording: the batch positions of the images recorded (anchors)
    num_timesteps: int = 1000
    call: int = -1
    active: bool = False
    hook: object = None

    def start_call(self, args, kwargs):
        t, latent = timestep_of_call(args, kwargs), list(args[0].shape[-2:])
        self.call += 1
        if self.subject is not None:
            self.subject.start_call()
        self.active = in_window(self.config, t, self.num_timesteps)
        timesteps = self.cache.header["timesteps"]
        if self.writing:
            self.cache.header.setdefault("latent", latent)
            timesteps.append(t)
            return
        self.cache.check(latent=latent)
        if self.call >= len(timesteps) or timesteps[self.call] != t:
            recorded = timesteps[self.call] if self.call < len(timesteps) else "no call"
            raise ReferenceMismatch(f"the sampling trajectory differs from the reference's: UNet call {self.call} "
                                    f"is at t={t}, the reference has {recorded} (same sampler and steps needed)")


@dataclass(eq=False)
class ReferenceKV:
    """Set on `CrossAttention.kv_sharing` of one layer: records or reads that layer's K/V."""
    state: _Pass
    site: str
    recomputable = False  # it records or reads the step of the UNet call (attention.NOT_RECOMPUTABLE)

    @property
    def hook(self):
        return self.state.hook

    def __call__(self, q, k, v, attend, mask=None):
        state = self.state
        if not state.active:
            return attend(q, k, v, mask)
        if mask is not None:
            raise NotImplementedError("reference keys/values with an attention mask")
        n = state.images_per_group
        if state.writing:
            self._record(split_groups(q, n), split_groups(k, n), split_groups(v, n))  # (halves, N, nh, T, hs)
            if state.sharing is not None:  # anchor mode: the recorded anchors are computed plainly anyway
                return state.sharing(q, k, v, attend, mask)
            return attend(q, k, v, mask)  # recording never changes the reference run
        cache, config = state.cache, state.config
        cache.check(halves=q.shape[0] // n)
        readable = None
        if config.subjects:
            readable = cache.tensors.get(f"mask|{q.shape[2]}|{state.call}")
            if readable is None:  # the first call has no masks yet: nothing is read, as in-batch
                return attend(q, k, v, mask)
            readable = readable.to(q.device)
        ref = [t.to(q.device, q.dtype) for t in cache.kv(self.site, state.call)]
        if config.adain:
            ref += [cache.tensors[f"{self.site}|{state.call}|{name}"].to(q.device) for name in ADAIN_STATS]
        # each CFG half reads the reference's matching half
        return share_per_cfg_group(q, k, v, attend, n, config.cfg, lambda q, k, v, groups, plain: self._read(
            q, k, v, attend, [t[groups] for t in ref], readable))

    def _record(self, q, k, v):
        """Keep the reference images' K/V (halves, a, nh, T, hs), and what subjects and AdaIN need.
        q, k, v: (halves, N, nh, T, hs)."""
        state = self.state
        cache, key, first = state.cache, f"{self.site}|{state.call}", state.recorded[0]
        # the recorded images, in their order: slices of the batch, so no index tensor goes to a GPU
        recorded = lambda t, dim=1: torch.cat([t.narrow(dim, i, 1) for i in state.recorded], dim)  # a new tensor
        cache.header.setdefault("halves", q.shape[0])
        for name, t in (("k", k), ("v", v)):
            cache.tensors[f"{key}|{name}"] = recorded(t).to(state.storage or t.device, state.dtype or t.dtype)
        if state.config.adain:  # the first anchor's statistics, as adain_to_anchor takes them
            q_stats, k_stats = channel_stats(q[:, first:first + 1]), channel_stats(k[:, first:first + 1])
            for name, t in zip(ADAIN_STATS, (*q_stats, *k_stats)):
                cache.tensors[f"{key}|{name}"] = t.cpu()
        if state.subject is not None:
            masks = state.subject.masks_for(q.shape[3])
            if masks is not None:  # per token resolution and call, shared by its layers
                cache.tensors.setdefault(f"mask|{q.shape[3]}|{state.call}", recorded(masks, dim=0).cpu())

    def _read(self, q, k, v, attend, ref, readable):
        """q, k, v: (G, N, nh, T, hs) of the readers; ref: the reference's K/V (G, a, nh, T, hs),
        then with AdaIN the q/k mean and std of its image 0; readable: (a, T) bool or None."""
        ref_k, ref_v, *stats = ref
        if stats:
            q_mean, q_std, k_mean, k_std = stats
            q, k = adain_to(q, q_mean, q_std), adain_to(k, k_mean, k_std)
        if readable is None:
            return read_with_anchors(q, k, v, attend, ref_k, ref_v)
        sources = torch.arange(ref_k.shape[1], device=q.device).expand(q.shape[1], -1)
        return read_masked(q, k, v, attend, sources, ref_k, ref_v, readable)


def _enable(model, state: _Pass, sites):
    disable_consistent_attention(model)
    for site, attn in sites:
        attn.kv_sharing = ReferenceKV(state, site.name)
    if state.subject is not None:
        for attn in cross_attention_layers(model):
            attn.observer = state.subject
    state.num_timesteps = getattr(model, "num_timesteps", 1000)
    state.hook = unet_of(model).register_forward_pre_hook(
        lambda module, args, kwargs: state.start_call(args, kwargs), with_kwargs=True)


@contextmanager
def record_reference(model, config: ConsistentAttentionConfig, images_per_group: int, *,
                     n_images: int | None = None, dtype=None, run_info: dict | None = None,
                     prompts=None, subject_tokens=None, share: bool = False, storage: str | None = "cpu"):
    """Inside: one sampling pass of `model` records the K/V of `n_images` (default config.n_anchors)
    images of each CFG half, the first ones or `config.anchor_images`, in the layers and step
    window `config` selects (UNet calls are numbered from the first; a reader replays exactly that
    one trajectory). Yields the ReferenceCache being filled. `run_info` (seed, prompt, ...) goes
    into the header. With `config.subjects`, `prompts` or `subject_tokens` locate the subject as in
    `enable_consistent_attention`. The pass samples plainly, or with `share` in anchor mode (its
    anchors, the recorded images, are computed plainly in both). `storage`: where the K/V are
    kept, "cpu" for a file, None to leave them on the model's device."""
    if share and config.mode is not ShareMode.ANCHOR:
        raise ValueError(f"a recording pass shares in anchor mode only, not {config.mode.value}")
    n_images = config.n_anchors if n_images is None else n_images
    if not 1 <= n_images <= images_per_group:
        raise ValueError(f"cannot record {n_images} reference images from a batch of {images_per_group}")
    header = {"format": FORMAT_WITH_SUBJECT_OR_ADAIN if config.subjects or config.adain else FORMAT,
              "model": model_fingerprint(model), "n_images": n_images,
              "settings": config.describe(), "timesteps": [], "run": dict(run_info or {})}
    cache = ReferenceCache(header)
    recorded = config.anchor_positions(images_per_group)[:n_images]
    if config.subjects and subject_tokens is None and prompts is not None:
        # only the recorded images' masks are kept, so only their prompts need the subject word
        found = subject_tokens_in(model, config, [prompts[i] for i in recorded])
        subject_tokens = found.new_zeros(images_per_group, found.shape[1])
        subject_tokens[recorded] = found
    subject = subject_masks_for(model, config, images_per_group, prompts, subject_tokens)
    sharing = SharedKV(config, images_per_group, subject=subject) if share else None
    _enable(model, _Pass(cache, config, images_per_group, writing=True, dtype=dtype, storage=storage,
                         subject=subject, sharing=sharing, recorded=tuple(recorded)), selected_sites(model, config))
    try:
        yield cache
    finally:
        disable_consistent_attention(model)


@contextmanager
def read_reference(model, cache: ReferenceCache, images_per_group: int):
    """Inside: every image reads its own tokens plus the reference's, in the layers, step window
    and CFG policy the reference was recorded with. Refuses a reference from another model."""
    cache.check(model=model)
    config = ConsistentAttentionConfig(**cache.header["settings"])
    cache = cache.to(next(unet_of(model).parameters()).device)  # no copy where they are there already
    _enable(model, _Pass(cache, config, images_per_group, writing=False), selected_sites(model, config))
    try:
        yield cache
    finally:
        disable_consistent_attention(model)


@dataclass(eq=False)
class RunAnchors:
    """`--consistent-attn` in anchor mode over a run of several batches (`--n_iter`, `--from-file`):
    one set of anchors for the whole run, not one per batch. The first batch samples in anchor mode
    and keeps its anchors' keys/values (in memory, on the model's device); every image of a later
    batch reads them as a reference, through the same function as in-batch anchors, so it comes out
    as it would with those anchors in its own batch, and the anchors are not sampled again."""
    config: ConsistentAttentionConfig
    cache: ReferenceCache | None = None

    def describe(self) -> dict:
        chosen = (f"image(s) {', '.join(map(str, self.config.anchor_images))}" if self.config.anchor_images
                  else f"the first {self.config.n_anchors} image(s)")
        return {"anchors": f"{chosen} of the run's first batch, read by every later batch"}

    @contextmanager
    def batch(self, model, prompts):
        """Around the sampling of one batch of `prompts` (one per image)."""
        if self.cache is not None:
            with read_reference(model, self.cache, len(prompts)):
                yield
            return
        # a first batch shorter than the anchor count (--from-file) is all anchors, as in anchor_attention
        n_images = min(self.config.n_anchors, len(prompts))
        with record_reference(model, self.config, len(prompts), n_images=n_images, prompts=prompts, share=True,
                              storage=None) as cache:
            yield
        self.cache = cache


def run_anchors(config: ConsistentAttentionConfig | None, batches: int) -> RunAnchors | None:
    """A RunAnchors where a run of `batches` batches shares in anchor mode, else None (each batch
    shares within itself: mode all and sample have no images that the others could read later)."""
    if config is None or config.mode is not ShareMode.ANCHOR or batches < 2:
        return None
    return RunAnchors(config)


def reference_nbytes(model, config: ConsistentAttentionConfig, latent_hw, calls: int, halves: int = 2,
                     n_images: int = 1, bytes_per_value: int = 2) -> int:
    """Size of a reference: calls · halves · n_images · 2 (K, V) · Σ_selected (tokens · channels),
    a layer at resolution level L holding (h/2^L)·(w/2^L) tokens. Works on a meta-device model."""
    h, w = latent_hw
    per_call = sum((h >> site.level) * (w >> site.level) * attn.to_k.out_features
                   for site, attn in selected_sites(model, config))
    return calls * halves * n_images * 2 * per_call * bytes_per_value


# --------------------------------------------------------------------------------------------
# Command line (scripts/txt2img.py and scripts/img2img.py)
# --------------------------------------------------------------------------------------------

def add_arguments(parser):
    group = parser.add_argument_group("reference (record a reference's self-attention once, read it in later runs)")
    group.add_argument("--write-reference", metavar="PATH",
                       help="record the self-attention keys/values of the first --share-anchors K images "
                            "(default 1; or the --anchor-images chosen) of the first batch to a new file; the "
                            "images are the plain model's. --share-groups/--share-blocks/--share-window/"
                            "--share-cfg choose what is stored; with --subject and --share-adain readers also "
                            "get the reference's subject masks and AdaIN statistics")
    group.add_argument("--read-reference", metavar="PATH",
                       help="every image also reads the keys/values of a reference file written with "
                            "--write-reference (same model, image size, sampler and steps), with the "
                            "settings it was recorded with")


@dataclass(eq=False)
class ReferenceRun:
    """What --write-reference / --read-reference ask for; `batch` wraps each sampling batch."""
    path: str
    config: ConsistentAttentionConfig | None = None  # writing
    cache: ReferenceCache | None = None              # reading
    run_info: dict = field(default_factory=dict)
    written: bool = False

    def describe(self) -> dict:
        if self.cache is not None:
            return {"read": self.path, **self.cache.header["settings"], "reference_run": self.cache.header["run"]}
        return {"write": self.path, **self.config.describe()}

    def check_model(self, model):
        """After loading: ReferenceMismatch, naming the file, for a reference from another model."""
        if self.cache is not None:
            try:
                self.cache.check(model=model)
            except ReferenceMismatch as err:
                raise ReferenceMismatch(f"{self.path}: {err}") from None

    @contextmanager
    def batch(self, model, prompts):
        """Around the sampling of one batch of `prompts` (one per image)."""
        if self.cache is not None:
            # moved to the model's device once per run, not once per batch: it can hold GBs
            self.cache = self.cache.to(next(unet_of(model).parameters()).device)
            try:
                with read_reference(model, self.cache, len(prompts)):
                    yield
            except ReferenceMismatch as err:  # found at a UNet call: what the option checks could not see
                raise SystemExit(f"error: --read-reference {self.path}: {err}") from None
        elif self.written:  # recorded from the first batch; later batches sample plainly
            yield
        else:
            recorded = self.config.anchor_positions(len(prompts))
            run_info = {**self.run_info, "prompts": [prompts[i] for i in recorded]}
            with record_reference(model, self.config, len(prompts), dtype=torch.float16,
                                  run_info=run_info, prompts=prompts) as cache:
                yield
            try:
                cache.save(self.path)
            except (ValueError, OSError) as err:  # nothing recorded; a file written meanwhile, a full disk
                raise SystemExit(f"error: --write-reference {self.path}: {err}")
            self.written = True
            log.info("reference written to %s: %.1f MB", self.path, cache.nbytes / 1e6)


def reference_from_arguments(opt, parser, size=None, **run_settings):
    """A ReferenceRun, or None. Bad input ends in parser.error (one line).

    `size`: (H, W) of the images (default --H/--W; img2img passes its init image's); `run_settings`
    (e.g. img2img's strength) are recorded too, and a read with other values is refused early."""
    write, read = opt.write_reference, opt.read_reference
    if not (write or read):
        return None
    if write and read:
        parser.error("--write-reference and --read-reference: choose one")
    if opt.consistent_attn:
        parser.error("--consistent-attn shares within a batch, --write-/--read-reference with a reference: "
                     "choose one")
    height, width = size or (opt.H, opt.W)
    run_info = {"H": height, "W": width, "steps": opt.ddim_steps, "sampler": opt.sampler,
                "guidance": opt.scale != 1.0, **run_settings}
    if write:
        check_new_file(parser, "--write-reference", write)  # before sampling: the run's images depend on it
        if opt.share_rate is not None or opt.share_mode not in (None, "anchor"):
            parser.error("--write-reference records the first --share-anchors K images, which readers read like "
                         "anchors: --share-mode and --share-rate do not apply; drop them")
        config = config_from_share_flags(opt, parser)
        first_batch = len(opt.prompts[:opt.n_samples])  # the batch the reference is recorded from
        if config.n_anchors > first_batch:
            parser.error(f"--share-anchors {config.n_anchors} reference images but the first batch has "
                         f"{first_batch} image(s) (--n_samples {opt.n_samples}, one per prompt)")
        check_anchor_images(parser, config, first_batch)
        return ReferenceRun(write, config=config, run_info={**run_info, "seed": opt.seed,
                                                            "ckpt": None if opt.random_weights else opt.ckpt})
    if given_share_flags(opt):
        parser.error(f"{', '.join(given_share_flags(opt))}: --read-reference uses the settings the reference "
                     f"was recorded with; drop them")
    if not os.path.isfile(read):
        parser.error(f"reference not found: {read}")
    try:
        cache = ReferenceCache.load(read)
    except ReferenceMismatch as err:
        parser.error(str(err))
    recorded = cache.header["run"]
    for key, value in run_info.items():  # known before the model loads: fail fast
        if key in recorded and recorded[key] != value:
            parser.error(f"{read}: the reference was recorded with {key} {recorded[key]}, this run uses {value}")
    if ("strength" in recorded) != ("strength" in run_info):  # else refused at the first UNet call, mid-run
        parser.error(f"{read}: the reference was recorded by {_trajectory(recorded)}, this run is "
                     f"{_trajectory(run_info)}: record it with the same script (and --strength)")
    return ReferenceRun(read, cache=cache)


def _trajectory(run_info) -> str:
    if "strength" in run_info:
        return f"img2img with --strength {run_info['strength']} (the last part of the trajectory)"
    return "txt2img (the whole trajectory)"


__all__ = ["add_arguments", "reference_from_arguments", "ReferenceRun", "ReferenceCache", "ReferenceMismatch",
           "ReferenceKV", "RunAnchors", "run_anchors", "model_fingerprint", "record_reference", "read_reference",
           "reference_nbytes"]
