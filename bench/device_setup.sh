#!/usr/bin/env bash
# Set up offload_runtime on a CUDA machine without a package registry, from carried wheels:
#   WHEELS: nvCOMP (nvidia-nvcomp-cu13, nvidia-libnvcomp-cu13), zstandard, setuptools; and, when present,
#   the peer libraries of bench/gpu_e2e.py (diffusers, airllm: bench/peer_wheels.sh downloads them).
# usage: source bench/device_setup.sh WHEELDIR [WHEELDIR ...]
# Installs the wheels into /tmp/site and this checkout in editable mode (the editable finder is what maps
# offload_runtime.native to ./native while pytest puts the repository root on sys.path).
wheels=()
for dir in "$@"; do wheels+=("$dir"/*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}" || return 1
# AirLLM's wheel also installs its own test suite as a top-level package `tests`: not ours, removed
if [ -d /tmp/site/airllm ]; then rm -rf /tmp/site/tests; fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
python3 -c "import offload_runtime.native as n, offload_runtime.scheduler; print('offload_runtime OK', n.available_codecs())"
python3 - <<'PY'  # the peer rows run only where these import; a missing one gives a "skipped" row
import importlib.metadata as metadata
import warnings

warnings.simplefilter("ignore")  # airllm warns for each optional model family it cannot import
for name, module in (("diffusers", "diffusers.hooks.group_offloading"), ("airllm", "airllm")):
    try:
        __import__(module)
        print(f"peer {name} {metadata.version(name)} OK")
    except Exception as exc:
        print(f"peer {name} missing ({type(exc).__name__}: {exc}): its benchmark rows are skipped")
PY
