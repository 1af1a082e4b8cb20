"""The ``offload-runtime`` command line.

Each subcommand lives in its own module and registers itself through :data:`SUBCOMMANDS`
(``name -> "module:function"``); the module is imported only when its subcommand runs, so
``offload-runtime --help`` stays fast and works without the heavy dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from offload_runtime._version import __version__
from offload_runtime.errors import OffloadError

# name -> (help, "module:register_function"); register(parser) adds arguments and sets `func`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pack": ("Pack a model into a compressed container.", "offload_runtime.cli_pack:register_pack"),
    "inspect": ("Describe a container: groups, codecs, sizes.", "offload_runtime.cli_pack:register_inspect"),
    "generate": ("Generate text from a container, streaming tokens.", "offload_runtime.cli_run:add_generate"),
    "bench": (
        "Measure tok/s and show the plan for one or more budgets.",
        "offload_runtime.cli_run:add_bench",
    ),
    "demo": (
        "Chat with SmolLM2-135M, unoffloaded and streamed, side by side.",
        "offload_runtime.cli_run:add_demo",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload-runtime",
        description="Run LLMs larger than GPU memory by streaming compressed layers.",
    )
    parser.add_argument("--version", action="version", version=f"offload-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, target) in SUBCOMMANDS.items():
        module_name, func_name = target.split(":")
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module_name), func_name)(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except OffloadError as exc:
        print(f"offload-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"offload-runtime {args.command}: error: no such file: {exc.filename}", file=sys.stderr)
        return 2
