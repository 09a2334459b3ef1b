#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu.sh installs on a GPU machine without internet.
#
#   bash benchmarks/fetch_wheels.sh [DIR]          # default DIR: benchmarks/wheels (git-ignored)
#
# The project's GPU machine (Python 3.12, torch 2.11, transformers, accelerate, peft, attrs, pluggy,
# matplotlib, pillow, requests, ...) lacks diffusers, gin-config and importlib-metadata (a need of
# diffusers); all three are pure-Python wheels (about 6.5 MB), so one download serves any Python.
# Pinned to the versions the project is tested with here. Carry DIR to the GPU machine.
set -euo pipefail
DIR="${1:-$(dirname "$0")/wheels}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
    diffusers==0.42.1 gin-config==0.5.0 importlib-metadata==8.7.0
ls -l "$DIR"
