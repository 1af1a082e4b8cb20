"""``offload-runtime pack`` and ``offload-runtime inspect``: make a container, and describe one."""

from __future__ import annotations

import argparse

from offload_runtime import validate_args as check
from offload_runtime.cli_args import DEVICE_HELP, add_checkpoint, check_run_args
from offload_runtime.display import mib

CODEC_CHOICES = ("auto", "raw", "zstd", "ans", "int8", "fused12")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
PACK_EPILOG = """\
GGUF files are read through transformers (the `gguf` package must be installed): every quantised
tensor (Q4_1, Q8_0, ...) is de-quantised to --dtype (float32 by default) and the tokenizer the file
carries is stored in the container. The container is lossless relative to those de-quantised weights,
and larger than the GGUF file: GGUF's quantisation is not kept. The whole de-quantised model is held
in RAM while it is packed (safetensors sources are read one group at a time).

pack never writes over a file it reads (weights, index, shards, config, tokenizer files), and over
another existing file only with --force."""


def register_pack(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PACK_EPILOG
    parser.add_argument(
        "src",
        metavar="SRC",
        help="a Hugging Face model folder (config.json with model.safetensors or a sharded "
        "model.safetensors.index.json), one .safetensors file, or a .gguf file",
    )
    parser.add_argument("out", metavar="OUT", help="the container file to write, in an existing folder")
    # not argparse `choices`: an unknown name gets the codec registry's one-line error listing known codecs
    parser.add_argument(
        "--codec",
        default="auto",
        metavar="{" + ",".join(CODEC_CHOICES) + "}",
        help="auto (default: ans for fp16/bf16 groups when CUDA and nvCOMP are present, else zstd), raw, "
        "zstd, ans (GPU only), int8 (lossy) or fused12 (lossless bf16 planes a GPU kernel computes from)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="store floating tensors in this dtype (default: as stored in SRC; float32 for GGUF, "
        "whose quantised tensors are de-quantised to it)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help=f"where the container will be decoded, steering --codec auto: {DEVICE_HELP}",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT if it exists (never an input of SRC)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    check_run_args(args)
    import torch

    from offload_runtime.display import format_bytes
    from offload_runtime.loaders import ContainerReader, pack

    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = {"codec": args.codec, "dtype": dtype, "device_": args.device, "overwrite": args.force}
    check.check_pack(args.src, args.out, **options, names=("SRC", "OUT", "--force"))
    out = pack(
        args.src,
        args.out,
        codec=args.codec,
        progress=not args.no_progress,
        dtype=dtype,
        device=args.device,
        overwrite=args.force,
    )
    with ContainerReader(out, verify="never") as reader:
        decoded = sum(g.decoded_size for g in reader.groups)
        stored = sum(g.stored_size for g in reader.groups)
        groups = len(reader.groups)
    ratio = decoded / stored if stored else 1.0
    print(
        f"wrote {out}: {groups} groups, {format_bytes(stored)} stored for {format_bytes(decoded)} decoded "
        f"(ratio {ratio:.3f})"
    )
    return 0


def register_inspect(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also read every chunk and check its CRC-32s (as `offload-runtime verify CHECKPOINT`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="--verify: hide the progress bar")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    path = check.container_file(args.checkpoint, "CHECKPOINT")
    from offload_runtime.loaders import ContainerReader

    with ContainerReader(path) as reader:
        index = reader.index
        print(f"{reader.path}: offload_runtime container, format version {index.format_version}")
        print(f"model: {index.model_class or '(no config)'}, dtype {index.dtype}, {len(index.groups)} groups")
        columns = ("group", "kind", "codec", "decoded", "stored", "ratio", "chunks")
        print("{:<32} {:<6} {:<5} {:>12} {:>12} {:>6} {:>6}  crc32".format(*columns))
        decoded = stored = chunks = 0
        for g in index.groups:
            ratio = g.decoded_size / g.stored_size if g.stored_size else 1.0
            checks = "stored" if g.chunks else "-"
            print(
                f"{g.name:<32} {g.kind:<6} {g.codec:<5} {mib(g.decoded_size):>12} {mib(g.stored_size):>12} "
                f"{ratio:>6.3f} {len(g.chunks):>6}  {checks}"
            )
            decoded, stored, chunks = decoded + g.decoded_size, stored + g.stored_size, chunks + len(g.chunks)
        total_ratio = decoded / stored if stored else 1.0
        sizes = f"{mib(decoded):>12} {mib(stored):>12}"
        print(f"{'total':<32} {'':<6} {'':<5} {sizes} {total_ratio:>6.3f} {chunks:>6}")
        if index.tokenizer:
            print(f"tokenizer: {', '.join(sorted(index.tokenizer))}")
    if args.verify:
        from offload_runtime.cli_verify import run_verify

        return run_verify(args)
    print(
        "payloads not read: the index and its CRC-32 were checked, the chunks' CRC-32s were not; "
        f"`offload-runtime verify {path}` reads every chunk and checks them"
    )
    return 0
