"""How long loading a checkpoint takes, and the memory it peaks at, two ways: built then loaded
(upstream's way: every parameter randomly initialised, then overwritten) and loaded into
placeholders (ldm.checkpoints.build_with_weights: parameters on the meta device, no initialisation,
copies of the checkpoint's tensors taken as they are read).

The checkpoints are the config's model with random weights (loading does not depend on them),
written once per format into --workdir and deleted afterwards. Every load runs in a process of
its own, the two ways alternating; seconds are the build, the load and one read of every weight
(imports excluded; both ways map safetensors and torch's zip files, whose weights are read from
the file only when first used), medians of --repeats. Peak is the process's resident memory,
imports included, the file pages of a mapped checkpoint too (the kernel can drop those under
memory pressure); held is the memory the process itself holds with the model loaded (anonymous
memory, which the kernel can only swap out).

    # SD v1, 1.07 G weights: UNet, text encoder, autoencoder (writes two 2.1 GB files and a 4.3 GB one)
    python3 scripts/benchmark_loading.py --config configs/stable-diffusion/v1-inference.yaml
    # what the tests run
    python3 scripts/benchmark_loading.py --config configs/stable-diffusion/v1-tiny.yaml --repeats 1
"""
import argparse
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.model_choice import in_repo, load_config, read_model_geometry  # noqa: E402
from ldm.script_helpers import ArgumentParser, check_output_dir, positive_int  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

WAYS = ("built then loaded", "into placeholders")
FORMATS = ("fp16 .safetensors", "fp32 .ckpt", "fp16 .ckpt")  # diffusers', CompVis' and pruned files


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", type=in_repo,
                        help="the model's config")
    parser.add_argument("--repeats", type=positive_int, default=3, help="loads per way and format")
    parser.add_argument("--workdir", help="where the checkpoints are written (default: a temporary folder)")
    # the child process's entry point: one load, printed as JSON
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "CKPT"), help=argparse.SUPPRESS)
    return parser


def write_checkpoints(config, folder):
    """{format: path} of the config's model with random weights."""
    from safetensors.torch import save_file

    from ldm.checkpoints import build_for_weights
    torch.manual_seed(0)
    state = build_for_weights(config, "benchmark checkpoints").state_dict()
    names = ("model.safetensors", "model.ckpt", "model-fp16.ckpt")
    paths = {f: os.path.join(folder, name) for f, name in zip(FORMATS, names)}
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, paths[FORMATS[0]])
    torch.save({"state_dict": state}, paths[FORMATS[1]])
    torch.save({"state_dict": half}, paths[FORMATS[2]])
    return paths


def measure(config_path, way, ckpt):
    """One load in this process: {"seconds": build, load and a read of every weight, "peak_gib",
    "held_gib": memory_gib()}."""
    from ldm.checkpoints import build_for_weights, build_with_weights, load_weights
    config = load_config(config_path)
    start = time.perf_counter()
    if way == WAYS[0]:
        model = build_for_weights(config, "benchmark")
        load_weights(model, ckpt)
    else:
        model, _ = build_with_weights(config, ckpt)
    for tensor in model.state_dict().values():  # a mapped file's weights are read at their first use
        tensor.sum()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **memory_gib()}  # while the model is alive


def memory_gib():
    """{"peak_gib": this process's peak resident memory, "held_gib": the anonymous part of what it
    holds now}. Linux's VmHWM, which starts anew with the process's program; getrusage's ru_maxrss
    does not: after fork and exec it keeps the parent's size at the fork (here the parent has just
    written the checkpoints). Elsewhere: ru_maxrss, and nothing for held (NaN)."""
    try:
        with open("/proc/self/status") as f:
            status = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in f if line.split()[-1] == "kB"}
        return {"peak_gib": status["VmHWM"], "held_gib": status["RssAnon"]}
    except (OSError, KeyError):  # not Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
        return {"peak_gib": peak, "held_gib": float("nan")}


def load_in_child(config_path, way, ckpt):
    result = subprocess.run([sys.executable, __file__, "--config", config_path, "--measure", way, ckpt],
                            capture_output=True, text=True)
    if result.returncode:  # the child's last words, not CalledProcessError's traceback without them
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise SystemExit(f"error: loading {os.path.basename(ckpt)} ({way}) failed: {reason}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None):
    parser = build_parser()
    opt = parser.parse_args(argv)
    if opt.measure:  # a child of the run below, which has checked the input
        print(json.dumps(measure(opt.config, *opt.measure)))
        return
    read_model_geometry(parser, "--config", opt.config)  # a missing or non-model config is one error line
    if opt.workdir is not None:
        check_output_dir(parser, "--workdir", opt.workdir)
    # `kill` (SIGTERM) ends the run as Ctrl-C does, through the `with` below: its checkpoints (8.5 GB
    # for SD v1) are deleted, not left in the temporary folder
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with tempfile.TemporaryDirectory(dir=opt.workdir) as folder:
            try:
                paths = write_checkpoints(load_config(opt.config), folder)
            except ConfigError as e:  # a misspelt or missing target: the geometry check reads no targets
                parser.error(f"--config {opt.config}: {e}")
            runs = {(f, w): [] for f in FORMATS for w in WAYS}
            for f in FORMATS:
                for _ in range(opt.repeats):
                    for w in WAYS:  # alternating, so that a drifting machine affects both alike
                        runs[f, w].append(load_in_child(opt.config, w, paths[f]))
    finally:  # a caller's own handler back (the tests call main in their process)
        signal.signal(signal.SIGTERM, previous)
    print(f"# {opt.config}, torch {torch.__version__}, {os.cpu_count()} CPUs, {datetime.date.today()}: "
          f"medians of {opt.repeats} load(s), each in a process of its own")
    print("| checkpoint | way | s | x placeholders | peak GiB | held GiB |")
    print("|---|---|---|---|---|---|")
    for f in FORMATS:
        seconds = {w: statistics.median(r["seconds"] for r in runs[f, w]) for w in WAYS}
        for w in WAYS:
            peak, held = (max(r[key] for r in runs[f, w]) for key in ("peak_gib", "held_gib"))
            print(f"| {f} | {w} | {seconds[w]:.2f} | {seconds[w] / seconds[WAYS[1]]:.2f} | {peak:.2f} | {held:.2f} |")


if __name__ == "__main__":
    main()
