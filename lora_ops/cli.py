"""The `lora-ops` command line. Each subcommand lives in `lora_ops/commands/<name>.py`.

A command module defines `register(subparsers)`, which adds its parser(s) and sets `func` to a callable
taking the parsed arguments and returning an exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from . import commands


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-pipeline")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-ops",
        description="LoRA for Stable Diffusion: train, patch, merge, distill, convert, evaluate.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        if args.debug or os.environ.get("LORA_OPS_DEBUG"):
            raise
        print(f"lora-ops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-ops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
