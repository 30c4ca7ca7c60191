"""The `buildllm` command line: tokenize, data, train, sample, eval, plot, bench, info.

Every subcommand is a thin layer over a library function the book teaches; `main(argv)`
returns an exit code so tests call it in process. Results go to stdout, progress and logs
to stderr. Exit 0 ok, 1 failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

import buildllm

Handler = Callable[[argparse.Namespace], int]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the hand-made line breaks of descriptions and epilogs."""


def resolve_device(device: str = "auto") -> str:
    """Return the device to run on: `device`, or for "auto" the first of cuda, mps, cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------- info
def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print versions and the device buildllm would use",
        description="Print the versions of buildllm, Python and PyTorch, and the device "
        "that `--device auto` picks on this machine (cuda, then mps, then cpu).",
        epilog="example:\n  buildllm info\n  buildllm info --json",
        formatter_class=_Formatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch

    info = {
        "buildllm": buildllm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": resolve_device("auto"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


# ---------------------------------------------------------------- tokenize (tokenizer person)
# ---------------------------------------------------------------- data (tokenizer person)
# ---------------------------------------------------------------- train / plot (training person)
# ---------------------------------------------------------------- sample (generation person)
# ---------------------------------------------------------------- eval (pretraining person)
# ---------------------------------------------------------------- bench (lead)

PARSERS = [add_info_parser]


def build_parser() -> argparse.ArgumentParser:
    """Return the `buildllm` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="buildllm",
        description="Train, sample and inspect the GPT from *Build a Large Language Model "
        "from Scratch*.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"buildllm {buildllm.__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback on errors"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help, --version and bad usage
        return int(exit_.code or 0)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        if args.traceback:
            raise
        print(f"buildllm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("buildllm: interrupted", file=sys.stderr)
        return 130
