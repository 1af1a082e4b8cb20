#!/usr/bin/env bash
# Nsight Compute profile of the fused12 kernel the table picks (and cuBLAS's kernel for the same shape) on
# one Llama shape, at batch 1 or NxK@M rows, written under OUT_DIR:
#   fused12_<shape>.txt       the details page as text: throughput, achieved bandwidth, instructions,
#                             warp stall reasons, source counters
# The full report goes to REPORT_DIR (default /tmp): device calls bring back a limited number of files.
# Uses the winning config of OUT_DIR/fused12_table.json when bench/fused_kernels.py wrote one there, else
# the packaged table.
#
# usage: bash bench/fused_kernels_ncu.sh OUT_DIR [NxK[@M] (default 28672x8192, gate/up_proj)]
set -euo pipefail
out=${1:?usage: fused_kernels_ncu.sh OUT_DIR [NxK]}
shape=${2:-28672x8192}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
name=${shape//@/_}  # device calls bring back plain names only
report="${REPORT_DIR:-/tmp}/fused12_${name}"
# -k: the fused GEMV and whatever cuBLAS runs for bf16 x [1, K] @ W^T (gemv / gemm kernel names vary)
ncu --clock-control none --set full -k 'regex:_gemv_kernel|_wdot_kernel|_dot_kernel|gemv|gemm|cutlass|sm90' \
    -c 6 -f -o "$report" \
    python "$here/fused_kernels.py" "$out/fused_kernels.json" --profile "$shape"
ncu --import "$report.ncu-rep" --page details > "$out/fused12_${name}.txt"
echo "wrote $out/fused12_${name}.txt (full report: $report.ncu-rep)"
