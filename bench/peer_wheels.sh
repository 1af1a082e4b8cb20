#!/usr/bin/env bash
# Download the peer libraries of bench/gpu_e2e.py's peer rows (bench/peers.py) as wheels for the offline GPU
# machine (x86-64 Linux, Python 3.12) into DIR; `source bench/device_setup.sh DIR` installs them there.
#   usage: bash bench/peer_wheels.sh DIR
# Both are pure Python (py3-none-any). Everything they import is already on the GPU machine (its package
# list: torch, transformers 5.17, accelerate, safetensors, huggingface-hub 1.33, numpy, pillow, requests,
# regex, filelock, packaging, tqdm, psutil, sentencepiece), so their dependencies are not downloaded:
# diffusers' importlib_metadata is only for Python < 3.8, and AirLLM lists scipy but never imports it.
# diffusers 0.42 needs huggingface-hub >= 1.32 at import (0.39 is the last for older hubs).
set -euo pipefail
dir=${1:?usage: bench/peer_wheels.sh DIR}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$dir" diffusers==0.42.1 airllm==4.0.0
ls -la "$dir"/diffusers-*.whl "$dir"/airllm-*.whl
