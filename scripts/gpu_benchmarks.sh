#!/usr/bin/env bash
# The benchmark issue's GPU tables in ONE command (scripts/benchmark_attention.py, full SD v1
# UNet / full txt2img model with random weights, 512²):
#
#   OUT=/path/to/out bash scripts/gpu_benchmarks.sh        # from the repository root
#
# Stages, in order of importance (a failed or timed-out stage is logged and the next one runs):
#   table       fp16, N in {1,2,4,8,16,32}, every setting: ms/call, ms/image, x sdpa, peak GiB, TFLOP/s
#   e2e         fp16, N=8: images/s of 50 DDIM steps with CFG + text encoder + VAE decoder,
#               plain and with the default --consistent-attn
#   bf16        bf16, N=8, every setting
#   chlast      fp16 + channels_last, N=8: vanilla sdpa, the default sharing (anchor), mode all
#   graphs      fp16 + CUDA graphs, N=1 and 8: vanilla sdpa and the default sharing
#   compile     fp16 + torch.compile, N=8: vanilla sdpa and the default sharing (compile time logged)
# Estimated time on one H100 (an estimate, not a measurement): table ~2 min, e2e ~40 s, bf16 ~30 s,
# chlast ~20 s, graphs ~30 s, compile ~3 min: ~7 min. Every stage has a time limit (STAGE_LIMITS).
#
# Writes 3 files to $OUT (never overwrites them):
#   benchmarks.md    every stage's table (markdown, with device, torch version and date)
#   results.csv      every row of every stage (kind, variant, setting, N, ms, TFLOP/s, images/s, ...)
#   benchmarks.log   nvidia-smi, versions, per-stage timing, the scripts' logs and any error
#
# Environment overrides (tests/test_gpu_benchmarks_script.py runs it on a CPU at tiny size):
#   DEVICE=cuda CONFIG=configs/stable-diffusion/v1-inference.yaml SIZE=512 NS="1 2 4 8 16 32"
#   N_VARIANT=8 DTYPE=fp16 (the table's dtype) REPEATS=5 E2E_REPEATS=2 E2E_STEPS=50
#   STAGES="table e2e bf16 chlast graphs compile"
#   TABLE_SETTINGS=""   (';'-separated setting names for the table and bf16 stages; empty = all)
#   STAGE_LIMITS=""   (seconds per stage, e.g. "table=300 e2e=60"; the others keep their defaults:
#                      table=240 e2e=120 bf16=90 chlast=60 graphs=90 compile=240)
#   DEADLINE=""       (seconds after this script's start by which every stage has ended: each
#                      stage's limit is cut to what is left, one with under 20 s left is skipped;
#                      scripts/gpu_session.sh sets it from its own budget)
set -uo pipefail

: "${OUT:?set OUT to the output folder}"
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/stable-diffusion/v1-inference.yaml}
SIZE=${SIZE:-512}
NS=${NS:-1 2 4 8 16 32}
N_VARIANT=${N_VARIANT:-8}
DTYPE=${DTYPE:-fp16}
REPEATS=${REPEATS:-5}
E2E_REPEATS=${E2E_REPEATS:-2}
E2E_STEPS=${E2E_STEPS:-50}
STAGES=${STAGES:-table e2e bf16 chlast graphs compile}
TABLE_SETTINGS=${TABLE_SETTINGS:-}
STAGE_LIMITS=${STAGE_LIMITS:-}
DEFAULT_STAGE_LIMITS="table=240 e2e=120 bf16=90 chlast=60 graphs=90 compile=240"
DEADLINE=${DEADLINE:-}

source scripts/gpu_env.sh   # offline, this checkout on PYTHONPATH, carried wheels installed

if [ "$DEVICE" = cuda ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # every stage would fail with the reason in benchmarks.log alone
  echo "error: DEVICE=cuda (the default) and CUDA is not available here; run it on a GPU machine" \
       "(docs/gpu-session.md), or on the CPU at a tiny size as tests/test_gpu_benchmarks_script.py does" >&2
  exit 2
fi

MD="$OUT/benchmarks.md" CSV="$OUT/results.csv" LOG="$OUT/benchmarks.log"
mkdir -p "$OUT"
for f in "$MD" "$CSV" "$LOG"; do
  if [ -e "$f" ]; then echo "error: $f exists; use an empty OUT (outputs are never overwritten)" >&2; exit 2; fi
done
for stage in $STAGES; do
  case $stage in table|e2e|bf16|chlast|graphs|compile) ;;
    *) echo "error: unknown stage '$stage' in STAGES; choose from: table e2e bf16 chlast graphs compile" >&2; exit 2;;
  esac
done

log() { echo "[gpu_benchmarks $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
limit_of() {  # a stage's time limit: its STAGE_LIMITS entry, else its default, cut to DEADLINE
  local entry limit=
  for entry in $STAGE_LIMITS $DEFAULT_STAGE_LIMITS; do
    [ "${entry%%=*}" = "$1" ] && { limit=${entry#*=}; break; }
  done
  if [ -n "$DEADLINE" ] && [ $((DEADLINE - SECONDS)) -lt "$limit" ]; then limit=$((DEADLINE - SECONDS)); fi
  echo "$limit"
}

{
  echo "# environment"
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git log -1 --format="commit %H %s" 2>/dev/null || true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} >> "$LOG" 2>&1
echo "# Attention benchmarks ($(date -u +%Y-%m-%d), scripts/gpu_benchmarks.sh)" > "$MD"

failed=()
run_stage() {  # run_stage NAME TITLE ARGS...: one benchmark_attention.py call, table into $MD
  local name=$1 title=$2; shift 2
  local limit; limit=$(limit_of "$name")
  if [ -n "$DEADLINE" ] && [ $((DEADLINE - SECONDS)) -lt 20 ]; then
    log "stage $name skipped: $((DEADLINE - SECONDS)) s left before the DEADLINE"; failed+=("$name"); return
  fi
  log "stage $name: $title (limit ${limit} s)"
  printf '\n## %s\n\n' "$title" >> "$MD"
  local start=$SECONDS status
  timeout "$limit" python3 scripts/benchmark_attention.py --config "$CONFIG" --size "$SIZE" --device "$DEVICE" \
    --csv "$CSV" "$@" >> "$MD" 2>> "$LOG"
  status=$?
  if [ $status = 0 ]; then
    log "stage $name done in $((SECONDS - start)) s"
  else
    [ $status = 124 ] && why="timed out after ${limit} s" || why="failed (exit $status)"
    log "stage $name $why; see the lines above in this log"
    printf '\n(stage %s %s: the rows above are what it finished)\n' "$name" "$why" >> "$MD"
    failed+=("$name")
  fi
}

DEFAULT="anchor: middle+inner"  # --consistent-attn's default (benchmark_attention.py DEFAULT_SHARING)
table_settings=()
if [ -n "$TABLE_SETTINGS" ]; then IFS=';' read -ra names <<< "$TABLE_SETTINGS"; table_settings=(--settings "${names[@]}"); fi
total_start=$SECONDS
for stage in $STAGES; do
  case $stage in
    table)
      # shellcheck disable=SC2086  # NS is a list
      run_stage table "UNet call, $DTYPE, every setting" --dtype "$DTYPE" --n $NS --repeats "$REPEATS" \
        "${table_settings[@]}" ;;
    e2e)
      run_stage e2e "End to end, $DTYPE, $E2E_STEPS DDIM steps" --dtype "$DTYPE" --end-to-end --n "$N_VARIANT" \
        --steps "$E2E_STEPS" --repeats "$E2E_REPEATS" ;;
    bf16)
      run_stage bf16 "UNet call, bf16, every setting" --dtype bf16 --n "$N_VARIANT" --repeats "$REPEATS" \
        "${table_settings[@]}" ;;
    chlast)
      run_stage chlast "UNet call, $DTYPE + channels_last" --dtype "$DTYPE" --channels-last --n "$N_VARIANT" \
        --repeats "$REPEATS" --settings "$DEFAULT" "all: middle+inner" ;;
    graphs)
      if [ "$DEVICE" = cuda ]; then
        run_stage graphs "UNet call, $DTYPE + CUDA graphs" --dtype "$DTYPE" --cuda-graphs --n 1 "$N_VARIANT" \
          --repeats "$REPEATS" --settings "$DEFAULT"
      else
        log "stage graphs skipped: CUDA graphs need DEVICE=cuda"
      fi ;;
    compile)
      run_stage compile "UNet call, $DTYPE + torch.compile" --dtype "$DTYPE" --compile --n "$N_VARIANT" \
        --repeats "$REPEATS" --settings "$DEFAULT" ;;
  esac
done

log "all stages in $((SECONDS - total_start)) s; outputs: $MD $([ -e "$CSV" ] && echo "$CSV ")$LOG"
if [ ${#failed[@]} -gt 0 ]; then
  log "failed or timed out: ${failed[*]}"
  exit 1
fi
