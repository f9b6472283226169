"""What consistent self-attention costs: one UNet call on a classifier-free-guidance batch (2N
images), for vanilla attention (upstream einsum and SDPA) and each sharing setting.

The UNet is built from a config with random weights (no checkpoint needed): speed and memory do
not depend on the weights. All ratios in one table come from one run on one device.

    # the GPU table (full SD v1 UNet, 512², fp16)
    python scripts/benchmark_attention.py --device cuda --dtype fp16 --n 1 2 4 8 16 32
    # a reduced run that any CPU finishes in seconds
    python scripts/benchmark_attention.py --config configs/stable-diffusion/v1-tiny.yaml \\
        --size 64 --n 1 2 --repeats 2 --device cpu
"""
import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.modules.attention import set_attention_backend  # noqa: E402
from ldm.modules.consistency import ConsistentAttentionConfig, consistent_attention  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Setting:
    name: str
    backend: str = "sdpa"
    sharing: ConsistentAttentionConfig | None = None


def shared(name, groups, **kw):
    return Setting(name, sharing=ConsistentAttentionConfig(groups=groups, **kw))


SETTINGS = [
    Setting("vanilla einsum (upstream)", backend="einsum"),
    Setting("vanilla sdpa"),
    shared("all: inner", {"inner"}),
    shared("all: middle+inner", {"middle", "inner"}),
    shared("all: decoder outer+middle", {"outer", "middle"}, half="decoder"),
    shared("all: all groups", {"outer", "middle", "inner"}),
    shared("anchor: all groups", {"outer", "middle", "inner"}, mode="anchor"),
    shared("sample 0.25: all groups", {"outer", "middle", "inner"}, mode="sample", sample_rate=0.25),
]
BASELINE = "vanilla sdpa"


def build_unet(config_path, device, dtype):
    cfg = OmegaConf.load(config_path).model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(cfg).eval().to(device=device, dtype=dtype)
    return unet, cfg.params.context_dim


def time_calls(fn, repeats, device):
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(unet, context_dim, setting, n, size, repeats, device, dtype):
    """(median ms per UNet call, peak GiB or None); None for both when out of memory."""
    latent = size // 8
    batch = 2 * n  # [uncond; cond]
    x = torch.randn(batch, unet.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    context = torch.randn(batch, 77, context_dim, device=device, dtype=dtype)
    set_attention_backend(unet, setting.backend)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad(), consistent_attention(unet, setting.sharing, n):
            seconds = time_calls(lambda: unet(x, t, context=context), repeats, device)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        set_attention_backend(unet, "sdpa")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return 1000 * seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size/8)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="images per CFG half")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", nargs="+", help="only these setting names (default: all)")
    opt = parser.parse_args(argv)
    if opt.size % 64:
        parser.error(f"--size must be a multiple of 64, got {opt.size}")
    device, dtype = torch.device(opt.device), DTYPES[opt.dtype]
    if device.type == "cpu" and dtype is torch.float16:
        dtype = torch.float32  # fp16 convolutions are not implemented on CPU
    settings = [s for s in SETTINGS if not opt.settings or s.name in opt.settings or s.name == BASELINE]

    unet, context_dim = build_unet(opt.config, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, {datetime.date.today()}, {opt.config}, "
          f"{opt.size}², {str(dtype).removeprefix('torch.')}, one UNet call on 2N images, median of {opt.repeats}")
    print(f"| {'setting':<28} | {'N':>3} | {'ms/call':>9} | {'ms/image':>9} | {'x sdpa':>6} | {'peak GiB':>8} |")
    print(f"|{'-' * 30}|{'-' * 5}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 10}|")
    for n in opt.n:
        baseline = None
        for setting in sorted(settings, key=lambda s: s.name != BASELINE):  # baseline first
            ms, peak = measure(unet, context_dim, setting, n, opt.size, opt.repeats, device, dtype)
            if setting.name == BASELINE:
                baseline = ms
            if ms is None:
                print(f"| {setting.name:<28} | {n:>3} | {'OOM':>9} | {'':>9} | {'':>6} | {'':>8} |")
                continue
            ratio = f"{ms / baseline:.2f}" if baseline else "-"
            peak_text = f"{peak:.2f}" if peak is not None else "-"
            print(f"| {setting.name:<28} | {n:>3} | {ms:>9.1f} | {ms / n:>9.1f} | {ratio:>6} | {peak_text:>8} |",
                  flush=True)


if __name__ == "__main__":
    main()
