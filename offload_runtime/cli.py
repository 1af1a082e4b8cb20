"""The ``offload-runtime`` command line.

Each subcommand lives in its own module and registers itself through :data:`SUBCOMMANDS`
(``name -> "module:function"``). The registering modules import neither torch nor transformers (a test
checks it), and a subcommand's heavy imports happen only when it runs, so ``offload-runtime --help`` and
``offload-runtime SUB --help`` answer at once.

Every bad input ends the command with one line on stderr, ``offload-runtime SUB: error: <what>. <fix>``,
and exit status 2: argparse's own errors (a missing argument, a value that is not a number), the checks
each subcommand runs on its arguments before loading anything (``offload_runtime.validate_args``), and
every typed error raised later (``offload_runtime.errors``), re-worded where the API's hint names a
Python argument. A failure that is none of these (a bug) is one line too, with exit status 1; set
``OFFLOAD_RUNTIME_DEBUG=1`` to get its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from offload_runtime._version import __version__

# name -> (help, "module:register_function"); register(parser) adds arguments and sets `func`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pack": (
        "Pack a model (HF folder, .safetensors or .gguf) into a compressed container.",
        "offload_runtime.cli_pack:register_pack",
    ),
    "inspect": (
        "Describe a container from its index: groups, codecs, sizes (payloads are not read).",
        "offload_runtime.cli_pack:register_inspect",
    ),
    "verify": (
        "Read every chunk of a container and check its CRC-32s.",
        "offload_runtime.cli_verify:register_verify",
    ),
    "generate": ("Generate text from a container, streaming tokens.", "offload_runtime.cli_run:add_generate"),
    "bench": (
        "Measure tok/s and show the plan for one or more budgets.",
        "offload_runtime.cli_bench:add_bench",
    ),
    "demo": (
        "Chat with SmolLM2-135M, unoffloaded and streamed, side by side.",
        "offload_runtime.cli_run:add_demo",
    ),
}
DEBUG_ENV = "OFFLOAD_RUNTIME_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and the way to the help."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="offload-runtime",
        description="Run LLMs larger than GPU memory by streaming compressed layers.",
        epilog="Exit status: 0 on success, 2 for a bad input (one `error:` line on stderr), 1 otherwise.",
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
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would blame the top-level parser: name the subcommand they were given to
        prog = " ".join(filter(None, ["offload-runtime", getattr(args, "command", None)]))
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)}; see `{prog} --help`\n")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"offload-runtime {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        message, status = describe_error(exc, args)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status


def describe_error(exc: Exception, args: argparse.Namespace) -> tuple[str, int]:
    """``(one line, exit status)`` for an exception that ended a subcommand."""
    from offload_runtime.errors import BudgetError, OffloadError

    if isinstance(exc, BudgetError) and hasattr(args, "budget_gb"):
        exc = _cli_budget_error(exc, args)
    if isinstance(exc, OffloadError):
        text, status = _cli_words(str(exc), args), 2
    elif isinstance(exc, OSError) and exc.filename is not None:
        what = "no such file" if isinstance(exc, FileNotFoundError) else exc.strerror or type(exc).__name__
        text, status = f"{what}: {exc.filename}", 2
    elif isinstance(exc, ImportError):
        text = str(exc) if "install" in str(exc).lower() else f"{exc}. Install the missing package"
        status = 2
    elif isinstance(exc, (OSError, MemoryError)):
        text, status = f"{type(exc).__name__}: {exc}", 1
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (a bug: please report it; {DEBUG_ENV}=1 shows where)"
        status = 1
    # one line: a CheckpointMismatchError's list ("\n  - item") joined with "; "
    return "; ".join(re.sub(r"^\s*- ", "", line) for line in text.splitlines() if line.strip()), status


def _cli_words(text: str, args: argparse.Namespace) -> str:
    """The API's ``name='value'`` in an error's text as this command's ``--name value``, for the options the
    command has (``expert_cache='decoded'`` -> ``--expert-cache decoded``)."""

    def option(match: re.Match) -> str:
        name, value = match.groups()
        return f"--{name.replace('_', '-')} {value}" if hasattr(args, name) else match.group(0)

    return re.sub(r"\b([a-z][a-z_]*)='([^']*)'", option, text)


def _cli_budget_error(exc, args: argparse.Namespace):
    """The planner's BudgetError with a hint naming this command's options, not the API's arguments."""
    from offload_runtime.scheduler.planner import budget_gb_for

    hint = f"raise --budget-gb to at least {budget_gb_for(exc.expected)}"
    if exc.hint and "prefetch" in exc.hint and hasattr(args, "prefetch"):
        hint += f", or lower --prefetch (now {args.prefetch})"
    return type(exc)(exc.summary, group=exc.group, expected=exc.expected, actual=exc.actual, hint=hint)
