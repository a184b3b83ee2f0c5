"""The ``nexusquant`` command: ``nexusquant eval`` and ``nexusquant inspect FILE``.

Each subcommand is a function ``add_<name>(subparsers)`` that adds its parser and sets
``func`` to the handler; :func:`main` dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

# Only torch-free modules at the top: `nexusquant --help` must not import torch. The handlers import
# the evaluation and the file reader (torch, transformers) when they run.
from ._core import NexusQuantError
from .eval.names import ALL_METHODS, DEFAULT_METHODS, DEFAULT_TEXTS, FULL_EVAL_COMMAND

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    values = [x for x in text.replace(" ", "").split(",") if x]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``, else a usage error naming ``what`` it must be."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "a non-negative integer")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="quality vs real compression ratio, beside kvpress-style eviction, QuantizedCache and int2/int4",
        description=(
            "Prefill each prefix, compress, score a teacher-forced continuation one token per forward, count the "
            "bytes the cache holds, and run pass-key retrieval trials, for nexusquant and its peers on the same "
            "inputs. Prints a table, writes eval.json and eval.png. With no arguments: a quick run (SmolLM2-135M, "
            f"alice29, prefix 512, a few methods). Full evaluation: {FULL_EVAL_COMMAND}"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", help="packaged model (smollm2, gemma3-270m) or a local transformers directory"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="model dtype; full-precision parts of every cache are held in it, so bfloat16/float16 give fair ratios",
    )
    p.add_argument(
        "--text",
        nargs="+",
        default=list(DEFAULT_TEXTS),
        metavar="FILE",
        help="text files, or packaged texts: alice29, lcet10, GPL-3, decode.c",
    )
    p.add_argument("--prefix", type=_int_list, default=[512], metavar="P[,P...]", help="prefix lengths in tokens")
    p.add_argument("--continuation", type=_positive_int, default=64, metavar="C", help="continuation tokens scored")
    p.add_argument(
        "--methods",
        type=_str_list,
        default=list(DEFAULT_METHODS),
        metavar="M[,M...]",
        help=f"'all' or some of: {', '.join(ALL_METHODS)} "
        "(or int2, int4, quanto-int2, quanto-int4, hqq-int2, hqq-int4)",
    )
    p.add_argument(
        "--presets",
        type=_str_list,
        default=["balanced"],
        metavar="Q[,Q...]",
        help="nexusquant presets (high, balanced, max); eviction peers are matched to each one's real ratio",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="[PRESET:]KNOB=V[,KNOB=V...]",
        help="also run nexusquant with these knobs (repeatable), e.g. evict=0,demote=0 or max:evict=0.75,key_bits=3; "
        "chunk_size=N prefills in chunks of N tokens",
    )
    p.add_argument(
        "--retrieval-trials",
        type=_count,
        default=5,
        metavar="N",
        help="pass-key trials per text, prefix and method (0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the pass-key trials")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="nexusquant-eval", metavar="DIR", help="where eval.json and eval.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .eval.harness import run

    # Before the model loads: an output directory that cannot be made fails now, not after minutes.
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NexusQuantError(f"cannot create the output directory {args.out}: {e.strerror or e}") from None
    quick = args.prefix == [512] and args.continuation == 64 and args.retrieval_trials < 20
    run(
        model=args.model,
        dtype=args.dtype,
        texts=args.text,
        prefixes=args.prefix,
        continuation=args.continuation,
        methods=args.methods,
        presets=args.presets,
        retrieval_trials=args.retrieval_trials,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        variants=args.variant,
        plot=not args.no_plot,
        progress=not args.quiet,
    )
    if quick:
        print(
            "this was a quick run; the README's evaluation (about 75 minutes on 2 CPU cores) is:\n"
            f"  {FULL_EVAL_COMMAND}"
        )
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a .nqkv cache file's header, per-layer sizes and ratios; verify every checksum",
        description="Read a compressed-cache file written by nexusquant.save_cache, verifying the header's and every "
        "section's checksum, and print the model fingerprint, settings, per-layer sizes and ratios. "
        "Exit status 2 (with the reason) for a damaged or foreign file.",
    )
    p.add_argument("file", metavar="FILE", help="a .nqkv file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from .files import inspect_file

    try:
        info = inspect_file(args.file)
    except OSError as e:
        raise NexusQuantError(f"cannot read {args.file}: {e.strerror or e}") from None
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_inspect(info))
    return 0


def format_inspect(info: dict) -> str:
    """The human-readable report of :func:`nexusquant.files.inspect_file`."""
    model = info["model"]
    settings = info["settings"]
    lines = [
        f"file            {info['path']}",
        f"format version  {info['format_version']}, {info['sections']} sections, checksums {info['checksums']}",
        f"model           {model.get('model_type')} {model.get('architectures') or ''}: "
        f"{model.get('num_hidden_layers')} layers, "
        f"{model.get('num_attention_heads')} heads / {model.get('num_key_value_heads')} KV heads, "
        f"head_dim {model.get('head_dim')}",
        f"prefix tokens   {info.get('token_ids_shape')}",
        "settings        " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        f"file bytes      {info['file_bytes']:,}",
    ]
    if info.get("resident_bytes"):
        lines.append(f"resident bytes  {info['resident_bytes']:,} (the cache in memory)")
    if info.get("fp16_bytes"):
        lines.append(f"fp16 bytes      {info['fp16_bytes']:,} (an uncompressed fp16 cache of the same tokens)")
    if info.get("resident_ratio"):
        lines.append(f"ratio           {info['resident_ratio']:.2f}x in memory, {info['file_ratio']:.2f}x on disk")
    lines.append("layer  array bytes")
    for i, b in enumerate(info["layer_array_bytes"]):
        lines.append(f"{i:5d}  {b:,}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexusquant", description="KV-cache compression for transformers models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# Subcommands, in the order `nexusquant --help` lists them.
_SUBCOMMANDS = [add_eval, add_inspect]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`nexusquant inspect FILE | head`): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except NexusQuantError as e:
        print(f"nexusquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nexusquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
