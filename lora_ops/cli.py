"""The `lora-ops` command line. Each subcommand lives in `lora_ops/commands/<name>.py`.

A command module defines `register(subparsers)`, which adds its parser(s) and sets `func` to a callable
taking the parsed arguments and returning an exit code (or None for 0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import sys

from . import commands
from .quiet import quiet_known_warnings  # noqa: F401 - also the public import point


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


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the command's own flags, e.g. the one of `train pti`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) not in subs[0].choices:
            return parser
        parser = subs[0].choices[getattr(args, subs[0].dest)]


def flag_names(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """{option name in the library: the flag as the user typed it (else its first long spelling)}.

    Config fields spelled differently from their flag (`num_inference_steps` is `--steps`) come from the
    parser's `field_flags` default, set by the command module.
    """
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        spellings = [o for o in action.option_strings if o.startswith("--")] or action.option_strings
        out[action.dest] = next((o for o in spellings if o in typed), spellings[0])
    field_flags = parser.get_default("field_flags") or {}
    out.update({field: out.get(flag.lstrip("-").replace("-", "_"), flag) for field, flag in field_flags.items()})
    return out


def name_flags(message: str, flags: dict[str, str], file_values: frozenset[str] = frozenset()) -> str:
    """`message` with the library's option names written as the command line's flags.

    `lora_rank=0` -> `--lora_rank=0`, `select_metric='dino' needs dino_model` -> `--select-metric='dino'
    needs --dino-model`. Names with an underscore are replaced wherever they stand as a word; one-word names
    (`device`, `rank`) only as `name=`, where they cannot be ordinary words. Options in `file_values` came
    from a config file and keep the file's spelling.
    """
    for field in sorted(flags, key=len, reverse=True):
        if field in file_values:
            continue
        if "_" in field:
            pattern = rf"(?<![\w.\-`'\[]){re.escape(field)}(?![\w\-])"
        else:
            pattern = rf"(?<![\w.\-`'\[]){re.escape(field)}(?==)"
        message = re.sub(pattern, flags[field], message)
    return message


def _file_keys(args: argparse.Namespace) -> frozenset[str]:
    """Options whose value came from `--config FILE` (not typed as flags)."""
    if not getattr(args, "config", None):
        return frozenset()
    try:
        from .training.options import load_config_file

        return frozenset(load_config_file(args.config))
    except (OSError, ValueError):
        return frozenset()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_known_warnings()
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, RuntimeError) as exc:
        if args.debug or os.environ.get("LORA_OPS_DEBUG"):
            raise
        typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        flags = flag_names(_leaf_parser(parser, args), argv)
        from_file = frozenset(k for k in _file_keys(args) if k not in flags or flags[k] not in typed)
        print(f"lora-ops {args.command}: error: {name_flags(str(exc), flags, from_file)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-ops {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
