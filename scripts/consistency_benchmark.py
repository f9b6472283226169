"""Which self-attention groups need sharing for consistent batches? (task.md, question 4)

For every sharing setting (SETTINGS, or any other MODE:GROUPS such as anchor:middle) the same
batches are generated from the same start noise (and, with --eta > 0, the same noise at every
step, image by image: StepNoisePerImage): for each prompt and seed, N images with DDIM and
classifier-free guidance. A prompt may give each image its own text ("a chair, on a white
background | a chair, on a black background": image i gets part i mod k), the storyboard case:
the object should agree, the named scenes differ. The procedural scenes' pixel read-back
(ldm.data.procedural) measures each batch without any classifier:

* agreement     fraction of images agreeing with the batch majority, mean over the attributes no prompt of
                the batch names (what it names is fidelity's) and that can be read at the model's size
                (procedural.legible_attributes: at 16 px not hair style, legs and shape); higher = more
                consistent; an attribute not read (no object found, or an image too noisy to read,
                procedural.UNREADABLE_NOISE) agrees with nothing
* subject agr.  the same, over the object's own attributes only (colour, legs, size; a face's parts)
* scene div.    1 - agreement over the scene attributes (background, position), among the images where
                they were read: subject-masked sharing should keep the object consistent and leave these as
                free as without sharing
* colour spread mean pairwise distance of the object colours in RGB [0, 1] (lower = more consistent),
                over the images clean enough to read (noise would pull them all towards one grey mix)
* chroma spread the same with each colour's grey level removed: a batch that only got darker
                narrows its colour spread, not this
* fidelity      fraction of the legible attributes NAMED in the prompt that are read back (does sharing hurt
                the prompt?)
* ref. agreement fraction of the object's legible attributes that are the batch's reference scene's: a scene of
                the prompt (what it names, the rest drawn per batch) that the image:* settings give as
                --reference-image; in the other rows, how often the images match it by chance
* diversity     mean pairwise pixel difference (0 = identical copies: degenerate "consistency")
* pixel noise   noise the sampler left in the images (0 on clean renders; procedural.pixel_noise)
* readable      share of the images clean enough to read (pixel noise up to procedural.UNREADABLE_NOISE):
                the spreads are over these, so a setting that leaves images speckled shows here
* embedding sim mean pairwise cosine similarity of image embeddings (--embedder PATH: a local
                DINO/CLIP model, ldm.image_embedder); works for any prompt, e.g. on real SD weights
* ref. sim      mean cosine similarity of each image's embedding to the reference image's (the
                reference scene's render, or --reference-image): how close the batch comes to it
* s/image       wall time of the sampling per image

The reference:* settings measure two separate runs (consistency_reference.py): image N-1 alone
is generated first and its self-attention recorded; then images 0..N-2 are generated in another
run that reads that reference. Every image keeps the start noise and prompt it has in the other
settings, so the rows compare directly; the reference image is exactly the plain model's.

The image:* settings sample the batch as txt2img --reference-image does: a render of the batch's
reference scene is the anchor, one more image in front of the batch, noised to every step
(consistency_image.py); their spreads are over the N sampled images. With --reference-image PATH
a file of your own is the anchor of every batch instead (any prompt: e.g. a photo of your chair
for real SD weights, judged by --embedder's ref. sim).

The n_iter2:* settings sample the batch as txt2img --n_iter 2 samples a run: two batches of N/2,
images 0..N/2-1 first. n_iter2:anchor is what txt2img does (the second batch reads the first
batch's anchor, consistency_reference.RunAnchors); n_iter2:own-anchors gives each batch its own
anchor. Their spreads are over all N images: does the run agree, not only each batch?

    # the model trained on the procedural scenes (models/embedded/README.md)
    python3 scripts/consistency_benchmark.py --ckpt models/embedded/procedural-t2i.safetensors
    # a smoke run with random weights (the numbers mean nothing)
    python3 scripts/consistency_benchmark.py --random-weights --n 2 --steps 2 --seeds 0 --settings none all:all
    # real SD 1.x weights and any prompt, judged by a local DINOv2 (transformers folder)
    python3 scripts/consistency_benchmark.py --config configs/stable-diffusion/v1-inference.yaml \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompts "a photo of a chair" --embedder dinov2-small/
    # ... and how close a photo of your own as the anchor brings the batch (ref. sim)
    python3 scripts/consistency_benchmark.py --config configs/stable-diffusion/v1-inference.yaml \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompts "a photo of a chair" --embedder dinov2-small/ \
        --reference-image my-chair.jpg --settings none anchor:middle+inner image:middle+inner
    # subject masks and AdaIN against plain sharing, and a reference read by a separate run
    python3 scripts/consistency_benchmark.py --ckpt models/embedded/procedural-t2i.safetensors \
        --settings none all:all subject:all adain:all subject+adain:all subject:anchor reference:all \
        reference+subject:all

Every setting starts from the same noise and prompts as `none`, so a second table gives each
setting minus `none` batch by batch (mean ± standard error): the differences between prompts and
seeds, which dominate the first table's ± std, cancel there.

Writes OUTDIR/run-NNN/{table.md, results.csv, figure.png}; a new numbered folder each run.
`--time-budget SECONDS` starts no batch after that time and writes what was measured: seed by
seed, every prompt and every setting on each batch, so the rows still compare (a GPU lease's
fixed time, scripts/gpu_session.sh). Ctrl-C stops a run the same way, any time: the batch it
interrupts is left out, the table holds the batches every setting has measured.
"""
import csv
import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.data import procedural  # noqa: E402
from ldm.image_embedder import (EmbedderError, embedding_similarity, load_embedder,  # noqa: E402
                                 reference_similarity)
from ldm.model_choice import (config_of_weights, in_repo, read_model_geometry, require_text_model,  # noqa: E402
                              resolve_weights)
from ldm.modules.consistency import GROUP_CHOICES, ConsistentAttentionConfig, consistent_attention  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules import consistency_image  # noqa: E402
from ldm.modules.consistency_reference import read_reference, record_reference, run_anchors  # noqa: E402
from ldm.script_helpers import (ArgumentParser, add_device_argument, add_threads_argument, build_model,  # noqa: E402
                                check_output_dir, check_scale, check_seed, check_steps, conditionings,
                                configure_logging, cpu_noise, interruptible, latents_to_images, resolve_device,
                                seed_step_noise, set_cpu_threads, warn_unseen_words)

logger = logging.getLogger("consistency_benchmark")

ALL_GROUPS = ("outer", "middle", "inner")
# Stands for the prompt's object word ("face", "chair", "table", or the shape): subject settings
# mask the sharing with that word's cross-attention maps, whatever the prompt.
OBJECT_WORD = "<object>"
PER_IMAGE = " | "  # separates per-image prompts in one --prompts entry; image i gets part i mod k


def shared(groups, mode="all", **kwargs):
    """A setting's config; each names its mode (the `all:`/`anchor:` of its name), not the default's."""
    return ConsistentAttentionConfig(groups=frozenset(groups), mode=mode, **kwargs)


@dataclasses.dataclass(frozen=True)
class InTwoBatches:
    """A setting measured as a run of two batches of N/2 images, in anchor mode: with the run's
    anchors read by the second batch (`run_wide`, txt2img's way), or an anchor per batch."""
    config: ConsistentAttentionConfig
    run_wide: bool


@dataclasses.dataclass(frozen=True)
class FromReference:
    """A setting measured across two runs: the last image of the batch is recorded as a reference
    with `config` (anchor mode, one image), the others are generated afterwards reading it."""
    config: ConsistentAttentionConfig


@dataclasses.dataclass(frozen=True)
class FromImage:
    """A setting whose anchor is a render of the batch's reference scene (txt2img --reference-image)."""
    config: ConsistentAttentionConfig


# name -> ConsistentAttentionConfig (None: plain self-attention). --settings picks from here.
SETTINGS = {
    "none": None,
    "all:outer": shared({"outer"}),
    "all:middle": shared({"middle"}),
    "all:inner": shared({"inner"}),
    "all:outer+middle": shared({"outer", "middle"}),
    "all:outer+inner": shared({"outer", "inner"}),
    "all:middle+inner": shared({"middle", "inner"}),
    "all:all": shared(ALL_GROUPS),
    "decoder:outer+middle": shared({"outer", "middle"}, blocks="decoder"),
    "anchor:all": shared(ALL_GROUPS, mode="anchor"),
    "anchor:middle+inner": shared({"middle", "inner"}, mode="anchor"),  # --consistent-attn's default
    "sample0.25:all": shared(ALL_GROUPS, mode="sample", sample_rate=0.25),
    "all:all@0-0.6": shared(ALL_GROUPS, window=(0.0, 0.6)),
    "subject:all": shared(ALL_GROUPS, subjects=(OBJECT_WORD,)),
    "subject:middle+inner": shared({"middle", "inner"}, subjects=(OBJECT_WORD,)),
    "subject:anchor": shared(ALL_GROUPS, mode="anchor", subjects=(OBJECT_WORD,)),
    "adain:all": shared(ALL_GROUPS, adain=True),
    "subject+adain:all": shared(ALL_GROUPS, subjects=(OBJECT_WORD,), adain=True),
    "reference:all": FromReference(shared(ALL_GROUPS, mode="anchor")),
    "reference+subject:all": FromReference(shared(ALL_GROUPS, mode="anchor", subjects=(OBJECT_WORD,))),
    "image:middle+inner": FromImage(shared({"middle", "inner"}, mode="anchor")),
    "image:all": FromImage(shared(ALL_GROUPS, mode="anchor")),
    "n_iter2:anchor": InTwoBatches(shared({"middle", "inner"}, mode="anchor"), run_wide=True),
    "n_iter2:own-anchors": InTwoBatches(shared({"middle", "inner"}, mode="anchor"), run_wide=False),
}

SETTING_GRAMMAR = ("MODE:GROUPS[@START-END]: MODE all, anchor, decoder (mode all in the decoder blocks) or "
                   "sampleRATE, GROUPS outer, middle, inner joined by '+', or all, @START-END a step window "
                   "(e.g. anchor:middle, sample0.5:outer+middle, all:middle@0-0.5)")


def resolve_setting(name):
    """The setting called `name`: one of SETTINGS, else `composed_setting(name)`."""
    return SETTINGS[name] if name in SETTINGS else composed_setting(name)


@functools.lru_cache
def composed_setting(name):
    """The setting a name of the form SETTING_GRAMMAR describes, read as SETTINGS names theirs.
    ValueError saying why for any other name."""
    match = re.fullmatch(r"(all|anchor|decoder|sample([\d.]+)):([a-z+]+)(?:@([\d.]+)-([\d.]+))?", name)
    if match is None:
        raise ValueError(f"neither one of {', '.join(SETTINGS)} nor MODE:GROUPS[@START-END] (see --help)")
    mode, rate, groups, start, end = match.groups()
    groups = ALL_GROUPS if groups == "all" else groups.split("+")
    if any(group not in GROUP_CHOICES for group in groups):
        raise ValueError(f"its groups are {', '.join(GROUP_CHOICES)} joined by '+', or all")
    options = {}
    if mode == "decoder":
        mode, options["blocks"] = "all", "decoder"
    if rate is not None:
        mode, options["sample_rate"] = "sample", float(rate)
    if start is not None:
        options["window"] = (float(start), float(end))
    return shared(groups, mode=mode, **options)


# Per kind one prompt naming no attribute and one naming some (what fidelity is measured on).
DEFAULT_PROMPTS = [
    procedural.describe("face"),
    procedural.describe("face", hair_style="short", hair_colour="blond", eye_colour="blue", shirt="red"),
    procedural.describe("chair"),
    procedural.describe("chair", colour="red", legs="four"),
    procedural.describe("table"),
    procedural.describe("table", colour="blue", size="large", background="white"),
    # per-image prompts: one chair in four scenes; sharing should unify the chair, not the scenes
    PER_IMAGE.join(procedural.describe("chair", background=background, position=position)
                   for background, position in (("white", "left"), ("yellow", "right"), ("green", "center"),
                                                ("black", "left"))),
]

METRICS = ("agreement", "subject_agreement", "scene_diversity", "colour_spread", "chroma_spread", "fidelity",
           "reference_agreement", "diversity", "pixel_noise", "readable", "embedding_similarity",
           "reference_similarity", "seconds_per_image")
FIGURE_SCALE = 4
LABEL_WIDTH = 150
DEFAULT_CONFIG = "configs/embedded/procedural-t2i.yaml"


# --- command line -------------------------------------------------------------------------

def build_parser():
    parser = ArgumentParser(description="Consistency of batches per self-attention sharing setting "
                                                 "(procedural prompts, pixel read-back metrics).")
    add_model_arguments(parser)
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS,
                        help="procedural prompts (default: a plain and a described face, chair and table, and one "
                             f"chair in four scenes); '{PER_IMAGE.strip()}' separates per-image prompts of one batch")
    parser.add_argument("--embedder", metavar="DIR",
                        help="local transformers image model (DINO/DINOv2/ViT/CLIP folder with config.json) whose "
                             "embeddings measure consistency for any prompt (nothing is downloaded)")
    parser.add_argument("--reference-image", type=in_repo, metavar="PATH",
                        help="the anchor of the image:* settings for every batch, and what ref. sim compares each "
                             "image to (with --embedder); any prompt (default: a render of each batch's reference "
                             "scene, procedural prompts only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one batch per prompt and seed, the seed drawing its start noise (default: 0 1 2)")
    parser.add_argument("--n", type=int, default=8, help="images per batch (that should agree)")
    add_sampling_arguments(parser)
    parser.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                        help="sharing settings to compare (default: all that apply to the prompts): "
                             + ", ".join(SETTINGS) + "; or any other " + SETTING_GRAMMAR)
    parser.add_argument("--outdir", default="outputs/consistency-benchmark",
                        help="results go to a new OUTDIR/run-NNN folder")
    parser.add_argument("--figure", type=int, nargs=2, metavar=("PROMPT", "SEED"),
                        help="index into --prompts and --seeds of the batch shown in figure.png (default: the "
                             "first per-image entry, whose scenes should differ while the object agrees, and "
                             "seed index 0; without one, prompt 0)")
    parser.add_argument("--paired-with", nargs="+", default=[], metavar="NAME",
                        help="also pair every setting with these (each a setting of the run, e.g. "
                             "all:middle+inner), as the second table pairs them with none")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no new batch after this many seconds of sampling and report the batches "
                             "measured (every setting on each); a run cut by `timeout` reports nothing")
    add_device_argument(parser)
    add_threads_argument(parser)
    return parser


def add_model_arguments(parser):
    """The model to measure; scripts/adapter_benchmark.py takes it the same way."""
    parser.add_argument("--config", type=in_repo,
                        help="model config (default: the one --ckpt's weights come with, a shipped model's or a "
                             f"main.py run's; else {DEFAULT_CONFIG})")
    parser.add_argument("--ckpt", type=in_repo,
                        help="weights (.safetensors or .ckpt; default: those the config's sampling block names)")
    parser.add_argument("--random-weights", action="store_true", help="no checkpoint (smoke runs only)")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow full unpickling of a TRUSTED .ckpt (can run arbitrary code)")


def add_sampling_arguments(parser):
    """How every batch is sampled; scripts/adapter_benchmark.py samples the same way."""
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM eta: 0 deterministic, 1 DDPM-like (fresh noise at every step, the same "
                             "for each image in every setting of a batch)")


def check_run(parser, opt, settings):
    """The checks every benchmark built on this loop shares (settings, sizes, model files, --figure,
    device); bad input ends with one ``error:`` line. Sets opt.shape, the latent shape."""
    unknown = [s for s in opt.settings if s not in settings]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(settings)}")
    for flag, value, low in (("--n", opt.n, 2), ("--steps", opt.steps, 1)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    if not 0 <= opt.eta <= 1:
        parser.error(f"--eta must be between 0 (deterministic) and 1 (DDPM-like), got {opt.eta:g}")
    check_scale(parser, opt.scale)
    if opt.config is None:
        opt.config = config_of_weights(opt.ckpt) or in_repo(DEFAULT_CONFIG)
    geometry = read_model_geometry(parser, "--config", opt.config, DEFAULT_CONFIG)
    require_text_model(parser, opt.config, geometry)
    warn_unseen_words(geometry, opt.config, opt.prompts)  # e.g. shapes, for a model trained without them
    check_steps(parser, "--steps", opt.steps, geometry.timesteps, f" (model.params.timesteps in {opt.config})")
    # at the model's default sampling size (512 px for SD v1, 32 px for the embedded model)
    opt.shape = [geometry.channels, geometry.height // geometry.factor, geometry.width // geometry.factor]
    opt.image_size = (geometry.height, geometry.width)
    resolve_weights(parser, opt, geometry)
    prompt_index, seed_index = opt.figure
    if not (0 <= prompt_index < len(opt.prompts) and 0 <= seed_index < len(opt.seeds)):
        parser.error(f"--figure {prompt_index} {seed_index} is outside the {len(opt.prompts)} prompts "
                     f"and {len(opt.seeds)} seeds")
    if opt.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    # a batch is a prompt and a seed, measured once per setting: the tables pair settings by them
    for flag, values in (("--settings", opt.settings), ("--prompts", opt.prompts), ("--seeds", opt.seeds)):
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            parser.error(f"{flag} gives {repeated!r} twice; the tables pair the settings batch by batch (a prompt "
                         "and a seed), so each is measured once (more seeds, more batches)")
    for seed in opt.seeds:
        check_seed(parser, "--seeds", seed)


def config_of(name):
    """The ConsistentAttentionConfig of a setting (None: plain), in-batch or recorded."""
    config = resolve_setting(name)
    return config.config if isinstance(config, (FromReference, InTwoBatches, FromImage)) else config


def needs_procedural_prompt(name, reference_file=False):
    """The subject settings take their word from a procedural caption, the image settings render its
    scene (unless a --reference-image file is their anchor)."""
    config = config_of(name)
    return (isinstance(resolve_setting(name), FromImage) and not reference_file) or \
        (config is not None and OBJECT_WORD in config.subjects)


def validate(parser, opt):
    not_procedural = [p for entry in opt.prompts for p in per_image_parts(entry) if procedural.parse_caption(p) is None]
    for entry in opt.prompts:
        kinds = {scene.kind for scene in map(procedural.parse_caption, per_image_parts(entry)) if scene is not None}
        if len(kinds) > 1:
            parser.error(f"the per-image prompts of {entry!r} show different kinds ({', '.join(sorted(kinds))}); "
                         f"one batch should show one object")
    if opt.figure is None:
        storyboard = [i for i, entry in enumerate(opt.prompts) if len(per_image_parts(entry)) > 1]
        opt.figure = [storyboard[0] if storyboard else 0, 0]
    reference_file = opt.reference_image is not None
    if opt.settings is None:
        opt.settings = [s for s in SETTINGS if not (not_procedural and needs_procedural_prompt(s, reference_file))]
    composed = [name for name in opt.settings if name not in SETTINGS]
    for name in composed:
        try:
            composed_setting(name)
        except ValueError as e:
            parser.error(f"unknown setting {name}: {e}")
    check_run(parser, opt, [*SETTINGS, *composed])
    height, width = opt.image_size
    opt.reference_pixels = consistency_image.read_image(parser, opt.reference_image, width, height) \
        if reference_file else None
    unmeasured = [name for name in opt.paired_with if name not in opt.settings]
    if unmeasured:
        parser.error(f"--paired-with {unmeasured[0]} is not one of this run's --settings")
    if opt.time_budget is not None and not opt.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {opt.time_budget:g}")
    if not_procedural and not opt.embedder:
        parser.error(f"pixel read-back needs procedural prompts (a face/chair/table as ldm.data.procedural "
                     f"captions them), not {not_procedural[0]!r}; for other prompts (e.g. a real SD checkpoint) "
                     f"pass --embedder DIR, a local DINO/CLIP model folder")
    procedural_only = [s for s in opt.settings if needs_procedural_prompt(s, reference_file)]
    if not_procedural and procedural_only:
        parser.error(f"setting {procedural_only[0]} takes its subject word or reference scene from a procedural "
                     f"prompt, and {not_procedural[0]!r} is not one: leave the subject and image settings out for "
                     f"such prompts (image settings: or give --reference-image PATH)")


def new_run_dir(outdir):
    """OUTDIR/run-NNN with the next free number; created here, so it never holds earlier results.
    Called once the results are in, so a failed or interrupted run leaves no empty folder."""
    taken = [int(d[4:]) for d in os.listdir(outdir) if d.startswith("run-") and d[4:].isdigit()]
    path = os.path.join(outdir, f"run-{max(taken, default=0) + 1:03}")
    os.makedirs(path)  # exist_ok=False: a concurrent run with the same number fails instead of mixing
    return path


# --- generation ---------------------------------------------------------------------------

def load(opt, device):
    torch.manual_seed(0)
    return build_model(opt.config, opt.ckpt, device, random_weights=opt.random_weights,
                       unsafe_pickle=opt.unsafe_pickle)


def start_noise(shape, prompt_index, seed, n, device):
    """The same x_T for every setting: seeded per (seed, prompt)."""
    generator = torch.Generator().manual_seed(batch_seed(prompt_index, seed))
    return cpu_noise(generator, [n] + shape, device)


def batch_seed(prompt_index, seed):
    """The seed of one batch (a prompt and a --seeds value), below 2**31 for seeds below 214,000."""
    return seed * 10_007 + prompt_index


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_image_parts(entry):
    return [part.strip() for part in entry.split(PER_IMAGE.strip())]


def batch_prompts(entry, n):
    """The n prompts of one batch: the entry's per-image parts, repeated in turn."""
    parts = per_image_parts(entry)
    return [parts[i % len(parts)] for i in range(n)]


def object_word(prompt):
    scene = procedural.parse_caption(prompt)
    return scene["shape"] if scene.kind == "shape" else scene.kind


def setting_for(name, prompt):
    """The setting's config, with OBJECT_WORD replaced by the prompt's object word."""
    config = config_of(name)
    if config is None or OBJECT_WORD not in config.subjects:
        return config
    return dataclasses.replace(config, subjects=(object_word(prompt),))


def sample(model, sampler, opt, prompts, c, uc, x_T, name, reference=None):
    """(N, 3, H, W) images in [0, 1] on the CPU, with the sharing of setting `name` on. `reference`:
    the batch's reference image as an ImageAnchor (image settings)."""
    config, kind = setting_for(name, prompts[0]), resolve_setting(name)
    if isinstance(kind, FromImage):
        return sample_from_image(model, sampler, opt, prompts, c, uc, x_T, config, reference)
    if isinstance(kind, FromReference):
        return sample_from_reference(model, sampler, opt, prompts, c, uc, x_T, config)
    if isinstance(kind, InTwoBatches):
        return sample_in_two_batches(model, sampler, opt, prompts, c, uc, x_T, config, kind.run_wide)
    with consistent_attention(model, config, opt.n, prompts=prompts):
        return ddim_images(model, sampler, opt, c, uc, x_T)


def sample_from_reference(model, sampler, opt, prompts, c, uc, x_T, config):
    """Image N-1 recorded alone as the reference, then images 0..N-2 in a second run reading it."""
    first, last = slice(0, -1), slice(-1, None)
    part = lambda cond, which: None if cond is None else cond[which]
    with record_reference(model, config, 1, prompts=prompts[last]) as cache:
        reference = ddim_images(model, sampler, opt, part(c, last), part(uc, last), x_T[last], images=last)
    with read_reference(model, cache, opt.n - 1):
        readers = ddim_images(model, sampler, opt, part(c, first), part(uc, first), x_T[first], images=first)
    return torch.cat([readers, reference])


def sample_from_image(model, sampler, opt, prompts, c, uc, x_T, config, anchor):
    """The reference image (an ImageAnchor) as the anchor, in front of the batch."""
    prompts, x_T = anchor.extend(prompts, x_T)
    with consistent_attention(model, config, len(prompts), prompts=prompts):
        images = ddim_images(model, sampler, opt, cond_in_front(c), cond_in_front(uc), x_T,
                             **anchor.known(model, len(prompts)))
    return images[1:]


def scene_anchor(scene, image_size):
    """`scene` rendered at the model's (height, width) as a --reference-image anchor."""
    height, width = image_size
    render = Image.fromarray(procedural.render(scene, height))  # square: resized for another width
    return consistency_image.ImageAnchor(("reference scene",), consistency_image.pixels(render, width, height))


def cond_in_front(cond):
    """A batch's conditioning with the anchor's in front: image 0's, as ImageAnchor.extend's prompt."""
    return None if cond is None else torch.cat([cond[:1], cond])


def reference_scene(prompt, prompt_index, seed):
    """A batch's reference scene: the prompt's object with the attributes it names, the others drawn
    from the batch's seed (its own stream), the same for every setting."""
    named = procedural.parse_caption(prompt)
    # drawn under the renderer's legibility rules with what the prompt names (a white chair is never
    # drawn on a white background): an invisible object would anchor the image:* rows
    return procedural.sample_scene(np.random.default_rng([7, batch_seed(prompt_index, seed)]), kind=named.kind,
                                   given=named.attributes)


def sample_in_two_batches(model, sampler, opt, prompts, c, uc, x_T, config, run_wide):
    """Images 0..N/2-1 as a first batch, the rest as a second, in anchor mode: the second reads the
    first batch's anchors (`run_wide`, RunAnchors) or has its own."""
    anchors = run_anchors(config, batches=2) if run_wide else None
    part = lambda cond, which: None if cond is None else cond[which]
    images = []
    for batch in (slice(0, opt.n // 2), slice(opt.n // 2, opt.n)):
        sharing = anchors.batch(model, prompts[batch]) if anchors is not None else \
            consistent_attention(model, config, len(prompts[batch]), prompts=prompts[batch])
        with sharing:
            images.append(ddim_images(model, sampler, opt, part(c, batch), part(uc, batch), x_T[batch], images=batch))
    return torch.cat(images)


def ddim_images(model, sampler, opt, c, uc, x_T, images=slice(None), **known):
    """`images`: which of the batch's images x_T holds (behind any anchors in front), for their
    step noise (StepNoisePerImage); `known`: the sampler's mask and x0 (a reference image's anchor)."""
    sampler.images = images
    latents, _ = sampler.sample(S=opt.steps, conditioning=c, batch_size=len(x_T), shape=opt.shape,
                                unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                eta=opt.eta, x_T=x_T, verbose=False, **known)
    return latents_to_images(model, latents)


class StepNoisePerImage(DDIMSampler):
    """DDIM whose step noise (eta > 0) is drawn once per batch, image by image: in every setting image
    i of a batch gets the same noise at every step, also where a setting samples the batch in runs
    of other sizes (reference:*: image N-1, then the others; n_iter2:*: two halves) or behind
    --reference-image anchors (image:*), where a draw over each run's own images would hand image i
    other noise. Drawn as one run of the batch's N images draws it from the batch's step seed
    (`seed_step_noise`), so the settings that sample the batch in one run sample as with DDIMSampler.
    Anchors in front draw none (ddim.py, `rows_to_noise`)."""

    def __init__(self, model):
        super().__init__(model)
        self.drawn = None          # [(N, C, h, w)] per step in sampling order; None: DDIMSampler's own
        self.images = slice(None)  # which of the batch's images the current run samples
        self.rng_state = None

    def draw(self, seed, steps, shape, device):
        """The step noise of a batch of `shape` (N, C, h, w) sampled in `steps` steps, then the global
        generators' state after it (`rewind`)."""
        seed_step_noise(seed)
        self.drawn = [torch.randn(shape, device=device) for _ in range(steps)]
        cuda = device.type == "cuda"
        self.rng_state = torch.get_rng_state(), (torch.cuda.get_rng_state(device), device) if cuda else None

    def rewind(self):
        """Before each setting: what it draws besides (an image anchor's forward noise) comes after the
        step noise, the same in every setting."""
        cpu, cuda = self.rng_state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(*cuda)

    def step_noise(self, shape, device, index):
        if self.drawn is None:
            return super().step_noise(shape, device, index)
        return self.drawn[len(self.drawn) - 1 - index][self.images]


def to_uint8_hwc(images):
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def measure(images, prompts, embedder=None, reference=None, reference_embedding=None):
    """The metrics of one batch; NaN where they do not apply (read-back needs procedural prompts).
    Fidelity is each image's against its own prompt, reference agreement against the object
    attributes of the batch's `reference` scene, ref. sim against `reference_embedding`."""
    pixels = to_uint8_hwc(images)
    row = dict.fromkeys(METRICS[:-1], float("nan"))
    row["diversity"] = procedural.diversity_score(pixels)
    row["pixel_noise"] = procedural.pixel_noise(pixels)
    scenes = [procedural.parse_caption(p) for p in prompts]
    if None not in scenes:  # one image of another prompt read as the first's kind would count as disagreeing
        # what any prompt of the batch names is fidelity's to measure: agreement is over what they leave free
        named = {k for parsed in scenes for k in parsed.attributes}
        score = procedural.consistency_score(pixels, scenes[0].kind, named)
        fidelities = [procedural.fidelity(image[None], scene) for image, scene in zip(pixels, scenes)]
        fidelities = [f for f in fidelities if not math.isnan(f)]
        row.update(agreement=score["agreement"], colour_spread=score["colour_spread"],
                   chroma_spread=score["chroma_spread"], readable=score["readable"],
                   fidelity=statistics.fmean(fidelities) if fidelities else float("nan"),
                   **procedural.subject_and_scene(score, scenes[0].kind))
    if reference is not None:
        row["reference_agreement"] = reference_agreement(pixels, reference)
    if embedder is not None:
        embeddings = embedder(images)
        row["embedding_similarity"] = embedding_similarity(embeddings)
        if reference_embedding is not None:
            row["reference_similarity"] = reference_similarity(embeddings, reference_embedding)
    return row


def reference_agreement(pixels, reference, attributes=None):
    """Share of the reference scene's object attributes (or of those named) read back from the images,
    over those legible at their size (procedural.fidelity)."""
    own = {k: v for k, v in reference.attributes.items() if k not in procedural.SCENE_ATTRIBUTES[reference.kind]
           and (attributes is None or k in attributes)}
    return procedural.fidelity(pixels, procedural.Scene(reference.kind, own))


def run(opt, model, device, embedder=None):
    """Yield (row dict, images) for every seed x prompt x setting. Seeds are the outer loop and
    settings the inner one, so a run stopped by --time-budget has measured every setting on the
    same batches, and every prompt once before any prompt twice."""
    sampler = StepNoisePerImage(model)
    deadline = None if opt.time_budget is None else time.monotonic() + opt.time_budget
    with torch.no_grad(), model.ema_scope():
        warm_up(model, sampler, opt, device)
        batches = [batch_prompts(prompt, opt.n) for prompt in opt.prompts]
        image_settings = any(isinstance(resolve_setting(s), FromImage) for s in opt.settings)
        # the reference: a file given for every batch (encoded once), else a scene of the prompt per batch
        file_anchor = None if opt.reference_pixels is None else \
            consistency_image.ImageAnchor((opt.reference_image,), opt.reference_pixels)
        conds = [conditionings(model, prompts, opt.scale) for prompts in batches]
        for i, (seed, (p, prompt)) in enumerate(itertools.product(opt.seeds, enumerate(opt.prompts))):
            if i and deadline is not None and time.monotonic() > deadline:  # the first batch always runs
                logger.warning("--time-budget %g s spent: stopped before seed %d, prompt %r; the table "
                               "holds the batches measured so far", opt.time_budget, seed, prompt)
                return
            prompts, (c, uc) = batches[p], conds[p]
            x_T = start_noise(opt.shape, p, seed, opt.n, device)
            scene = reference_scene(prompts[0], p, seed) \
                if file_anchor is None and procedural.parse_caption(prompts[0]) else None
            anchor = file_anchor
            if anchor is None and scene is not None and (embedder is not None or image_settings):
                anchor = scene_anchor(scene, opt.image_size)
            embedded = embedder((anchor.pixels + 1) / 2) if embedder is not None and anchor is not None else None
            sampler.draw(batch_seed(p, seed), opt.steps, [opt.n, *opt.shape], device)
            for setting in opt.settings:
                sampler.rewind()
                synchronize(device)
                start = time.perf_counter()
                images = sample(model, sampler, opt, prompts, c, uc, x_T, setting, anchor)
                seconds = time.perf_counter() - start
                row = {"setting": setting, "prompt": prompt, "seed": seed,
                       **measure(images, prompts, embedder, scene, embedded), "seconds_per_image": seconds / opt.n}
                similarity = f", embedding sim {row['embedding_similarity']:.3f}" if embedder else ""
                logger.info("%-22s %-40s seed %d: agreement %.3f%s", setting, prompt[:40], seed,
                            row["agreement"], similarity)
                yield row, images


def warm_up(model, sampler, opt, device):
    """One untimed short sampling, so the first timed setting does not pay for kernel selection."""
    c, uc = conditionings(model, batch_prompts(opt.prompts[0], opt.n), opt.scale)
    sampler.sample(S=1, conditioning=c, batch_size=opt.n, shape=opt.shape,
                   unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc, eta=opt.eta,
                   x_T=start_noise(opt.shape, 0, 0, opt.n, device), verbose=False)


# --- reporting ----------------------------------------------------------------------------

def mean_std(values):
    """'mean ± sample standard deviation' of the values that are not NaN (n/a for the spread of one)."""
    return mean_and_spread(values, statistics.stdev)


def mean_and_spread(values, spread, sign=""):
    """'mean ± spread(values)' of the values that are not NaN; n/a for none, and for the spread of one."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    shown = f"{spread(values):.3f}" if len(values) > 1 else "n/a"
    return f"{statistics.fmean(values):{sign}.3f} ± {shown}"


def markdown_table(rows, settings):
    lines = ["| setting | agreement ↑ | subject agreement ↑ | scene diversity | colour spread ↓ | chroma spread ↓ "
             "| fidelity ↑ | ref. agreement ↑ | diversity | pixel noise ↓ | readable ↑ | embedding sim ↑ | ref. sim ↑ "
             "| s/image |", "|---" * (len(METRICS) + 1) + "|"]
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        cells = [mean_std([r[m] for r in mine]) for m in METRICS]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_METRICS = ("colour_spread", "chroma_spread", "agreement", "fidelity")
METRIC_LABELS = {"colour_spread": "colour spread", "chroma_spread": "chroma spread", "agreement": "agreement",
                 "fidelity": "fidelity", "iou": "IoU", "reference_colour": "ref. colour"}


def mean_se(values):
    """'mean ± standard error', signed, of the values that are not NaN (n/a for the error of one)."""
    return mean_and_spread(values, lambda v: statistics.stdev(v) / math.sqrt(len(v)), sign="+")


def paired_table(rows, settings, baseline="none", first=()):
    """Each setting minus `baseline` in the same batch (same prompt, seed and start noise), mean ±
    standard error over the batches: the between-batch spread of the first table cancels. Empty
    when the baseline was not run. `first`: metrics shown before colour spread (e.g. "iou")."""
    base = {(r["prompt"], r["seed"]): r for r in rows if r["setting"] == baseline}
    others = [s for s in settings if s != baseline]
    if not base or not others:
        return ""
    columns = [*first, "colour_spread", "narrower", "chroma_spread", "agreement", "fidelity"]
    header = [f"{METRIC_LABELS[m]} − {baseline}" if m != "narrower" else "batches narrower" for m in columns]
    lines = ["| setting | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    for setting in others:
        pairs = [(r, base[r["prompt"], r["seed"]]) for r in rows if r["setting"] == setting]
        diffs = {m: [r[m] - b[m] for r, b in pairs] for m in (*first, *PAIRED_METRICS)}
        # NaN: no read-back (not procedural), or under two images of one side clean enough to read
        spreads = [d for d in diffs["colour_spread"] if not math.isnan(d)]
        narrower = f"{sum(d < 0 for d in spreads)}/{len(spreads)}" if spreads else "n/a"
        cells = [narrower if m == "narrower" else mean_se(diffs[m]) for m in columns]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_header(opt, device, n_batches, interrupted=False):
    weights = "random weights" if opt.random_weights else opt.ckpt
    planned = len(opt.prompts) * len(opt.seeds)
    if n_batches == planned:
        measured = f" = {n_batches} batches"
    else:
        stopped_by = "Ctrl-C" if interrupted else f"--time-budget {opt.time_budget:g} s"
        measured = f": {n_batches} of {planned} batches (stopped by {stopped_by})"
    return (f"config {opt.config}, {weights}; N={opt.n}, DDIM {opt.steps} steps, eta {opt.eta:g}, "
            f"guidance {opt.scale}; {len(opt.prompts)} prompts x seeds {' '.join(map(str, opt.seeds))}{measured} "
            f"per setting (mean ± std over them; fidelity over prompts that name attributes); device {device}")


def write_csv(rows, path):
    with open(path, "x", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_figure(batches, path):
    """Rows = settings (labelled), columns = the N images of one prompt/seed, nearest-neighbour x4."""
    from PIL import ImageDraw
    first = next(iter(batches.values()))
    n, _, h, w = first.shape
    tile_h, tile_w = h * FIGURE_SCALE, w * FIGURE_SCALE
    figure = Image.new("RGB", (LABEL_WIDTH + n * (tile_w + 2), len(batches) * (tile_h + 2)), "white")
    draw = ImageDraw.Draw(figure)
    for row, (setting, images) in enumerate(batches.items()):
        top = row * (tile_h + 2)
        draw.text((4, top + tile_h // 2 - 6), setting, fill="black")
        for col, pixels in enumerate(to_uint8_hwc(images)):
            tile = Image.fromarray(pixels).resize((tile_w, tile_h), Image.NEAREST)
            figure.paste(tile, (LABEL_WIDTH + col * (tile_w + 2), top))
    with open(path, "xb") as f:
        figure.save(f, format="PNG")


def main(argv=None):
    configure_logging()
    parser = build_parser()
    opt = parser.parse_args(argv)
    validate(parser, opt)
    device = resolve_device(opt.device)
    set_cpu_threads(opt.threads, device)
    try:
        embedder = load_embedder(opt.embedder, device) if opt.embedder else None
    except EmbedderError as e:
        parser.error(str(e))
    check_output_dir(parser, "--outdir", opt.outdir)  # after every input check: bad input creates nothing
    model = load(opt, device)
    figure_batch = opt.prompts[opt.figure[0]], opt.seeds[opt.figure[1]]
    # Only the figure's batch is kept, and the first one in case --time-budget stops the run before
    # it: keeping every batch's images would hold gigabytes for SD at 512².
    rows, kept, interrupted = [], {}, False
    try:
        for row, images in run(opt, model, device, embedder):
            rows.append(row)
            batch = row["prompt"], row["seed"]
            if batch in (figure_batch, (rows[0]["prompt"], rows[0]["seed"])):
                kept.setdefault(batch, {})[row["setting"]] = images
    except KeyboardInterrupt:  # stop as --time-budget does, leaving out the batch it cut short
        rows = rows[:len(rows) - len(rows) % len(opt.settings)]  # settings are the inner loop
        kept = {batch: images for batch, images in kept.items() if len(images) == len(opt.settings)}
        if not rows:
            raise
        interrupted = True
        logger.warning("interrupted: the table holds the %d batches every setting has measured",
                       len(rows) // len(opt.settings))
    if figure_batch not in kept:
        logger.warning("the figure's batch (%r, seed %d) was not reached; figure.png shows the first batch",
                       *figure_batch)
        figure_batch = next(iter(kept))
    figure_prompt, figure_seed = figure_batch
    table = markdown_table(rows, opt.settings)
    for baseline in ["none", *opt.paired_with]:
        paired = paired_table(rows, opt.settings, baseline=baseline)
        table += f"\n\nPaired with `{baseline}` (mean ± standard error over the batches):\n\n{paired}" if paired else ""
    header = run_header(opt, device, len({(r["prompt"], r["seed"]) for r in rows}), interrupted)
    run_dir = new_run_dir(opt.outdir)
    with open(os.path.join(run_dir, "table.md"), "x") as f:
        f.write(f"{header}\n\nfigure.png: {figure_prompt!r}, seed {figure_seed}\n\n{table}\n")
    write_csv(rows, os.path.join(run_dir, "results.csv"))
    write_figure(kept[figure_batch], os.path.join(run_dir, "figure.png"))
    sys.stdout.write(f"{header}\n\n{table}\n")
    logger.info("wrote table.md, results.csv and figure.png to %s", run_dir)
    if interrupted:
        raise KeyboardInterrupt  # written: now end as interrupted (exit status 130)
    return run_dir


if __name__ == "__main__":
    interruptible(main)
