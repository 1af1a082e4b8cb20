#!/usr/bin/env bash
# Run the gpu-marked tests and the GPU benchmarks on any CUDA machine where offload_runtime imports,
# writing their results as JSON into OUTDIR.
#   usage: bash bench/gpu_suite.sh OUTDIR [extra pytest args]
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUTDIR [pytest args]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
python3 - <<'PY' > "$out/environment.json"
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import nvidia.nvcomp as nvcomp
    info["nvcomp"] = getattr(nvcomp, "__version__", "present")
except Exception as exc:  # report, do not fail: the tests say what is skipped and why
    info["nvcomp"] = f"missing: {exc}"
print(json.dumps(info, indent=2))
PY
cat "$out/environment.json"
status=0
python3 -m pytest tests -m "gpu or cuda" -p no:cacheprovider --junitxml="$out/gpu_tests.xml" "$@" || status=$?
python3 -m pytest bench -m gpu -p no:cacheprovider --runslow --benchmark-json="$out/gpu_bench.json" "$@" || {
  rc=$?; [ "$rc" = 5 ] || status=$rc; }  # 5: no GPU benchmark collected yet
# end-to-end: resident vs the peers (accelerate, diffusers, AirLLM: bench/peers.py) vs offload_runtime on the
# Llama-shaped 2 B config, every row
python3 bench/gpu_e2e.py "$out/e2e.json" || status=$?
# the 7 B shape (32 layers): the rows that show the limits (one device command of 10 min holds these)
python3 bench/gpu_e2e.py "$out/e2e-32.json" --layers 32 --tokens 8 \
  --scenarios "streamed from pinned RAM,all compressed in VRAM,accelerate cpu_offload,accelerate disk_offload" \
  || status=$?
exit $status
