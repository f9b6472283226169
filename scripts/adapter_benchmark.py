"""Does the adapter make the embedded model follow a layout? (issue #7)

For every prompt and seed, N procedural scenes of the prompt's kind with different layouts
(position, size, legs / shape) give N condition maps (outline or mask, as the adapter was
trained: its file header says which). The same start noise is sampled under seven settings:

    plain               the model alone (the IoU it reaches by chance is the baseline)
    adapter             with the adapter's features of the N conditions
    plain+all           consistent self-attention in mode all (--share-mode all): every image
                        reads every image of the batch
    adapter+all         both: layout from the conditions, shared appearance from the batch
    plain+anchor        --consistent-attn (its default mode anchor): every image reads the first one
    adapter+anchor      the same with the adapter
    adapter+image       the adapter, and a render of the batch's reference scene as the anchor
                        (txt2img --reference-image with --adapter): layout from the conditions,
                        look from the reference

Every setting starts from the same noise and conditions, so a second table gives, batch by
batch, what consistent attention changes: each `X+all` and `X+anchor` minus `X` (mean ±
standard error), IoU included: how much of the layout the sharing costs.

Metrics, read from the pixels without a classifier (ldm.data.procedural):

* IoU          object mask read back from the generated image (read_mask: background and
               object colour, then each pixel) against the condition scene's exact mask
               (object_mask), mean over the images. 1 = the object is exactly where the
               condition put it.
* agreement    consistency of the UNNAMED appearance attributes (object colour, background)
               across the batch: fraction agreeing with the batch majority, mean over those of
               the two the prompt does not name (NaN where it names both). The layout attributes
               differ on purpose (the conditions differ) and are left out.
* colour spread mean pairwise distance of the object colours, RGB in [0, 1] (lower = more alike),
               over the images clean enough to read (procedural.consistency_score)
* fidelity     fraction of the attributes the prompt names that are read back (those legible at
               the model's size: procedural.fidelity)
* ref. colour  fraction of the objects in the colour of the batch's reference scene (the one
               adapter+image reads; for the other settings, how often they match it by chance)
* s/image      sampling wall time per image

    python3 scripts/adapter_benchmark.py --ckpt models/embedded/procedural-t2i.safetensors \
        --adapter models/embedded/procedural-outline-adapter.safetensors
    # smoke run (numbers meaningless)
    python3 scripts/adapter_benchmark.py --random-weights --adapter A.safetensors --n 2 --steps 2 --seeds 0 \
        --prompts "a chair" --scale 1

Writes OUTDIR/run-NNN/{table.md, results.csv, figure.png} (figure: the conditions, then one
row per setting, for --figure PROMPT SEED) and prints the table.
"""
import dataclasses
import logging
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import consistency_benchmark as cb  # noqa: E402  (run-folder, table and figure helpers)
from ldm.checkpoints import CheckpointError  # noqa: E402
from ldm.data import procedural  # noqa: E402
from ldm.model_choice import check_checkpoint_type, in_repo  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules.adapters import (adapter_conditioning, behind_plain_images, check_adapter_fits,  # noqa: E402
                                  first_stage_factor, injection_sites, load_adapter, unet_of)
from ldm.modules.consistency import ConsistentAttentionConfig, consistent_attention  # noqa: E402
from ldm.script_helpers import (ArgumentParser, add_device_argument, add_threads_argument,  # noqa: E402
                                check_cond_tau, check_output_dir, conditionings, configure_logging, latents_to_images,
                                resolve_device, set_cpu_threads)

logger = logging.getLogger("adapter_benchmark")

# name -> (use the adapter, consistent attention config or None); "anchor" is what
# --consistent-attn does without further flags. In mode all every image reads all N images, so
# it also reads N-1 other layouts, and the object drifts from its own outline towards theirs;
# in anchor mode an image reads one other image, the anchor, which itself stays exact: one
# appearance to follow and one foreign layout instead of N-1.
ANCHOR = ConsistentAttentionConfig()
ALL = dataclasses.replace(ANCHOR, mode="all")
SETTINGS = {
    "plain": (False, None),
    "adapter": (True, None),
    "plain+all": (False, ALL),
    "adapter+all": (True, ALL),
    "plain+anchor": (False, ANCHOR),
    "adapter+anchor": (True, ANCHOR),
    "adapter+image": (True, cb.FromImage(ANCHOR)),
}
READABLE_KINDS = ("chair", "table", "shape")  # read_mask does not read faces (fixed layout)
APPEARANCE = ("colour", "background")  # attributes a layout condition does not fix
DEFAULT_PROMPTS = [procedural.describe("chair"), procedural.describe("table"),
                   procedural.describe("chair", colour="red"), procedural.describe("table", background="white")]
REFERENCE_ATTRIBUTES = ("colour",)  # what a reference gives; its layout attributes are the conditions'
METRICS = ("iou", "agreement", "colour_spread", "fidelity", "reference_colour", "seconds_per_image")
HEADER = "| setting | IoU ↑ | agreement (unnamed colours) ↑ | colour spread ↓ | fidelity ↑ | ref. colour | s/image |"


def build_parser():
    parser = ArgumentParser(description="Layout following (IoU) and batch consistency with and without "
                                                 "a T2I-Adapter, on procedural prompts.")
    cb.add_model_arguments(parser)
    parser.add_argument("--adapter", required=True, type=in_repo, help="adapter file (scripts/train_adapter.py)")
    parser.add_argument("--condition", choices=procedural.CONDITION_KINDS,
                        help="layout map fed to the adapter (default: the one recorded in the adapter file, "
                             "else outline)")
    parser.add_argument("--adapter-weight", type=float, default=1.0, help="scale of the adapter's features")
    parser.add_argument("--cond-tau", type=float, default=1.0, help="adapter on for this first fraction of the steps")
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS,
                        help="procedural chair/table/shape prompts (default: plain and described chairs and tables)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one batch per prompt and seed, the seed drawing its start noise (default: 0 1 2)")
    parser.add_argument("--n", type=int, default=8, help="images (differently laid out conditions) per batch")
    cb.add_sampling_arguments(parser)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                        help="settings to compare: " + ", ".join(SETTINGS))
    parser.add_argument("--outdir", default="outputs/adapter-benchmark", help="results go to OUTDIR/run-NNN")
    parser.add_argument("--figure", type=int, nargs=2, default=[0, 0], metavar=("PROMPT", "SEED"),
                        help="index into --prompts and --seeds of the batch shown in figure.png")
    add_device_argument(parser)
    add_threads_argument(parser)
    return parser


def validate(parser, opt):
    cb.check_run(parser, opt, SETTINGS)
    for prompt in opt.prompts:
        scene = procedural.parse_caption(prompt)
        if scene is None or scene.kind not in READABLE_KINDS:
            parser.error(f"prompt {prompt!r} is not a procedural chair, table or shape caption (e.g. "
                         f"{DEFAULT_PROMPTS[0]!r}): the IoU reads the object mask back from the pixels, which "
                         f"works for those kinds only")
    if not 0 < opt.cond_tau <= 1:
        parser.error(f"--cond-tau must be in (0, 1], got {opt.cond_tau}")
    if not math.isfinite(opt.adapter_weight):
        parser.error(f"--adapter-weight must be a finite number, got {opt.adapter_weight}")
    if not os.path.exists(opt.adapter):  # a file, or a diffusers adapter folder (as txt2img's --adapter)
        parser.error(f"adapter not found: {opt.adapter}")
    check_checkpoint_type(parser, "--adapter", opt.adapter)  # before the model is built, not after
    check_output_dir(parser, "--outdir", opt.outdir)  # last: created only when the input is good


def check_cond_tau_window(parser, opt, model):
    """After loading, as the model's timesteps decide it: a --cond-tau that none of the --steps
    model calls falls under would benchmark the adapter applied nowhere."""
    sampler = DDIMSampler(model)
    positions = [1.0 - t / sampler.ddpm_num_timesteps for t in sampler.model_timesteps(opt.steps)]
    check_cond_tau(parser, opt.cond_tau, positions, f"the {len(positions)} model calls of --steps {opt.steps}",
                   steps_flag="--steps")


# --- model, adapter, conditions -------------------------------------------------------------

def load_adapter_for(model, opt, device):
    """The adapter, checked against the model (f and widths), on `device`; one-line errors."""
    unet = unet_of(model)
    try:
        adapter = load_adapter(opt.adapter, levels=len(injection_sites(unet)), unshuffle=first_stage_factor(model),
                               unsafe_pickle=opt.unsafe_pickle)
        check_adapter_fits(adapter, unet, f"adapter {opt.adapter}")
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if adapter.cond_channels != 1:
        raise SystemExit(f"error: adapter {opt.adapter} takes {adapter.cond_channels} channels; the layout maps "
                         f"have 1 (train one with scripts/train_adapter.py)")
    return adapter.to(device)


def recorded_condition(path):
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("condition")
    except Exception:  # a .pth or a file without header: the default applies
        return None


def layouts(kind, prompt_index, seed, n):
    """n scenes of `kind` with random layouts, seeded per prompt and seed: the same conditions
    for every setting."""
    rng = np.random.default_rng([seed, prompt_index, 7])
    return [procedural.sample_scene(rng, kind) for _ in range(n)]


def condition_tensor(scenes, condition, size):
    """(n, 1, H, W) layout maps in {0, 1}."""
    return torch.from_numpy(np.stack([procedural.condition_map(s, condition, size) for s in scenes]))[:, None]


# --- sampling and measuring -----------------------------------------------------------------

def sample(model, sampler, opt, c, uc, x_T, features, share, reference):
    """(N, 3, H, W) images in [0, 1] on the CPU under one setting. A FromImage setting samples the
    `reference` scene's render as the anchor in front of the batch, without adapter features."""
    known = {}
    if isinstance(share, cb.FromImage):
        anchor = cb.scene_anchor(reference, opt.image_size)
        _, x_T = anchor.extend([None], x_T)
        c, uc = cb.cond_in_front(c), cb.cond_in_front(uc)
        features = None if features is None else behind_plain_images(features, opt.n, 1)
        known, share = anchor.known(model, len(x_T)), share.config
    with consistent_attention(model, share, len(x_T)), adapter_conditioning(model, features, opt.cond_tau):
        latents, _ = sampler.sample(S=opt.steps, conditioning=c, batch_size=len(x_T), shape=opt.shape,
                                    unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                    eta=opt.eta, x_T=x_T, verbose=False, **known)
    return latents_to_images(model, latents[-opt.n:])


def measure(images, prompt, scenes, reference):
    pixels = cb.to_uint8_hwc(images)
    named = procedural.parse_caption(prompt)
    kind = named.kind
    size = pixels.shape[1]
    ious = [procedural.mask_iou(procedural.read_mask(p, kind), procedural.object_mask(s, size))
            for p, s in zip(pixels, scenes)]
    score = procedural.consistency_score(pixels, kind, named.attributes)
    unnamed = [v for a, v in score["per_attribute"].items() if a in APPEARANCE]
    agreement = float(np.mean(unnamed)) if unnamed else float("nan")
    return {"iou": float(np.mean(ious)), "agreement": agreement, "colour_spread": score["colour_spread"],
            "chroma_spread": score["chroma_spread"], "fidelity": procedural.fidelity(pixels, named),
            "reference_colour": cb.reference_agreement(pixels, reference, REFERENCE_ATTRIBUTES)}


def run(opt, model, adapter, device):
    """Yield (row, images, conditions) for every prompt x seed x setting."""
    sampler = cb.StepNoisePerImage(model)  # adapter+image samples the batch behind its anchor
    size = opt.shape[-1] * first_stage_factor(model)
    with torch.no_grad(), model.ema_scope():
        for p, prompt in enumerate(opt.prompts):
            c, uc = conditionings(model, opt.n * [prompt], opt.scale)
            kind = procedural.parse_caption(prompt).kind
            for seed in opt.seeds:
                scenes = layouts(kind, p, seed, opt.n)
                conds = condition_tensor(scenes, opt.condition, size)
                features = [opt.adapter_weight * f for f in adapter(conds.to(device))]
                x_T = cb.start_noise(opt.shape, p, seed, opt.n, device)
                reference = cb.reference_scene(prompt, p, seed)
                sampler.draw(cb.batch_seed(p, seed), opt.steps, [opt.n, *opt.shape], device)
                for setting in opt.settings:
                    use_adapter, share = SETTINGS[setting]
                    sampler.rewind()
                    cb.synchronize(device)
                    start = time.perf_counter()
                    images = sample(model, sampler, opt, c, uc, x_T, features if use_adapter else None, share,
                                    reference)
                    seconds = time.perf_counter() - start
                    row = {"setting": setting, "prompt": prompt, "seed": seed,
                           **measure(images, prompt, scenes, reference), "seconds_per_image": seconds / opt.n}
                    logger.info("%-18s %-32s seed %d: IoU %.3f agreement %.3f", setting, prompt[:32], seed,
                                row["iou"], row["agreement"])
                    yield row, images, conds


# --- reporting ------------------------------------------------------------------------------

def markdown_table(rows, settings):
    lines = [HEADER, "|---|---|---|---|---|---|---|"]
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        lines.append(f"| {setting} | " + " | ".join(cb.mean_std([r[m] for r in mine]) for m in METRICS) + " |")
    return "\n".join(lines)


def consistency_effect(rows, settings):
    """Each sharing setting `X+...` minus `X` in the same batch (cb.paired_table), one table per `X`."""
    baselines = [s for s in settings if "+" not in s]
    tables = [cb.paired_table(rows, [s for s in settings if s.startswith(base + "+")], baseline=base,
                              first=("iou", "reference_colour")) for base in baselines]
    return "\n\n".join(t for t in tables if t)


def run_header(opt, device, n_batches):
    weights = "random weights" if opt.random_weights else opt.ckpt
    return (f"config {opt.config}, {weights}; adapter {opt.adapter} ({opt.condition} maps, weight "
            f"{opt.adapter_weight}, cond_tau {opt.cond_tau}); N={opt.n} differently laid out conditions per batch, "
            f"DDIM {opt.steps} steps, eta {opt.eta:g}, guidance {opt.scale}; {len(opt.prompts)} prompts x seeds "
            f"{' '.join(map(str, opt.seeds))} = {n_batches} batches per setting (mean ± std over them); "
            f"anchor = --consistent-attn's defaults: groups {'+'.join(sorted(ANCHOR.groups))}, mode "
            f"{ANCHOR.mode.value} ({ANCHOR.n_anchors} anchor); all = the same groups, mode all; "
            f"device {device}")


def main(argv=None):
    configure_logging()
    parser = build_parser()
    opt = parser.parse_args(argv)
    validate(parser, opt)
    opt.condition = opt.condition or recorded_condition(opt.adapter) or "outline"
    device = resolve_device(opt.device)
    set_cpu_threads(opt.threads, device)
    model = cb.load(opt, device)
    check_cond_tau_window(parser, opt, model)
    adapter = load_adapter_for(model, opt, device)
    figure_prompt, figure_seed = opt.prompts[opt.figure[0]], opt.seeds[opt.figure[1]]
    rows, figure_batches = [], {}
    for row, images, conds in run(opt, model, adapter, device):
        rows.append(row)
        if row["prompt"] == figure_prompt and row["seed"] == figure_seed:
            figure_batches.setdefault(f"{opt.condition} (condition)", conds.expand(-1, 3, -1, -1))
            figure_batches[row["setting"]] = images
    table = markdown_table(rows, opt.settings)
    effect = consistency_effect(rows, opt.settings)
    table += f"\n\nWhat consistent attention changes in the same batch (mean ± standard error):\n\n{effect}" \
        if effect else ""
    header = run_header(opt, device, len(opt.prompts) * len(opt.seeds))
    run_dir = cb.new_run_dir(opt.outdir)
    with open(os.path.join(run_dir, "table.md"), "x") as f:
        f.write(f"{header}\n\nfigure.png: {figure_prompt!r}, seed {figure_seed}\n\n{table}\n")
    cb.write_csv(rows, os.path.join(run_dir, "results.csv"))
    cb.write_figure(figure_batches, os.path.join(run_dir, "figure.png"))
    sys.stdout.write(f"{header}\n\n{table}\n")
    logger.info("wrote table.md, results.csv and figure.png to %s", run_dir)
    return run_dir


if __name__ == "__main__":
    main()
