"""What consistent self-attention costs: one UNet call on a classifier-free-guidance batch (2N
images), for vanilla attention (upstream einsum and SDPA) and each sharing setting; and, with
--end-to-end, images/s of whole txt2img batches (50 DDIM steps) with and without sharing.

The models are built from a config with random weights (no checkpoint needed): speed and memory
do not depend on the weights. All ratios in one table come from one run on one device.

    # the GPU table (full SD v1 UNet, 512², fp16); scripts/gpu_benchmarks.sh runs all variants
    python3 scripts/benchmark_attention.py --device cuda --dtype fp16 --n 1 2 4 8 16 32
    # end to end: text encoder + 50 DDIM steps of the UNet + VAE decoder, N=8 with CFG
    python3 scripts/benchmark_attention.py --device cuda --dtype fp16 --end-to-end --n 8
    # a reduced run that any CPU finishes in seconds
    python3 scripts/benchmark_attention.py --config configs/stable-diffusion/v1-tiny.yaml \\
        --size 64 --n 1 2 --repeats 2 --device cpu --dtype fp32

Columns: ms per UNet call and per image (median of --repeats calls after a warm-up), the ratio to
vanilla SDPA at the same N, peak memory (CUDA only), the call's FLOPs (counted once per setting
and N with torch.utils.flop_counter on the meta device: matmuls and convolutions, no data and no
time needed) and the achieved TFLOP/s, also as a percentage of the device's dense peak.
A setting that runs out of memory is an OOM row; the run goes on.
"""
import argparse
import csv
import datetime
import logging
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.model_choice import in_repo, read_model_geometry  # noqa: E402
from ldm.modules.attention import set_attention_backend  # noqa: E402
from ldm.modules.consistency import ConsistentAttentionConfig, consistent_attention  # noqa: E402
from ldm.script_helpers import (ArgumentParser, add_threads_argument, check_new_file, check_steps,  # noqa: E402
                                set_cpu_threads)
from ldm.util import instantiate_from_config  # noqa: E402

log = logging.getLogger("benchmark_attention")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Dense fp16/bf16 tensor-core peaks in TFLOP/s. NVIDIA's datasheets quote the figure "with
# sparsity" (2:4 structured); dense is half of it: H100 SXM5 1979 -> 989.4, H100 NVL 1671 -> 835.5,
# H100 PCIe 1513 -> 756.5 (H100 Tensor Core GPU datasheet); H200 1979 -> 989.4 (H200 datasheet);
# A100 624 -> 312 (A100 datasheet). First matching substring of torch.cuda.get_device_name wins.
# fp32 has no entry: cuDNN convolutions may use TF32, matmuls by default do not, so no single
# peak applies; pass --peak-tflops to get a percentage anyway.
PEAK_TFLOPS_16BIT = [("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
                     ("A100", 312.0)]

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
CSV_FIELDS = ["kind", "device", "torch", "date", "dtype", "variant", "setting", "n", "status",
              "ms_call", "ms_image", "x_sdpa", "peak_gib", "gflop_call", "tflops", "pct_peak", "compile_s",
              "steps", "s_batch", "images_per_s", "s_sampling", "s_decode"]


@dataclass(frozen=True)
class Setting:
    name: str
    backend: str = "sdpa"
    sharing: ConsistentAttentionConfig | None = None


def shared(name, groups, mode="all", **kw):
    return Setting(name, sharing=ConsistentAttentionConfig(groups=groups, mode=mode, **kw))


ALL_GROUPS = {"outer", "middle", "inner"}
SETTINGS = [
    Setting("vanilla einsum (upstream)", backend="einsum"),
    Setting("vanilla sdpa"),
    shared("all: inner", {"inner"}),
    shared("all: middle+inner", {"middle", "inner"}),
    shared("all: decoder outer+middle", {"outer", "middle"}, blocks="decoder"),
    shared("all: all groups", ALL_GROUPS),
    shared("anchor: middle+inner", {"middle", "inner"}, mode="anchor"),
    shared("anchor: all groups", ALL_GROUPS, mode="anchor"),
    shared("sample 0.25: middle+inner", {"middle", "inner"}, mode="sample", sample_rate=0.25),
    shared("sample 0.25: all groups", ALL_GROUPS, mode="sample", sample_rate=0.25),
    shared("all+subject: middle+inner", {"middle", "inner"}, subjects=("subject",)),
]
BASELINE = "vanilla sdpa"
DEFAULT_SHARING = "anchor: middle+inner"  # = ConsistentAttentionConfig(), what --consistent-attn uses
assert next(s for s in SETTINGS if s.name == DEFAULT_SHARING).sharing == ConsistentAttentionConfig()


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

def build_unet(config_path, device, dtype, channels_last=False):
    """The UNet of `config_path` with random weights (seed 0), on `device` in `dtype`, eval mode."""
    cfg = OmegaConf.load(config_path).model.params.unet_config
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: the full UNet is 860M parameters
        unet = instantiate_from_config(cfg).eval().to(dtype=dtype)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet, cfg.params.context_dim


def unet_inputs(unet, context_dim, n, latent, device, dtype, channels_last=False, context_len=77):
    """x, t, context of one CFG batch: 2N latents of latent² pixels, timestep 500, random text features."""
    batch = 2 * n  # [uncond; cond]
    x = torch.randn(batch, unet.in_channels, latent, latent, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, context_len, context_dim, device=device, dtype=dtype)
    return x, t, context


def subject_tokens(setting, n, context_len=77):
    """(n, context_len) bool for a --subject setting, else None: the subject at token 2 of every
    prompt. Where it is does not change the cost: the masks select keys, the kernels attend to all."""
    if setting.sharing is None or not setting.sharing.subjects:
        return None
    tokens = torch.zeros(n, context_len, dtype=torch.bool)
    tokens[:, 2] = True
    return tokens


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_tflops(device, dtype, given):
    if given:
        return given
    if device.type != "cuda" or dtype is torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT if key in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, repeats, device):
    """(median seconds of `repeats` calls, seconds of the first call). The first call is the
    warm-up: cuDNN autotuning, allocator growth, and with --compile the compilation."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def cuda_graph(fn):
    """`fn` captured once into a CUDA graph; returns its replay. Inputs and outputs are the
    captured (static) tensors, which is all a timing loop needs. Warm-up on a side stream first,
    as torch.cuda.graphs asks, so that lazily initialised kernels are not captured half-built."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def needs_host_each_call(setting):
    """Sample mode draws its tokens on the CPU every call (seeded by the timestep), and --subject
    turns each call's cross-attention maps into the next call's masks in Python: a CUDA graph
    would replay the capture's draws and masks forever. Every other setting is capturable."""
    sharing = setting.sharing
    return sharing is not None and (sharing.mode.value == "sample" or sharing.window != (0.0, 1.0)
                                    or bool(sharing.subjects))


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

class FlopCounter:
    """FLOPs of one UNet call per (setting, N), counted on a meta-device copy of the UNet: shapes
    only, so even the settings that run out of memory on the GPU get a count, in milliseconds.
    On the meta device SDPA runs its math path (two bmm per call), which the counter sees; the
    fused kernels do the same 4·B·heads·Tq·Tk·d multiply-adds. Anchor mode is counted as it runs
    on a GPU, with the plain call its anchors come from (`rounds_by_batch_size`); the CPU skips it."""

    def __init__(self, config_path, dtype):
        cfg = OmegaConf.load(config_path).model.params.unet_config
        with torch.device("meta"):
            self.unet = instantiate_from_config(cfg).eval().to(dtype=dtype)
        self.context_dim, self.dtype = cfg.params.context_dim, dtype

    @torch.no_grad()
    def __call__(self, setting, n, latent):
        from torch.utils.flop_counter import FlopCounterMode
        x, t, context = unet_inputs(self.unet, self.context_dim, n, latent, torch.device("meta"), self.dtype)
        set_attention_backend(self.unet, setting.backend)
        counter = FlopCounterMode(display=False)
        with consistent_attention(self.unet, setting.sharing, n, subject_tokens=subject_tokens(setting, n)) as policy:
            if policy is not None:
                # The pre-hook reads the timestep's value, which a meta tensor does not have;
                # the FLOPs do not depend on it (sharing on, sampled token count fixed by the rate).
                policy.hook.remove()
            if policy is not None and policy.subject is not None:
                self.unet(x, t, context=context)  # the maps the counted call's masks come from
                policy.subject.start_call()     # what the removed pre-hook would do
            with counter:
                self.unet(x, t, context=context)
        return counter.get_total_flops()


# --------------------------------------------------------------------------------------------
# The UNet table
# --------------------------------------------------------------------------------------------

def measure(unet, call, context_dim, setting, n, opt, device, dtype):
    """One row's numbers: dict(status, ms_call, peak_gib, compile_s)."""
    x, t, context = unet_inputs(unet, context_dim, n, opt.latent, device, dtype, opt.channels_last)
    set_attention_backend(unet, setting.backend)
    reset_memory(device)
    try:
        # with --subject the warm-up call makes the masks that the timed calls share through
        with torch.no_grad(), consistent_attention(unet, setting.sharing, n, subject_tokens=subject_tokens(setting, n)):
            fn = lambda: call(x, t, context=context)  # noqa: E731
            if opt.cuda_graphs:
                fn = cuda_graph(fn)
            seconds, first = time_calls(fn, opt.repeats, device)
    except torch.OutOfMemoryError:
        # leave the except block before freeing: the traceback holds the activations
        return dict(status="OOM")
    finally:
        set_attention_backend(unet, "sdpa")
    compile_s = first - seconds if opt.compile else None
    return dict(status="ok", ms_call=1000 * seconds, peak_gib=peak_memory_gib(device), compile_s=compile_s)


def run_table(opt, device, dtype, header):
    settings = [s for s in SETTINGS if not opt.settings or s.name in opt.settings or s.name == BASELINE]
    unet, context_dim = build_unet(opt.config, device, dtype, opt.channels_last)
    call = unet
    if opt.compile:
        # The default mode; "reduce-overhead" would add CUDA graphs, measured on their own by
        # --cuda-graphs. Each setting and N compiles again (shapes and the sharing policy are
        # guarded on); compile_s says how long.
        call = torch.compile(unet)
    flops = FlopCounter(opt.config, dtype)
    peak = peak_tflops(device, dtype, opt.peak_tflops)
    variant = variant_name(opt)

    print_table_header(header, [("setting", 28), ("N", 3), ("ms/call", 9), ("ms/image", 9), ("x sdpa", 6),
                                ("peak GiB", 8), ("GFLOP/call", 10), ("TFLOP/s", 7), ("% peak", 6)])
    rows = []
    for n in opt.n:
        baseline = None
        for setting in sorted(settings, key=lambda s: s.name != BASELINE):  # baseline first
            if opt.cuda_graphs and needs_host_each_call(setting):
                log.info("%s: not measured with --cuda-graphs (its draws/window are decided on the host "
                         "each call)", setting.name)
                continue
            result = measure(unet, call, context_dim, setting, n, opt, device, dtype)
            gflop = flops(setting, n, opt.latent) / 1e9
            row = dict(kind="unet", variant=variant, setting=setting.name, n=n, gflop_call=gflop, **result)
            if result["status"] == "ok":
                ms = result["ms_call"]
                baseline = ms if setting.name == BASELINE else baseline
                tflops = gflop / ms  # GFLOP per ms = TFLOP per s
                row.update(ms_image=ms / n, x_sdpa=ms / baseline if baseline else None, tflops=tflops,
                           pct_peak=100 * tflops / peak if peak else None)
                if result["compile_s"] is not None:
                    log.info("%s, N=%d: first call (compilation) took %.1f s more than a timed call",
                             setting.name, n, result["compile_s"])
            rows.append(row)
            print(format_table_row(row), flush=True)
        if baseline is not None and len(settings) > 1:
            plain = next(s for s in settings if s.name == BASELINE)
            check_drift(baseline, measure(unet, call, context_dim, plain, n, opt, device, dtype), n)
    return rows


DRIFT_WARNING = 0.05


def check_drift(baseline_ms, again, n):
    """The baseline timed again after the settings: a machine whose speed changed meanwhile (clock
    boost, thermal limits, another job) moves every ratio of this N by as much, so say by how much."""
    if again["status"] != "ok":
        return
    drift = again["ms_call"] / baseline_ms - 1
    level = logging.WARNING if abs(drift) > DRIFT_WARNING else logging.INFO
    log.log(level, "N=%d: %s timed again after the settings: %+.1f%% (%.1f ms)%s", n, BASELINE, 100 * drift,
            again["ms_call"], "; the machine's speed changed, rerun for firm ratios" if level == logging.WARNING else "")


def print_table_header(title, columns):
    """The title line, then a markdown table head: (name, width) per column, the first left-aligned."""
    print(title)
    names = [f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns)]
    print("| " + " | ".join(names) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")


def format_table_row(row):
    def num(key, fmt, width):
        value = row.get(key)
        return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"
    if row["status"] != "ok":
        return (f"| {row['setting']:<28} | {row['n']:>3} | {row['status']:>9} | {'':>9} | {'':>6} | {'':>8} "
                f"| {num('gflop_call', '.4g', 10)} | {'':>7} | {'':>6} |")
    return (f"| {row['setting']:<28} | {row['n']:>3} | {num('ms_call', '.1f', 9)} | {num('ms_image', '.1f', 9)} "
            f"| {num('x_sdpa', '.2f', 6)} | {num('peak_gib', '.2f', 8)} | {num('gflop_call', '.4g', 10)} "
            f"| {num('tflops', '.3g', 7)} | {num('pct_peak', '.0f', 6)} |")


# --------------------------------------------------------------------------------------------
# End to end: whole txt2img batches
# --------------------------------------------------------------------------------------------

def run_end_to_end(opt, device, dtype, header):
    """Images/s of txt2img batches of N images: text encoder (cond + uncond), `--steps` DDIM steps
    with CFG (one UNet call on 2N per step) and the VAE decoder, with and without the default
    --consistent-attn settings. Prompt tokenisation and PNG writing are left out."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.script_helpers import conditionings, latents_to_images
    from ldm.checkpoints import load_model_from_config

    config = OmegaConf.load(opt.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = load_model_from_config(config, None, device, random_weights=True)
    # The networks in `dtype`; the diffusion schedule buffers stay float32, so that DDIM computes
    # its update as txt2img does. Autocast covers the float32 tensors the sampler hands over.
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        part.to(dtype=dtype)
        if opt.channels_last:
            part.to(memory_format=torch.channels_last)
    unet = model.model.diffusion_model  # sharing is set on the module itself, compiled or not
    if opt.compile:
        model.model.diffusion_model = torch.compile(unet)
    sampler = DDIMSampler(model)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not torch.float32 else nullcontext()
    shape = [model.channels, opt.latent, opt.latent]

    print_table_header(header, [("setting", 28), ("N", 3), ("steps", 5), ("s/batch", 8), ("images/s", 8),
                                ("x plain", 7), ("sampling s", 10), ("decode s", 8), ("peak GiB", 8)])
    rows = []
    for n in opt.n:
        baseline = None
        for name, sharing in (("plain", None), ("--consistent-attn default", ConsistentAttentionConfig())):
            prompts = n * ["a photo of a wooden chair"]
            x_T = torch.randn([n] + shape, generator=torch.Generator().manual_seed(0)).to(device)

            def batch(steps):
                with torch.no_grad(), autocast, model.ema_scope(), consistent_attention(unet, sharing, n):
                    c, uc = conditionings(model, prompts, 7.5)
                    latents, _ = sampler.sample(S=steps, conditioning=c, batch_size=n, shape=shape, verbose=False,
                                                unconditional_guidance_scale=7.5, unconditional_conditioning=uc,
                                                eta=0.0, x_T=x_T)
                    synchronize(device)
                    sampled = time.perf_counter()
                    latents_to_images(model, latents)  # ends with .cpu(): waits for the GPU
                return sampled

            reset_memory(device)
            try:
                batch(min(2, opt.steps))  # warm-up: cuDNN autotuning, allocator, compilation
                times = []
                for _ in range(opt.repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    sampled = batch(opt.steps)
                    end = time.perf_counter()
                    times.append((end - start, sampled - start, end - sampled))
            except torch.OutOfMemoryError:
                row = dict(kind="end-to-end", variant=variant_name(opt), setting=name, n=n, steps=opt.steps,
                           status="OOM")
                print(f"| {name:<28} | {n:>3} | {opt.steps:>5} | {'OOM':>8} | {'':>8} | {'':>7} | {'':>10} "
                      f"| {'':>8} | {'':>8} |", flush=True)
                rows.append(row)
                continue
            total, sampling, decode = (statistics.median(column) for column in zip(*times))
            baseline = total if sharing is None else baseline
            row = dict(kind="end-to-end", variant=variant_name(opt), setting=name, n=n, steps=opt.steps,
                       status="ok", s_batch=total, images_per_s=n / total, s_sampling=sampling, s_decode=decode,
                       x_sdpa=total / baseline if baseline else None, peak_gib=peak_memory_gib(device))
            rows.append(row)
            peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
            ratio = f"{row['x_sdpa']:.2f}" if row["x_sdpa"] is not None else "-"
            print(f"| {name:<28} | {n:>3} | {opt.steps:>5} | {total:>8.2f} | {n / total:>8.2f} | {ratio:>7} "
                  f"| {sampling:>10.2f} | {decode:>8.2f} | {peak:>8} |", flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def variant_name(opt):
    parts = [opt.dtype] + [flag for flag, on in (("channels_last", opt.channels_last), ("compile", opt.compile),
                                                  ("cuda_graphs", opt.cuda_graphs)) if on]
    return "+".join(parts)


def write_csv(path, rows, common):
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{v:.6g}" if isinstance(v, float) else v for key, v in {**common, **row}.items()})


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, type=in_repo,
                        help=f"the UNet to time, built with random weights (default: {DEFAULT_CONFIG})")
    parser.add_argument("--size", type=int,
                        help="image size in pixels; default: the config's sampling size (512 for SD v1)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="images per CFG half")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="weights and activations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (batches with --end-to-end)")
    add_threads_argument(parser)
    parser.add_argument("--settings", nargs="+", metavar="NAME",
                        help="only these settings (vanilla sdpa is always measured); default: all of "
                             + "; ".join(s.name for s in SETTINGS))
    parser.add_argument("--channels-last", action="store_true", help="UNet and inputs in channels_last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (compile time is logged and in the CSV, not in ms/call)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each UNet call from a CUDA graph (settings that decide on the host "
                             "each call, sample mode and step windows, are skipped)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak for --dtype in TFLOP/s (> 0), if not in the built-in table")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time whole txt2img batches (text encoder, DDIM with CFG, VAE decoder) instead")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per batch with --end-to-end")
    parser.add_argument("--csv", metavar="PATH",
                        help="append the rows to this CSV file: a new one (header written) or one this script wrote")
    return parser


def validate(parser, opt):
    """Bad input ends here with one `error:` line that says how to fix it."""
    for flag, values in (("--n", opt.n), ("--repeats", [opt.repeats]), ("--steps", [opt.steps])):
        if min(values) < 1:
            parser.error(f"{flag} must be at least 1, got {min(values)}")
    geometry = read_model_geometry(parser, "--config", opt.config, DEFAULT_CONFIG)
    if opt.end_to_end:
        check_steps(parser, "--steps", opt.steps, geometry.timesteps, f" (model.params.timesteps in {opt.config})")
    if opt.size is None:
        opt.size = geometry.height
    if opt.size < geometry.multiple or opt.size % geometry.multiple:
        parser.error(f"--size must be a multiple of {geometry.multiple} for this model (its first stage and "
                     f"UNet levels halve it), got {opt.size}")
    opt.latent = opt.size // geometry.factor
    try:
        device = torch.device(opt.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # torch knows mps, meta, ...: not usable here
        parser.error(f"unsupported --device {opt.device!r} (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {opt.device}: there are {torch.cuda.device_count()} CUDA devices, numbered from 0")
    if opt.peak_tflops is not None and not opt.peak_tflops > 0:
        parser.error(f"--peak-tflops must be positive, got {opt.peak_tflops}")
    if opt.cuda_graphs and (device.type != "cuda" or opt.end_to_end or opt.compile):
        parser.error("--cuda-graphs needs --device cuda and the UNet table (not --end-to-end or --compile)")
    unknown = sorted(set(opt.settings or []) - {s.name for s in SETTINGS})
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from: " + "; ".join(s.name for s in SETTINGS))
    if opt.csv is not None:
        check_csv(parser, opt.csv)
    return device, DTYPES[opt.dtype]


def check_csv(parser, path):
    """--csv is checked now, not after the benchmark: a new file in a writable folder, or a CSV this
    script wrote (its header row is CSV_FIELDS), which the rows are appended to."""
    if os.path.isdir(path):
        parser.error(f"--csv {path} is a folder; pass a CSV file path")
    if not os.path.exists(path):
        check_new_file(parser, "--csv", path)
        return
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        open(path, "a").close()  # writable? opening to append changes nothing
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        parser.error(f"--csv {path}: cannot read and append to it ({e}); pass a new file")
    if header is not None and header != CSV_FIELDS:  # None: an empty file, the header is written
        parser.error(f"--csv {path} is not a CSV this benchmark wrote (its first row is not the header "
                     f"{','.join(CSV_FIELDS[:4])},...); pass a new file, or one with those columns to append to")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    opt = parser.parse_args(argv)
    device, dtype = validate(parser, opt)
    set_cpu_threads(opt.threads, device)  # the table's header says how many
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    common = dict(device=device_name(device), torch=torch.__version__, date=date, dtype=opt.dtype)
    what = (f"end to end: text encoder + {opt.steps} DDIM steps (CFG 7.5, 2N per UNet call) + VAE decoder, "
            f"median of {opt.repeats} batches" if opt.end_to_end else
            f"one UNet call on 2N images, median of {opt.repeats}")
    header = (f"# {common['device']}, torch {torch.__version__}, {date}, {opt.config}, {opt.size}², "
              f"{variant_name(opt)}, {what}")
    rows = run_end_to_end(opt, device, dtype, header) if opt.end_to_end else run_table(opt, device, dtype, header)
    if opt.csv:
        write_csv(opt.csv, rows, common)


if __name__ == "__main__":
    main()
