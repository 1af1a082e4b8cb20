#!/usr/bin/env bash
# Set up offload_runtime on a CUDA machine without a package registry, from carried wheels:
#   WHEELS: nvCOMP (nvidia-nvcomp-cu13, nvidia-libnvcomp-cu13), zstandard, setuptools.
# usage: source bench/device_setup.sh WHEELDIR [WHEELDIR ...]
# Installs the wheels into /tmp/site and this checkout in editable mode (the editable finder is what maps
# offload_runtime.native to ./native while pytest puts the repository root on sys.path).
wheels=()
for dir in "$@"; do wheels+=("$dir"/*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" || return 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
python3 -c "import offload_runtime.native as n, offload_runtime.scheduler; print('offload_runtime OK', n.available_codecs())"
