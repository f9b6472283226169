#!/usr/bin/env bash
# Train a T2I-Adapter (layout outlines -> the embedded procedural model) in ONE command on a GPU
# machine, benchmark it, and collect what is worth keeping in $OUT.
#
#   OUT=/path/to/out MODEL=models/embedded/procedural-t2i.safetensors bash scripts/gpu_train_adapter.sh
#
# MODEL is the trained embedded model (scripts/gpu_train_embedded.sh writes it; the adapter is
# trained against its frozen weights, so that model must exist first). Needs no network.
# Writes exactly 4 files to $OUT, each well under 16 MiB:
#   $NAME.safetensors       the adapter (~330k weights, float32, ~1.3 MiB), released key layout;
#                           use: txt2img.py --config configs/embedded/procedural-t2i.yaml
#                           --adapter $NAME.safetensors --cond outline.png --cond-type sketch
#   $NAME.json              settings, loss curve, held-out loss with and without the adapter, seconds
#   adapter-benchmark.md    scripts/adapter_benchmark.py's table (IoU with/without adapter,
#                           consistent attention and a reference image, agreement of the unnamed
#                           colours, fidelity, share of objects in the reference's colour)
#   adapter-benchmark.png   its figure: the conditions, then one row per setting
#
# Environment overrides (defaults for one H100):
#   STEPS=2000 BATCH=256 NUM_WORKERS=8 DEVICE=cuda PRECISION=bf16 CONDITION=outline
#   MAX_MINUTES=6         train_adapter.py stops there and still saves (--max-minutes); below the
#                         device's 10-minute command limit, leaving time for the benchmark
#   NAME=procedural-$CONDITION-adapter
#   TRAIN_ARGS=""         extra arguments for train_adapter.py (e.g. "--lr 2e-4 --ema-decay 0")
#   BENCHMARK=1 BENCH_ARGS=""   extra arguments for the benchmark (e.g. "--n 4 --seeds 0 --prompts 'a chair'");
#                         both are split like a shell command line, so quotes group words
#   RANDOM_WEIGHTS=0      1: no MODEL, a random model (CPU smoke runs only)
#   WORKDIR=logs/adapter  training logs and the benchmark's run folders, new ones per run (not copied to $OUT)
#
# Time: 2000 steps at batch 256 are ESTIMATED (not measured) at a few minutes on one H100: each
# step is one forward and backward pass of the 4.3M-parameter UNet at 32x32, as in the embedded
# model's own training (3000 steps budgeted at <= 11 minutes), without weight gradients for it.
#
# Tested on a CPU with a tiny run (tests/test_gpu_train_adapter_script.py does the same):
#   OUT=/tmp/out WORKDIR=/tmp/work RANDOM_WEIGHTS=1 STEPS=1 BATCH=2 NUM_WORKERS=0 DEVICE=cpu PRECISION=fp32 \
#     TRAIN_ARGS="--eval-size 2" BENCH_ARGS="--n 2 --steps 1 --seeds 0 --scale 1 --prompts 'a chair'" \
#     bash scripts/gpu_train_adapter.sh
set -euo pipefail

: "${OUT:?set OUT to the output folder}"
MODEL=${MODEL:-models/embedded/procedural-t2i.safetensors}
RANDOM_WEIGHTS=${RANDOM_WEIGHTS:-0}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-256}
NUM_WORKERS=${NUM_WORKERS:-8}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
CONDITION=${CONDITION:-outline}
MAX_MINUTES=${MAX_MINUTES:-6}
NAME=${NAME:-procedural-$CONDITION-adapter}
TRAIN_ARGS=${TRAIN_ARGS:-}
BENCHMARK=${BENCHMARK:-1}
BENCH_ARGS=${BENCH_ARGS:-}
WORKDIR=${WORKDIR:-logs/adapter}
CONFIG=configs/embedded/procedural-t2i.yaml

source scripts/gpu_env.sh   # offline, this checkout on PYTHONPATH, carried wheels installed

if [ "$RANDOM_WEIGHTS" = "1" ]; then
  weights=(--random-weights)
elif [ -f "$MODEL" ]; then
  weights=(--ckpt "$MODEL")
else
  echo "error: MODEL=$MODEL not found; train the embedded model first (scripts/gpu_train_embedded.sh) and set MODEL to its .safetensors" >&2
  exit 2
fi
mkdir -p "$OUT"
for f in "$NAME.safetensors" "$NAME.json" adapter-benchmark.md adapter-benchmark.png; do
  if [ -e "$OUT/$f" ]; then echo "error: $OUT/$f exists; use an empty OUT (outputs are never overwritten)" >&2; exit 2; fi
done
mkdir -p "$WORKDIR"
# the operator's own extra arguments, split like a command line (quoted prompts stay one word)
eval "train_args=($TRAIN_ARGS)"
eval "bench_args=($BENCH_ARGS)"

log() { echo "[gpu_train_adapter $(date +%H:%M:%S)] $*"; }
start=$(date +%s)

log "training the $CONDITION adapter: $STEPS steps at batch $BATCH on $DEVICE ($PRECISION), at most $MAX_MINUTES min"
train_log=$(mktemp "$WORKDIR/train-$NAME-XXXX.log")  # a new one per run: an earlier run's log stays
python3 scripts/train_adapter.py --config "$CONFIG" "${weights[@]}" --out "$OUT/$NAME.safetensors" \
  --condition "$CONDITION" --steps "$STEPS" --batch-size "$BATCH" --num-workers "$NUM_WORKERS" \
  --device "$DEVICE" --precision "$PRECISION" --max-minutes "$MAX_MINUTES" "${train_args[@]}" 2>&1 \
  | tee "$train_log" | grep --line-buffered -E "step [0-9]+/|held-out|wrote|rror|reached"
log "trained in $(( $(date +%s) - start )) s"

if [ "$BENCHMARK" = "1" ]; then
  log "adapter benchmark"
  bench_dir=$(mktemp -d "$WORKDIR/benchmark-XXXX")
  python3 scripts/adapter_benchmark.py --config "$CONFIG" "${weights[@]}" --adapter "$OUT/$NAME.safetensors" \
    --device "$DEVICE" --outdir "$bench_dir" "${bench_args[@]}"
  cp "$bench_dir"/run-001/table.md "$OUT/adapter-benchmark.md"
  cp "$bench_dir"/run-001/figure.png "$OUT/adapter-benchmark.png"
fi
log "done in $(( $(date +%s) - start )) s; outputs in $OUT"
