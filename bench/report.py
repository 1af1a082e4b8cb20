"""Turn a committed end-to-end result (bench/results/*-e2e.json) into the README's table and a PNG plot.

Usage: python bench/report.py bench/results/<date>-<device>-e2e.json [--png bench/results/<...>.png]

The table is printed as Markdown; the plot shows tok/s against the budget for each method, with the PCIe
limit (compressed bytes per token / measured pinned H2D GB/s) of each codec drawn as a horizontal line.
Results that record peak VRAM and RSS per row get two more columns; lossy rows (``int8``) show their
teacher-forced top-1 agreement with the resident model instead of "identical". Peer rows (accelerate,
diffusers' group offloading, AirLLM) show where they keep the weights and, where a run measured it, the
share of the PCIe limit they reach; a peer whose library was not installed shows why it was skipped, and
the plot draws each peer as a horizontal line. Needs matplotlib only for the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30
# for rows written before rows recorded their "placement"; others: CPU RAM
PLACEMENT = {"resident": "GPU-resident", "accelerate disk_offload": "disk (memory-mapped)"}


def _identical(r: dict) -> str:
    if r.get("lossless", True):
        return "yes" if r.get("identical") else "NO"
    return f"lossy, top-1 {100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "lossy"


def table(results: dict) -> str:
    h2d = results.get("h2d_pinned_GBps")
    # columns added with the per-row memory keys: older results keep their table exactly
    memory = any("rss_after_bytes" in r for r in results["rows"])
    extra_head, extra_rule = (" peak VRAM GiB | peak RSS GiB |", "---:|---:|") if memory else ("", "")
    lines = [
        f"{results['device']}, {results['config']}, {results['weight_bytes'] / 1e9:.2f} GB of bf16 weights; "
        + (  # a dry run on the CPU measures no H2D
            f"pinned H2D {h2d:.1f} GB/s, pageable {results.get('h2d_pageable_GBps', 0):.1f} GB/s "
            "(measured in the run)."
            if h2d
            else "H2D not measured."
        ),
        "",
        "| method | placement | budget GiB | tok/s | prefill 512 tok/s | streamed GB/token "
        "| % of PCIe limit | peak weight GiB | identical |" + extra_head,
        "|---|---|---:|---:|---:|---:|---:|---:|:---:|" + extra_rule,
    ]
    for r in results["rows"]:
        if "tok_s" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '?')}"
            lines.append(
                f"| {r['method']} | {r.get('scenario', r.get('placement', ''))} | | {why} | | | | | |"
                + (" | |" if memory else "")
            )
            continue
        streamed = r.get("h2d_bytes_per_token")
        limit = r.get("fraction_of_h2d")
        cells = ""
        if memory:
            vram, rss = r.get("peak_vram_total_bytes"), r.get("peak_rss_bytes", r.get("rss_after_bytes"))
            cells = " {} | {} |".format(*(f"{b / GIB:.2f}" if b else "" for b in (vram, rss)))
        lines.append(
            "| {m} | {s} | {b} | {t:.2f} | {p} | {g} | {l} | {w} | {i} |".format(
                m=r["method"],
                s=r.get("scenario", r.get("placement", PLACEMENT.get(r["method"], "CPU RAM"))),
                b=f"{r['budget_gb']:.2f}" if "budget_gb" in r else "",
                t=r["tok_s"],
                p=f"{r['prefill_512_tok_s']:.0f}" if "prefill_512_tok_s" in r else "",
                g=f"{streamed / 1e9:.2f}" if streamed else "0",
                l=f"{100 * limit:.0f}%" if limit else "",
                w=f"{r['peak_weight_bytes'] / GIB:.2f}" if r.get("peak_weight_bytes") else "",
                i=_identical(r),
            )
            + cells
        )
    peer = results.get("fastest_peer")
    if peer:
        lines += ["", f"Fastest peer in this run: {peer['method']}, {peer['tok_s']:.2f} tok/s."]
    gates = results.get("gates", {})
    if gates:
        lines += [
            "",
            "Gates (same run): " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in gates.items()),
        ]
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    h2d = results["h2d_pinned_GBps"]
    colors = {"raw": "tab:blue", "ans": "tab:green", "int8": "tab:purple"}
    for codec, color in colors.items():
        rows = sorted(
            (
                r
                for r in results["rows"]
                if r["method"] == f"offload_runtime {codec}" and "tok_s" in r and "disk" not in r["scenario"]
            ),
            key=lambda r: r["budget_gb"],
        )
        if rows:
            ax.plot(
                [r["budget_gb"] for r in rows],
                [r["tok_s"] for r in rows],
                "o-",
                color=color,
                label=f"offload_runtime {codec} (pinned RAM / VRAM)",
            )
        disk = [
            r
            for r in results["rows"]
            if r["method"] == f"offload_runtime {codec}"
            and r.get("scenario") == "streamed from disk"
            and "tok_s" in r
        ]
        for r in disk:
            ax.plot(
                [r["budget_gb"]],
                [r["tok_s"]],
                "x",
                color=color,
                markersize=9,
                label=f"offload_runtime {codec} (from disk)",
            )
        stored = results.get(f"stored_bytes_{codec}")
        if stored:
            ax.axhline(
                h2d * 1e9 / stored,
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"PCIe limit, {codec} fully streamed ({h2d * 1e9 / stored:.1f} tok/s)",
            )
    resident = [r["tok_s"] for r in results["rows"] if r["method"] == "resident" and "tok_s" in r]
    if resident:  # measured first and, in newer results, again last: the faster one
        ax.axhline(
            max(resident), color="black", linewidth=1, label=f"GPU-resident ({max(resident):.0f} tok/s)"
        )
    # peers: rows marked "peer", or (older results) accelerate's
    peers = [
        r for r in results["rows"] if (r.get("peer") or r["method"].startswith("accelerate")) and "tok_s" in r
    ]
    peer_colors = ["tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    for i, r in enumerate(peers):
        color = peer_colors[i % len(peer_colors)]
        ax.axhline(r["tok_s"], color=color, linewidth=1, label=f"{r['method']} ({r['tok_s']:.2f} tok/s)")
    ax.set_yscale("log")
    ax.set_xlabel("VRAM budget for weights (GiB)")
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title(f"{results['config']} on {results['device']}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--png")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    print(table(results))
    if args.png:
        plot(results, Path(args.png))


if __name__ == "__main__":
    main()
