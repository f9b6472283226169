#!/usr/bin/env bash
# Train the embedded procedural text-to-image model (configs/embedded/procedural-t2i.yaml) in
# ONE command on a GPU machine, export it and collect everything worth keeping in $OUT.
#
#   OUT=/path/to/out bash scripts/gpu_train_embedded.sh         # from the repository root
#
# Needs no network (the CLIP tokenizer is built from the vocabulary in the repo, the data is
# rendered on the fly). Writes at most 8 files to $OUT, each well under 16 MiB:
#   procedural-t2i.safetensors  float16 weights, EMA UNet and text encoder (scripts/export_checkpoint.py), ~15 MiB
#   procedural-t2i.json         global step, losses, parameter counts
#   metrics.csv                 the Lightning CSV log (loss every 10 steps, validation every 500)
#   train-tail.log              the last 300 lines of the training log
#   samples.png                 txt2img grid of the exported model (sanity check of the export)
#   benchmark/run-001/{table.md,results.csv,figure.png}   scripts/consistency_benchmark.py
#                               (BENCHMARK=0 skips it; it runs after everything else is saved)
#
# Environment overrides (defaults for one H100):
#   MAX_STEPS=3000 BATCH=256 NUM_WORKERS=8 ACCELERATOR=gpu PRECISION=bf16-mixed
#   MAX_TIME=00:00:07:30   (DD:HH:MM:SS; Lightning stops there and still saves last.ckpt; the device
#                           tool stops a command at 10 minutes, export and grid need ~1 more)
#   TRAIN_ARGS=""               (more KEY=VALUE config overrides for main.py)
#   SAMPLE_STEPS=50             (DDIM steps of the txt2img grid)
#   BENCHMARK=1 BENCH_ARGS=""   (extra arguments for the benchmark, e.g. "--seeds 0 --n 4")
#   LOGDIR=logs/embedded-<date-time>
#   EARLY_FAILURE_SECONDS=120   a training that fails sooner is run once more with NUM_WORKERS=0
#                               (the loader workers are what a new machine most likely refuses)
#
# Tested on a CPU with a tiny run (tests/test_gpu_train_script.py does the same):
#   OUT=/tmp/out LOGDIR=/tmp/logs MAX_STEPS=2 BATCH=4 NUM_WORKERS=0 ACCELERATOR=cpu PRECISION=32 \
#     BENCH_ARGS="--n 2 --steps 2 --seeds 0 --settings none all:all" bash scripts/gpu_train_embedded.sh
# ran by hand on this project's 2-core CPU (shared with other jobs): exit 0, all 8 files.
set -euo pipefail

: "${OUT:?set OUT to the output folder}"
MAX_STEPS=${MAX_STEPS:-3000}
BATCH=${BATCH:-256}
NUM_WORKERS=${NUM_WORKERS:-8}
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
MAX_TIME=${MAX_TIME:-00:00:07:30}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
BENCHMARK=${BENCHMARK:-1}
BENCH_ARGS=${BENCH_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
LOGDIR=${LOGDIR:-logs/embedded-$(date +%Y%m%d-%H%M%S)}  # new per call: a warm machine keeps the last one's
EARLY_FAILURE_SECONDS=${EARLY_FAILURE_SECONDS:-120}
CONFIG=configs/embedded/procedural-t2i.yaml
NAME=procedural-t2i

source scripts/gpu_env.sh   # offline, this checkout on PYTHONPATH, carried wheels installed

mkdir -p "$OUT"
for f in "$NAME.safetensors" "$NAME.json" metrics.csv train-tail.log samples.png; do
  if [ -e "$OUT/$f" ]; then echo "error: $OUT/$f exists; use an empty OUT (outputs are never overwritten)" >&2; exit 2; fi
done
if [ -e "$LOGDIR" ] && [ -n "$(ls -A "$LOGDIR")" ]; then
  echo "error: $LOGDIR is not empty; set LOGDIR to a new folder" >&2; exit 2
fi
mkdir -p "$LOGDIR"

log() { echo "[gpu_train_embedded $(date +%H:%M:%S)] $*"; }
start=$(date +%s)

# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
train() {  # train WORKERS MAX_TIME: main.py's exit status; its log is appended to $LOGDIR/train.log
  log "training: $MAX_STEPS steps at batch $BATCH on $ACCELERATOR ($PRECISION), $1 loader workers, at most $2"
  set +e
  # max_time bounds the fit loop only: a hang outside it (a stuck loader) must not take the whole call;
  # timeout's SIGTERM lets main.py save last.ckpt at the end of a step still running, SIGKILL follows in 30 s
  timeout -k 30 "$(( $(seconds_of "$2") + 120 ))" \
  python3 main.py --base "$CONFIG" -t --no-test --accelerator "$ACCELERATOR" --devices 1 \
    --precision "$PRECISION" --max_steps "$MAX_STEPS" --logdir "$LOGDIR" \
    data.params.batch_size="$BATCH" data.params.num_workers="$1" \
    model.params.scheduler_config.params.cycle_lengths="[$MAX_STEPS]" \
    lightning.trainer.max_time="$2" $TRAIN_ARGS 2>&1 | tee -a "$LOGDIR/train.log" \
    | grep --line-buffered -E "Trainer.fit|Setting learning rate|Average|Error|error"
  local status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

seconds_of() { local d h m s; IFS=: read -r d h m s <<< "$1"; echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s )); }
status=0
train "$NUM_WORKERS" "$MAX_TIME" || status=$?
elapsed=$(( $(date +%s) - start ))
if [ "$status" != 0 ] && [ "$NUM_WORKERS" != 0 ] && [ "$elapsed" -lt "$EARLY_FAILURE_SECONDS" ]; then
  # A failure before the first steps is most likely the loader workers (shared memory, process
  # limits of a new machine); the data renders in the main process too, only slower. One retry,
  # in the time left, so that a lease still brings a model back.
  left=$(( $(seconds_of "$MAX_TIME") - elapsed ))
  log "training failed after ${elapsed} s (exit $status): once more without loader workers, at most ${left} s"
  status=0
  train 0 "$(printf '00:%02d:%02d:%02d' $((left / 3600)) $((left % 3600 / 60)) $((left % 60)))" || status=$?
fi
tail -n 300 "$LOGDIR/train.log" > "$OUT/train-tail.log"
run_dir=$(ls -d "$LOGDIR"/*_"$NAME" 2>/dev/null | tail -n 1 || true)
ckpt="$run_dir/checkpoints/last.ckpt"
if [ "$status" != 0 ]; then
  echo "error: training failed (exit $status); see $OUT/train-tail.log" >&2
  # main.py saves last.ckpt when a failure comes after a trained step: a lease keeps those weights
  # (the json's global_step says how far they got); the exit status stays 1
  [ -n "$run_dir" ] && [ -f "$ckpt" ] || exit 1
  log "exporting what the failed training saved: $ckpt"
elif [ ! -f "$ckpt" ]; then
  echo "error: training wrote no $ckpt; see $OUT/train-tail.log" >&2; exit 1
fi
log "trained in $(( $(date +%s) - start )) s"

metrics=()
if cp "$run_dir"/csv/version_0/metrics.csv "$OUT/metrics.csv"; then metrics=(--metrics "$OUT/metrics.csv"); fi
python3 scripts/export_checkpoint.py "$ckpt" "$OUT/$NAME.safetensors" "${metrics[@]}"

log "sample grid with txt2img"
python3 scripts/txt2img.py --config "$CONFIG" --ckpt "$OUT/$NAME.safetensors" \
  --prompt "a red chair with four legs" --n_samples 8 --n_iter 1 --ddim_steps "$SAMPLE_STEPS" --scale 5.0 \
  --skip_save --precision full --outdir "$LOGDIR/txt2img" --seed 0
cp "$LOGDIR"/txt2img/grid-0000.png "$OUT/samples.png"

if [ "$BENCHMARK" = "1" ]; then
  log "consistency benchmark"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  python3 scripts/consistency_benchmark.py --config "$CONFIG" --ckpt "$OUT/$NAME.safetensors" \
    --outdir "$OUT/benchmark" $BENCH_ARGS
fi
log "done in $(( $(date +%s) - start )) s; outputs in $OUT"
[ "$status" = 0 ] || exit 1
