"""Export a Lightning training checkpoint (last.ckpt) as a .safetensors file for txt2img.

    python3 scripts/export_checkpoint.py logs/RUN/checkpoints/last.ckpt procedural-t2i.safetensors

* The checkpoint is read with torch.load(weights_only=True) (ldm.checkpoints.read_checkpoint); only
  its state dict's tensors are kept (no optimizer state, no pickled objects).
* If it holds EMA weights (model_ema.*, from ``use_ema: true``), they replace the UNet weights
  model.diffusion_model.* and, where the training averaged a text encoder trained with it, its
  weights cond_stage_model.*; the model_ema.* copies are dropped, so the file holds the EMA
  weights once. ldm.checkpoints.apply_state_dict then samples with exactly these weights.
* Network weights (UNet, text encoder) are stored as float16 by default (--dtype), halving the
  file; everything else (the noise schedule buffers) keeps its dtype. Loading casts back to
  the model's float32.
* A JSON sidecar (same name, .json) records the source, global step, dtype, parameter counts
  and, when a Lightning metrics.csv is found (next to the run, or --metrics), the final losses.

* A diffusers pipeline folder (SD 1.x's unet/, vae/, text_encoder/) is read in this
  repository's layout (ldm/diffusers_folder.py), so it becomes one file like upstream's.

Existing output files are never overwritten.
"""
import csv
import glob
import json
import logging
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.checkpoints import CheckpointError, read_checkpoint, save_safetensors, state_dict_of  # noqa: E402
from ldm.model_choice import check_checkpoint_type  # noqa: E402
from ldm.script_helpers import ArgumentParser, check_new_file  # noqa: E402
from ldm.util import first_line  # noqa: E402

logger = logging.getLogger("export_checkpoint")

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = {EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}  # LitEma's, next to its weights
NETWORK_PREFIXES = (UNET_PREFIX, TEXT_PREFIX)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LOSS_COLUMNS = ("train/loss_simple_step", "train/loss_simple_epoch", "val/loss_simple", "val/loss_simple_ema")
LAST_N_LOSSES = 50  # the sidecar's "final loss" is the mean of the last this-many logged steps


def ema_key(model_key):
    """'model.diffusion_model.out.2.weight' -> 'model_ema.diffusion_modelout2weight',
    'cond_stage_model.a.b' -> 'model_ema.cond_stage_modelab' (LitEma's buffer names are the names of
    the parameters in LatentDiffusion.ema_tracked(), without dots)."""
    relative = model_key[len("model."):] if model_key.startswith("model.") else model_key
    return EMA_PREFIX + relative.replace(".", "")


def swap_in_ema(sd):
    """Weights replaced by their EMA copies, model_ema.* removed: every UNet weight, and the text
    encoder's where the training averaged it too (it does since 2026-12-07 when the encoder trains).
    Returns (new sd, number of UNet tensors swapped, number of text-encoder tensors swapped)."""
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in sd]
    if missing:
        raise CheckpointError(f"the checkpoint has EMA weights but none for {len(missing)} UNet weights "
                              f"(e.g. {missing[0]}); export with --no-ema")
    text_keys = [k for k in sd if k.startswith(TEXT_PREFIX) and ema_key(k) in sd]
    unaveraged = [k for k in sd if k.startswith(TEXT_PREFIX) and sd[k].is_floating_point() and ema_key(k) not in sd]
    if text_keys and unaveraged:  # LitEma averages every weight of a part, or the part is not averaged
        raise CheckpointError(f"the checkpoint has EMA weights for {len(text_keys)} text-encoder weights but none "
                              f"for {len(unaveraged)} others (e.g. {unaveraged[0]}); export with --no-ema")
    out = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    for k in unet_keys + text_keys:
        out[k] = sd[ema_key(k)]
    return out, len(unet_keys), len(text_keys)


def cast_network_weights(sd, dtype):
    """Floating-point UNet and text-encoder tensors to ``dtype``; other tensors unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() and k.startswith(NETWORK_PREFIXES) else v
            for k, v in sd.items()}


def count_parameters(sd):
    return {"unet": sum(v.numel() for k, v in sd.items() if k.startswith(UNET_PREFIX)),
            "text_encoder": sum(v.numel() for k, v in sd.items() if k.startswith(TEXT_PREFIX))}


def find_metrics(ckpt_path):
    """metrics.csv of the run a logs/RUN/checkpoints/last.ckpt belongs to (newest version), or None."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    found = sorted(glob.glob(os.path.join(run_dir, "csv", "version_*", "metrics.csv")), key=os.path.getmtime)
    return found[-1] if found else None


def _column(rows, name):
    values = []
    for row in rows:
        text = row.get(name)
        if text not in (None, ""):
            values.append((int(row["step"]), float(text)))
    return values


def loss_summary(metrics_path):
    """Final training/validation losses from a Lightning CSVLogger metrics.csv. A file that is not
    one (unreadable, none of LOSS_COLUMNS, no step column) raises ValueError with a one-line message;
    loss columns without values yet (a run stopped early) are not an error."""
    try:
        with open(metrics_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)  # the header is read lazily: while the file is open
    except (ValueError, csv.Error) as e:  # undecodable bytes, a broken CSV
        raise ValueError(f"{metrics_path} is not a readable metrics.csv ({e})") from e
    if not fields:
        raise ValueError(f"{metrics_path} is empty (a run that stopped before its logger wrote)")
    if not set(LOSS_COLUMNS) & set(fields):
        raise ValueError(f"{metrics_path} has none of the loss columns {', '.join(LOSS_COLUMNS)}, which "
                         f"main.py's CSV logger writes")
    summary = {"metrics_csv": os.path.abspath(metrics_path)}
    try:
        train = _column(rows, "train/loss_simple_step")
        if train:
            last = [v for _, v in train[-LAST_N_LOSSES:]]
            summary.update(train_loss_last_step=train[-1][0], train_loss_last=train[-1][1],
                           train_loss_mean_last_logged=sum(last) / len(last), train_loss_logged_points=len(last),
                           train_loss_first=train[0][1])
        for name in LOSS_COLUMNS[1:]:
            values = _column(rows, name)
            if values:
                summary[name] = {"step": values[-1][0], "value": values[-1][1]}
    except KeyError as e:
        raise ValueError(f"{metrics_path} has losses but no {e} column for them") from e
    except ValueError as e:  # a step or loss that is not a number
        raise ValueError(f"{metrics_path} is not a readable metrics.csv ({e})") from e
    return summary


def export(ckpt_path, out_path, *, dtype="fp16", use_ema=True, metrics_path=None, unsafe_pickle=False):
    """Write ``out_path`` (.safetensors) and its .json sidecar; returns the sidecar dict."""
    checkpoint = read_checkpoint(ckpt_path, unsafe_pickle=unsafe_pickle)
    sd = state_dict_of(checkpoint, os.fspath(ckpt_path))
    # the EMA's counters alone (SD's pruned files keep them) are no EMA copy of the weights
    has_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS for k in sd)
    swapped = text_swapped = 0
    if has_ema and use_ema:
        sd, swapped, text_swapped = swap_in_ema(sd)
        logger.info("EMA weights swapped into %d UNet and %d text-encoder tensors", swapped, text_swapped)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
        if has_ema:
            logger.info("--no-ema: exporting the raw training weights, EMA dropped")
        else:
            logger.info("no EMA copy in %s: exporting its UNet weights as they are (in SD's pruned files, the EMA "
                        "weights already)", ckpt_path)
    sd = {k: v.contiguous() for k, v in cast_network_weights(sd, DTYPES[dtype]).items()}
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise CheckpointError(f"{ckpt_path} holds no UNet weights ({UNET_PREFIX}*): not a trained model to export")
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    info = {"source": os.path.abspath(ckpt_path), "global_step": step,
            "epoch": checkpoint.get("epoch") if isinstance(checkpoint, dict) else None,
            "ema": bool(swapped), "ema_text_encoder": bool(text_swapped), "dtype": dtype,
            "parameters": count_parameters(sd), "tensors": len(sd)}
    if metrics_path:  # given: validate() has read it
        info["losses"] = loss_summary(metrics_path)
    elif found := find_metrics(ckpt_path):
        try:
            info["losses"] = loss_summary(found)
        except (OSError, ValueError) as e:  # found, not asked for: the export goes on without it
            logger.warning("no losses in the sidecar: %s", e)
    save_safetensors(sd, out_path, metadata={"global_step": str(step), "ema": str(bool(swapped)),
                                             "ema_text_encoder": str(bool(text_swapped)), "dtype": dtype})
    info["bytes"] = os.path.getsize(out_path)
    with open(sidecar_path(out_path), "x") as f:
        json.dump(finite_or_null(info), f, indent=2, allow_nan=False, default=str)
        f.write("\n")
    return info


def finite_or_null(value):
    """`value` with NaN and infinities as None (JSON's null): json.dump writes them as NaN and
    Infinity, which strict JSON readers refuse (a diverged run's losses)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def sidecar_path(out_path):
    return os.path.splitext(out_path)[0] + ".json"


def build_parser():
    parser = ArgumentParser(description="Export a Lightning last.ckpt as .safetensors for txt2img.")
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt), e.g. logs/RUN/checkpoints/last.ckpt, or a "
                                      "diffusers pipeline folder")
    parser.add_argument("out", help="output .safetensors path (a .json sidecar is written next to it)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="dtype of the UNet and text-encoder weights (default fp16)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even if EMA weights exist")
    parser.add_argument("--metrics", help="Lightning metrics.csv for the loss summary "
                                          "(default: the run's csv/version_*/metrics.csv if found)")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow full unpickling of a TRUSTED checkpoint (can run arbitrary code)")
    return parser


def validate(parser, opt):
    if not os.path.exists(opt.ckpt):
        parser.error(f"checkpoint not found: {opt.ckpt}")
    check_checkpoint_type(parser, "checkpoint", opt.ckpt)
    if not opt.out.endswith(".safetensors"):
        parser.error(f"the output must be a .safetensors file, got {opt.out}")
    for path in (opt.out, sidecar_path(opt.out)):
        if os.path.exists(path):
            parser.error(f"{path} already exists; choose another output name (existing files are never overwritten)")
    if opt.metrics and not os.path.isfile(opt.metrics):
        parser.error(f"metrics file not found: {opt.metrics}")
    if opt.metrics:
        try:
            loss_summary(opt.metrics)
        except (OSError, ValueError) as e:
            parser.error(f"--metrics {e}")
    check_new_file(parser, "output", opt.out)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    opt = parser.parse_args(argv)
    validate(parser, opt)
    try:
        info = export(opt.ckpt, opt.out, dtype=opt.dtype, use_ema=not opt.no_ema,
                      metrics_path=opt.metrics, unsafe_pickle=opt.unsafe_pickle)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    except OSError as e:  # the output was checked writable: a full disk, or a folder gone meanwhile
        parser.exit(1, f"{parser.prog}: error: cannot write {opt.out} ({first_line(e)})\n")
    logger.info("wrote %s (%.1f MiB, step %s, EMA %s) and %s", opt.out, info["bytes"] / 2**20,
                info["global_step"], info["ema"], sidecar_path(opt.out))
    return info


if __name__ == "__main__":
    main()
