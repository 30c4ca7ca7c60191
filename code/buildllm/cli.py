"""The `buildllm` command line: tokenize, data, train, plot, sample, eval, info.

Every subcommand is a thin layer over a library function the book teaches; `main(argv)`
returns an exit code so tests call it in process. Results go to stdout, progress and logs
to stderr. Exit 0 ok, 1 failure, 2 bad usage. The subcommands live in `cli_data.py`
(tokenize, data), `cli_train.py` (train, plot), `cli_sample.py` (sample), `cli_eval.py`
(eval), `cli_finetune.py` (finetune classify, classify) and `cli_chat.py` (finetune
sft|dpo, chat).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from typing import NoReturn

import buildllm
from buildllm.checks import UsageError
from buildllm.cli_chat import add_chat_parser
from buildllm.cli_data import add_data_parser, add_tokenize_parser
from buildllm.cli_eval import add_eval_parser
from buildllm.cli_finetune import add_classify_parser, add_finetune_parser
from buildllm.cli_sample import add_sample_parser
from buildllm.cli_train import add_plot_parser, add_train_parser
from buildllm.runfolder import is_disk_full


class _Formatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Show defaults and keep the hand-made line breaks of descriptions and epilogs."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with `_Formatter` whose usage errors take one line.

    Subcommands' parsers are of this class too. argparse would print the whole usage
    before the error; one line naming the flag, the rule and where help is reads better.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print "PROG: error: MESSAGE; see PROG --help" on stderr and exit with 2."""
        self.exit(
            2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n"
        )


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print versions and the device buildllm would use",
        description="Print the versions of buildllm, Python and PyTorch, and the device "
        "that `--device auto` picks on this machine (cuda, then mps, then cpu).",
        epilog="example:\n  buildllm info\n  buildllm info --json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from buildllm.distributed import resolve_device

    info = {
        "buildllm": buildllm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": resolve_device("auto"),
        "cuda_devices": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ],
        "cpu_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>12}: {value}")
    return 0


PARSERS = [
    add_info_parser,
    add_eval_parser,
    add_sample_parser,
    add_tokenize_parser,
    add_data_parser,
    add_train_parser,
    add_plot_parser,
    add_finetune_parser,
    add_classify_parser,
    add_chat_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the `buildllm` parser with every subcommand registered."""
    parser = _Parser(
        prog="buildllm",
        description="Train, sample and inspect the GPT from *Build a Large Language Model "
        "from Scratch*.",
    )
    parser.add_argument(
        "--version", action="version", version=f"buildllm {buildllm.__version__}"
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback on errors"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 bad usage).

    Errors print one line, "buildllm: error: ...", naming the problem and the fix
    (`--traceback` shows Python's traceback instead); warnings print one line too.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help, --version and bad usage
        return int(exit_.code or 0)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.handler(args)
        except (ValueError, TypeError, OSError, RuntimeError) as err:  # UsageError too
            if args.traceback:
                raise
            print(f"buildllm: error: {describe_error(err)}", file=sys.stderr)
            return 2 if isinstance(err, UsageError) else 1
        except KeyboardInterrupt:
            print("buildllm: interrupted", file=sys.stderr)
            return 130


def describe_error(err: BaseException) -> str:
    """Return one line saying what went wrong; for a bare OSError, also what to do.

    Our own errors already name the fix. An OSError straight from the file system
    ("[Errno 20] Not a directory: 'a/b'") gets the path and the remedy in words.
    """
    if isinstance(err, OSError) and err.strerror:  # from the OS, not one of ours
        path = err.filename or "a file"
        if is_disk_full(err):
            return f"disk full writing {path}; free some space and run it again"
        hints = {
            NotADirectoryError: f"a part of {path} is a file, not a folder; choose "
            "a path inside a folder",
            IsADirectoryError: f"{path} is a folder; give the path of a file",
            FileExistsError: f"{path} is a file, not a folder; choose another folder",
            FileNotFoundError: f"{path} does not exist; check the path",
            PermissionError: f"no permission to use {path}; choose a path you "
            "may write to",
        }
        return hints.get(type(err), f"{path}: {err.strerror}")
    return one_line(str(err))


def one_line(text: str) -> str:
    """Join a message's lines, so an error is one line on stderr."""
    return " ".join(line.strip() for line in text.splitlines())


def _show_warning(message: Warning | str, *args: object, **kwargs: object) -> None:
    print(f"buildllm: warning: {one_line(str(message))}", file=sys.stderr)
