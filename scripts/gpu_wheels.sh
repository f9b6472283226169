#!/usr/bin/env bash
# On the development machine, before a GPU session: download the pure-Python packages the device
# image lacks (scripts/gpu_env.sh lists what it checks) into .whl/ (git-ignored). Every `run` call
# then names it in carry (carry: [".whl"]) and scripts/gpu_env.sh installs it there.
#
#   bash scripts/gpu_wheels.sh
#
# The device's python3 is 3.12; these wheels are py3-none-any. omegaconf 2.4 needs only PyYAML,
# which the image has.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl omegaconf==2.4.0
ls -l .whl
