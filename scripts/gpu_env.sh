# Sourced by scripts/gpu_*.sh, from the repository root: what every command on the GPU machine needs.
#
# The device image (.library/device/KINDS.md, package list read 2026-11-17) holds torch,
# pytorch-lightning, transformers, tokenizers, einops and safetensors, but not omegaconf, and nothing can be
# installed from a registry there. scripts/gpu_wheels.sh downloads the missing wheels into .whl/
# on the development machine; the device tool carries that folder (carry: [".whl"]) and they are
# installed below into a private folder, only if something is missing.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's ldm, not an installed one
REQUIRED_MODULES=${REQUIRED_MODULES:-torch omegaconf einops safetensors tokenizers transformers pytorch_lightning}
WHEELS=${WHEELS:-.whl}

missing_modules() {
  python3 -c 'import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
    $REQUIRED_MODULES
}
missing=$(missing_modules) || { echo "error: python3 could not check its modules (see above)" >&2; exit 2; }
if [ -n "$missing" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/ldm-gpu-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl || { echo "error: pip could not install the wheels in $WHEELS (one version of each?)" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
  missing=$(missing_modules) || { echo "error: python3 could not check its modules (see above)" >&2; exit 2; }
fi
if [ -n "$missing" ]; then
  echo "error: python3 here lacks $missing; run 'bash scripts/gpu_wheels.sh' on the development machine and carry $WHEELS (docs/gpu-session.md)" >&2
  exit 2
fi
