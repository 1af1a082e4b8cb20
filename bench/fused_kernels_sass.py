"""Compile the fused12 kernels for sm_90 (H100/H200) on any machine and count what their main loop issues.

No GPU needed: Triton compiles ahead of time for a target (``triton.compile`` with ``GPUTarget("cuda",
90, 32)``) and its wheel ships ``ptxas`` and ``cuobjdump``. For each config of ``bench/fused_kernels.py``
this records registers, stack and local memory (spills) per thread, shared memory per program, and the
main loop (the backward branch with the most 16-byte loads): its instructions, their mix, and the
instructions per weight it decodes (``BP x BW x 8`` weights per iteration shared by the program's threads).
Static counts, not speed: they say whether the decode fits the issue budget (~12 instructions per weight
at 4 TB/s on an H200, ``fused_kernels_NOTES.md``) and whether a config spills.

Usage::

    python bench/fused_kernels_sass.py OUT.json [--kernels gemv,wdot,dot,decode] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SM90 = ("cuda", 90, 32)
POINTERS = {
    "x_ptr": "*bf16", "x64_ptr": "*i64", "sm_ptr": "*i32", "codes_ptr": "*i32", "top_ptr": "*u8",
    "esc_ptr_ptr": "*i32", "esc_ptr": "*i32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
    "cnt_ptr": "*i32", "out_ptr": "*i16",
}  # fmt: skip
WIDE_LOAD = re.compile(r"\bLDG(STS)?\.E\S*\.128\b")  # 16-byte global loads (LDGSTS: cp.async into shared)
DIVISIBLE = ("N", "K", "pitch", "nwords", "words_per_split", "stride_xm", "stride_ym", "exp_xor")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int) -> bytes:
    """The cubin of ``fn`` for sm_90 with these constexprs; every pointer and size 16-byte divisible
    (what the real shapes get from Triton's specialization)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: POINTERS.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS or n in DIVISIBLE}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(
        source, target=GPUTarget(*SM90), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return kernel.asm["cubin"]


def analyse(cubin: bytes) -> dict:
    """Registers, stack, local memory and the main loop's instruction mix of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", fh.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    out = dict(zip(("registers", "stack", "static_shared", "local"), map(int, found.groups()), strict=True))
    code = [
        (int(m.group(1), 16), m.group(2))
        for m in (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines())
        if m
    ]
    index = {address: i for i, (address, _) in enumerate(code)}
    best = (0, code)  # a kernel without a loop: all of it
    for i, (address, text) in enumerate(code):
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            body = code[index[int(target.group(1), 16)] : i + 1]
            wide = sum(bool(WIDE_LOAD.search(t)) for _, t in body)
            if wide > best[0] or (wide == best[0] and best[0] and len(body) < len(best[1])):
                best = (wide, body)
    mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in best[1])
    out.update(loop_instructions=len(best[1]), loop_wide_loads=best[0], loop_mix=dict(mix.most_common(12)))
    out["mma"] = sorted({m for _, t in best[1] for m in re.findall(r"\b(HGMMA\.\S+|HMMA\.\S+)", t)})
    return out


def _bench_configs():
    spec = importlib.util.spec_from_file_location(
        "fused_kernels_bench", Path(__file__).with_name("fused_kernels.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def jobs(kernels: set[str], quick: bool) -> list[tuple[str, dict, int, int]]:
    """``(kernel, constexprs, num_warps, num_stages)`` per benchmark config (``quick``: the first ones)."""
    from offload_runtime.native.fused12_bits import escape_chunk
    from offload_runtime.native.fused12_dot_kernel import DOT_ESCAPE_CHUNK
    from offload_runtime.native.fused12_wdot_kernel import WDOT_ESCAPE_CHUNK

    bench = _bench_configs()
    out = []
    if "gemv" in kernels:
        for rows, configs in bench.GEMV_CONFIGS.items():
            for bp, bw, warps, stages in configs[:1] if quick else configs:
                constexprs = {"MB": rows, "BP": bp, "BW": bw, "SPLIT_K": True, "EVEN_K": True, "EVEN_N": True,
                              "EC": escape_chunk(rows, bp), "HAS_BIAS": False, "X_WORDS": True}  # fmt: skip
                out.append(("gemv", constexprs, warps, stages))
    if "dot" in kernels:
        for table in (bench.DOT_SMALL, bench.DOT_PREFILL):
            for bm, bp, bw, warps, stages in table[:1] if quick else table:
                constexprs = {"BM": bm, "BP": bp, "BW": bw, "SPLIT_K": bm <= 16, "EVEN_K": True,
                              "EVEN_N": True, "EC": DOT_ESCAPE_CHUNK, "HAS_BIAS": False}  # fmt: skip
                out.append(("dot", constexprs, warps, stages))
    if "wdot" in kernels:
        for bp, bw, warps, stages in bench.WDOT_CONFIGS[:1] if quick else bench.WDOT_CONFIGS:
            for prefetch in (False, True):
                constexprs = {"BP": bp, "BW": bw, "SPLIT_K": True, "EVEN_K": True, "EVEN_N": True,
                              "EC": WDOT_ESCAPE_CHUNK, "HAS_BIAS": False, "X_WORDS": True,
                              "PREFETCH": prefetch}  # fmt: skip
                out.append(("wdot", constexprs, warps, stages))
    if "decode" in kernels:
        out.append(("decode", {"BP": 16, "BW": 64}, 4, 1))
    return out


def run(kernels: set[str], quick: bool) -> list[dict]:
    from offload_runtime.native.fused12_decode_kernel import _decode_kernel
    from offload_runtime.native.fused12_dot_kernel import _dot_kernel
    from offload_runtime.native.fused12_gemv_kernel import _gemv_kernel
    from offload_runtime.native.fused12_wdot_kernel import _wdot_kernel

    functions = {"gemv": _gemv_kernel, "dot": _dot_kernel, "wdot": _wdot_kernel, "decode": _decode_kernel}
    rows = []
    for kernel, constexprs, warps, stages in jobs(kernels, quick):
        start = time.perf_counter()
        row = {"kernel": kernel, "constexprs": constexprs, "num_warps": warps, "num_stages": stages}
        try:
            row.update(analyse(compile_sm90(functions[kernel], constexprs, warps, stages)))
        except Exception as exc:  # a config that does not compile is a result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        else:  # weights decoded per loop iteration by the whole program (the decode kernel: per program)
            weights = constexprs["BP"] * constexprs["BW"] * 8
            row["instructions_per_weight"] = row["loop_instructions"] * warps * 32 / weights
        row["compile_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "loop_mix"}), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kernels", default="gemv,wdot,dot,decode")
    parser.add_argument("--quick", action="store_true", help="only the first config of each table")
    args = parser.parse_args(argv)
    import triton

    rows = run(set(args.kernels.split(",")), args.quick)
    what = "fused12 kernels compiled for sm_90 (bench/fused_kernels_sass.py)"
    report = {"what": what, "triton": triton.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
