"""The `minilora` command line.

Every subcommand is a small function that takes parsed arguments. Errors a user can
cause (a missing file, a bad option) exit with code 2 and one clear line; the
traceback is shown only with --debug.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A mistake the user can fix; reported as one line, exit code 2."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_dir=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description="LoRA and QLoRA fine-tuning from scratch in plain PyTorch."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="LoRA on all-MiniLM-L6-v2: the README's first command")
    demo.add_argument("--model", default=None, help="HF model folder (default: the all-MiniLM-L6-v2 wheel)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
