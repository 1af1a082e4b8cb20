"""Options that several subcommands share, with their help text, and the checks run on them first.

Options are parsed with plain ``float``/``int`` types (argparse refuses what is not a number), then
:func:`check_run_args` checks their kind with ``offload_runtime.validate_args`` under their command-line
names, before the subcommand loads anything. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse

from offload_runtime import validate_args as check

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)"


def add_checkpoint(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        nargs="?" if optional else None,
        default=None,
        help="a container file written by `offload-runtime pack`",
    )


def add_budget(
    parser: argparse.ArgumentParser,
    *,
    several: bool = False,
    default: float | None = 1.0,
    default_text: str = "",
) -> None:
    what = "one or more budgets, each" if several else "budget:"
    default_text = default_text or f"default {default:g}"
    parser.add_argument(
        "--budget-gb",
        type=float,
        nargs="+" if several else None,
        default=[default] if several else default,
        metavar="GIB",
        help=f"{what} GiB of device memory the runtime may hold for weights (on the CPU: RAM for decoded "
        f"weights); {default_text}",
    )


def add_run_options(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """``--max-new-tokens``, ``--device``, ``--prefetch``, ``--host-budget-gb``, ``--experts``,
    ``--expert-cache``, ``--expert-policy``, ``--speculate`` and ``--execute-compressed``."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"tokens to generate, 1 or more (default {max_new_tokens})",
    )
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument(
        "--prefetch",
        type=int,
        default=1,
        metavar="N",
        help="groups decoded ahead of the one running; the runtime keeps N + 1 decode slots (default 1)",
    )
    parser.add_argument(
        "--host-budget-gb",
        type=float,
        default=None,
        metavar="GIB",
        help="GiB of compressed payloads kept in host RAM, 0 or more; the rest is read from the container "
        "on every use (default: 80%% of the available RAM)",
    )
    parser.add_argument(
        "--experts",
        choices=check.EXPERT_GRANULARITIES,
        default="auto",
        help="mixtures of experts: stream only the routed experts through an expert cache (auto, when the "
        "container stores experts as groups; expert: require it) or whole blocks (block) (default auto)",
    )
    parser.add_argument(
        "--expert-cache",
        choices=check.EXPERT_CACHE_MODES,
        default="auto",
        help="the expert cache's entries: compressed (decoded into the slot on use) or decoded (copied) "
        "(default auto: compressed on CUDA)",
    )
    parser.add_argument(
        "--expert-policy",
        choices=check.EXPERT_POLICIES,
        default="layer-lru",
        help="the expert cache's replacement policy: layer-lru (recency counted in each MoE layer's own "
        "steps), lru or lfu (default layer-lru)",
    )
    parser.add_argument(
        "--speculate",
        action="store_true",
        help="mixtures of experts on CUDA: prefetch the next layer's likely experts",
    )
    parser.add_argument(
        "--execute-compressed",
        action="store_true",
        help="fused12 containers: linear layers compute from the compressed weights kept in VRAM (exact "
        "weights, not bitwise the resident model's outputs)",
    )


def run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``load_compressed``/``dispatch_synthetic`` that ``add_run_options`` adds."""
    return {
        "experts": args.experts,
        "expert_cache": args.expert_cache,
        "expert_policy": args.expert_policy,
        "speculate": args.speculate,
        "execute_compressed": args.execute_compressed,
    }


def check_run_args(args: argparse.Namespace) -> None:
    """Check the shared options present in ``args``, by kind, under their command-line names."""
    budgets = getattr(args, "budget_gb", None)
    for budget in budgets if isinstance(budgets, list) else [budgets]:
        if budget is not None:
            check.positive_number(budget, "--budget-gb", example=2)
    if hasattr(args, "max_new_tokens"):
        check.positive_int(args.max_new_tokens, "--max-new-tokens", example=64)
    if hasattr(args, "prefetch"):
        check.positive_int(args.prefetch, "--prefetch", example=1)
    if getattr(args, "host_budget_gb", None) is not None:
        check.non_negative_number(args.host_budget_gb, "--host-budget-gb", example=8)
    if hasattr(args, "device"):
        check.device(args.device, "--device")
