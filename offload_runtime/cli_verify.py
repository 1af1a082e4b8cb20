"""``offload-runtime verify``: read every chunk of a container and check its CRC-32s."""

from __future__ import annotations

import argparse
import sys

from offload_runtime import validate_args as check
from offload_runtime.cli_args import add_checkpoint

VERIFY_EPILOG = (
    "Exit status: 0 when every chunk read back as written, 1 when damage was found (each damaged group "
    "and chunk is named), 2 when CHECKPOINT is not a readable container."
)


def register_verify(parser: argparse.ArgumentParser) -> None:
    parser.epilog = VERIFY_EPILOG
    add_checkpoint(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    path = check.container_file(args.checkpoint, "CHECKPOINT")
    from offload_runtime.display import format_bytes
    from offload_runtime.loaders.verify_container import verify_container

    report = verify_container(path, progress=not args.no_progress)
    chunks = sum(g.chunks for g in report.groups)
    read = format_bytes(report.stored_bytes)
    print(f"verified {report.path}: {len(report.groups)} groups, {chunks} chunks, {read} read")
    for where in ("cpu", "cuda"):
        decoded = [g for g in report.groups if g.decoded_on == where]
        if decoded:
            print(
                f"  decoded on the {where.upper()} and checked: {len(decoded)} groups "
                f"({sum(g.chunks for g in decoded)} chunks: compressed and decoded CRC-32s)"
            )
    for g in report.not_decoded:
        print(f"  not decoded: {g.name} (compressed CRC-32s checked; {g.not_decoded_reason})")
    for g in report.damaged:
        print(f"  DAMAGED: {g.error}")
    if report.ok:
        print("  no damage found")
        return 0
    first = report.damaged[0].error
    where = f"group {first.group!r}" + (f" chunk {first.chunk}" if first.chunk is not None else "")
    print(
        f"offload-runtime verify: error: {len(report.damaged)} of {len(report.groups)} groups damaged "
        f"(first: {where}: {first.summary}). Re-pack the container from its source",
        file=sys.stderr,
    )
    return 1
