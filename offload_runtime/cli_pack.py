"""``offload-runtime pack`` and ``offload-runtime inspect``: make a container, and describe one."""

from __future__ import annotations

import argparse

CODEC_CHOICES = ("auto", "raw", "zstd", "ans", "int8", "fused12")


def register_pack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF model directory, or a .safetensors file")
    parser.add_argument("out", help="the container to write")
    # not argparse `choices`: an unknown name gets the codec registry's one-line error listing known codecs
    parser.add_argument("--codec", default="auto", metavar="{" + ",".join(CODEC_CHOICES) + "}")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from offload_runtime.loaders import pack

    out = pack(args.src, args.out, codec=args.codec, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def register_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="a container made by `offload-runtime pack`")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from offload_runtime.loaders import ContainerReader

    with ContainerReader(args.ckpt) as reader:
        index = reader.index
        print(f"{reader.path}: offload_runtime container, format version {index.format_version}")
        print(f"model: {index.model_class or '(no config)'}, dtype {index.dtype}, {len(index.groups)} groups")
        columns = ("group", "kind", "codec", "decoded", "stored", "ratio", "chunks")
        print("{:<32} {:<6} {:<5} {:>12} {:>12} {:>6} {:>6}  crc32".format(*columns))
        decoded = stored = chunks = 0
        for g in index.groups:
            ratio = g.decoded_size / g.stored_size if g.stored_size else 1.0
            checks = "yes" if g.chunks else "-"
            print(
                f"{g.name:<32} {g.kind:<6} {g.codec:<5} {g.decoded_size:>12,} {g.stored_size:>12,} "
                f"{ratio:>6.3f} {len(g.chunks):>6}  {checks}"
            )
            decoded, stored, chunks = decoded + g.decoded_size, stored + g.stored_size, chunks + len(g.chunks)
        total_ratio = decoded / stored if stored else 1.0
        print(f"{'total':<32} {'':<6} {'':<5} {decoded:>12,} {stored:>12,} {total_ratio:>6.3f} {chunks:>6}")
        if index.tokenizer:
            print(f"tokenizer: {', '.join(sorted(index.tokenizer))}")
    return 0
