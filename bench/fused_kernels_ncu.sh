#!/usr/bin/env bash
# Nsight Compute profile of the fused12 batch-1 kernel (and cuBLAS's kernel for the same shape) on one
# Llama-70B shape, written under OUT_DIR:
#   fused12_<shape>.ncu-rep   the full report (open with ncu-ui, or `ncu --import ... --page details`)
#   fused12_<shape>.txt       its details page as text: throughput, achieved bandwidth, instructions,
#                             warp stall reasons, source counters
# Uses the winning config of OUT_DIR/fused12_table.json when bench/fused_kernels.py wrote one there.
#
# usage: bash bench/fused_kernels_ncu.sh OUT_DIR [NxK (default 28672x8192, gate/up_proj)]
set -euo pipefail
out=${1:?usage: fused_kernels_ncu.sh OUT_DIR [NxK]}
shape=${2:-28672x8192}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
report="$out/fused12_${shape}"
# -k: the fused GEMV and whatever cuBLAS runs for bf16 x [1, K] @ W^T (gemv / gemm kernel names vary)
ncu --clock-control none --set full -k 'regex:_gemv_kernel|gemv|gemm|cutlass|sm90' -c 6 -f -o "$report" \
    python "$here/fused_kernels.py" "$out/fused_kernels.json" --profile "$shape"
ncu --import "$report.ncu-rep" --page details > "$report.txt"
echo "wrote $report.ncu-rep and $report.txt"
