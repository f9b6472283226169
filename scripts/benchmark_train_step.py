"""What gradient checkpointing of the UNet's transformer blocks costs a training step.

One step is the model's denoising loss on random latents and a caption (the text encoder runs
too when it is trainable), backward, no optimizer update; random weights, since the cost does
not depend on them. The ResBlocks are never checkpointed here (SD's config checkpoints them too),
so that the columns, and the FLOP count, differ in the transformer blocks alone. Checkpointed and plain steps alternate, so a machine that drifts affects
both columns alike; the table gives medians and their ratio from one run.

    # the embedded model's training step on a CPU (batch 16 keeps a step to seconds)
    python3 scripts/benchmark_train_step.py --config configs/embedded/procedural-t2i.yaml --batch 16
    # its FLOPs (counted, not timed; linear in the batch: x32 for the GPU recipe's 256, docs/gpu-session.md;
    # the einsum attention keeps every score matrix, so large batches do not fit a CPU machine's memory)
    python3 scripts/benchmark_train_step.py --config configs/embedded/procedural-t2i.yaml --batch 8 --flops
    # on a GPU, as main.py trains it (bf16 autocast)
    python3 scripts/benchmark_train_step.py --config configs/embedded/procedural-t2i.yaml --batch 256 \\
        --device cuda --autocast bf16
    # whether the data keeps up: one loader process rendering the config's training data
    python3 scripts/benchmark_train_step.py --config configs/embedded/procedural-t2i.yaml --batch 256 --data
"""
import datetime
import itertools
import logging
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.model_choice import in_repo, read_model_geometry  # noqa: E402
from ldm.modules.attention import BasicTransformerBlock, set_attention_backend  # noqa: E402
from ldm.script_helpers import ArgumentParser, positive_int  # noqa: E402
from ldm.util import ConfigError, first_line, instantiate_from_config  # noqa: E402
from scripts.benchmark_attention import device_name, time_calls  # noqa: E402

AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_step(model, latent, batch, device, autocast):
    """A closure: one forward and backward of the model's loss, as a training step computes it.
    `latent`: (C, H, W) of what the UNet denoises (pixels for the pixel-space embedded model)."""
    z = torch.randn(batch, *latent, device=device)
    captions = ["a red chair with four legs"] * batch
    context = captions if model.cond_stage_trainable else model.get_learned_conditioning(captions).detach()
    amp = torch.autocast(device.type, dtype=AUTOCAST[autocast]) if AUTOCAST[autocast] else nullcontext()

    def step():
        model.zero_grad(set_to_none=True)
        with amp:
            loss, _ = model(z, context)
        loss.backward()
    return step


def data_rate(parser, config, batch, repeats):
    """(median seconds, scenes per second) of one process making a training batch of the config's
    training data: what one DataLoader worker delivers (main.py trains with data.params.num_workers)."""
    try:
        dataset = instantiate_from_config(config.data.params.train)
    except Exception as e:  # a config without data, or data that needs files this machine lacks
        parser.error(f"--data: cannot build the config's data.params.train ({first_line(e)})")
    indices = itertools.count()  # new scenes in every batch, as training draws them
    seconds = time_calls(lambda: [dataset[next(indices) % len(dataset)] for _ in range(batch)],
                         repeats, torch.device("cpu"))[0]
    return seconds, batch / seconds


def count_flops(model, blocks, step):
    """Matmul and convolution FLOPs of one `step`, the usual MFU convention; plain blocks (a
    checkpointed one would count its recomputed forward too)."""
    from torch.utils.flop_counter import FlopCounterMode
    set_attention_backend(model, "einsum")  # the fused CPU kernel is invisible to the counter
    for block in blocks:
        block.checkpoint = False
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/embedded/procedural-t2i.yaml", type=in_repo, help="model config")
    parser.add_argument("--batch", type=positive_int, default=16, help="images per training step")
    parser.add_argument("--size", type=positive_int, metavar="PX",
                        help="image size (default: the config's sampling size, else 512)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps per setting and round (2 rounds)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the steps run")
    parser.add_argument("--autocast", default="off", choices=list(AUTOCAST), help="mixed precision of the step")
    parser.add_argument("--flops", action="store_true",
                        help="count the FLOPs of one plain step instead of timing (matmuls and convolutions, forward "
                             "and backward; attention through the einsum backend, whose matmuls the counter sees)")
    parser.add_argument("--data", action="store_true",
                        help="time the config's training data instead: one process making batches of --batch "
                             "(what one loader worker delivers)")
    opt = parser.parse_args(argv)
    if opt.data:
        unused = [flag for flag, given in (("--flops", opt.flops), ("--size", opt.size is not None),
                                           ("--device", opt.device != "cpu"), ("--autocast", opt.autocast != "off"))
                  if given]
        if unused:
            parser.error(f"--data times the data alone, on the CPU: {', '.join(unused)} would have no effect")
    if opt.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    geometry = read_model_geometry(parser, "--config", opt.config)
    if opt.data:
        seconds, rate = data_rate(parser, OmegaConf.load(opt.config), opt.batch, opt.repeats)
        date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        print(f"# one process, torch {torch.__version__}, {date}, {opt.config}: data.params.train, "
              f"median of {opt.repeats} batches of {opt.batch}")
        print(f"{seconds * 1000:.1f} ms per batch, {rate:.0f} scenes/s")
        return
    size = opt.size or geometry.height
    if size % geometry.multiple:
        parser.error(f"--size {size} is not a multiple of {geometry.multiple}, which this model needs")
    device = torch.device(opt.device)

    torch.manual_seed(0)
    try:
        model = instantiate_from_config(OmegaConf.load(opt.config).model).to(device).train()
    except ConfigError as e:  # a misspelt or missing target: the geometry check reads no targets
        parser.error(f"--config {opt.config}: {e}")
    for module in model.modules():  # the ResBlocks' checkpointing (a config's use_checkpoint) stays off:
        if hasattr(module, "use_checkpoint"):  # the columns differ in the transformer blocks' alone
            module.use_checkpoint = False
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        parser.error(f"{opt.config} has no transformer blocks to checkpoint")
    latent = (geometry.channels, size // geometry.factor, size // geometry.factor)
    step = training_step(model, latent, opt.batch, device, opt.autocast)
    if opt.flops:
        print(f"# {opt.config}, batch {opt.batch}, {size}x{size} px, torch {torch.__version__}: one training step")
        print(f"{count_flops(model, blocks, step) / 1e9:.3f} GFLOP")
        return
    seconds = {True: [], False: []}
    for _ in range(2):  # alternate: drift of a shared machine lands on both settings
        for checkpointed in (True, False):
            for block in blocks:
                block.checkpoint = checkpointed
            seconds[checkpointed].append(time_calls(step, opt.repeats, device)[0])
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# {device_name(device)}, torch {torch.__version__}, {date}, {opt.config}, batch {opt.batch}, "
          f"{size}x{size} px, autocast {opt.autocast}, {len(blocks)} transformer blocks, "
          f"medians of 2 rounds of {opt.repeats} steps")
    print("| transformer blocks | ms/step | x plain |")
    print("|---|---|---|")
    print(f"| checkpointed | {on * 1000:.0f} | {on / off:.3f} |")
    print(f"| plain | {off * 1000:.0f} | 1.000 |")


if __name__ == "__main__":
    main()
