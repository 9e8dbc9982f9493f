"""`lora-ops train pti|dreambooth`: train a LoRA from flags and/or a YAML/JSON config file.

Every option of `PTIConfig` / `DreamBoothConfig` is a flag spelled as the original `lora_pti` flag
(`--placeholder_tokens="<s1>|<s2>"`; `--placeholder-tokens` works too). Boolean flags take an optional
value (`--clip_ti_decay`, `--perform_inversion=True`, `--color_jitter=false`). Flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from ..train_config import ALIASES, DreamBoothConfig, PTIConfig, load_config_file

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def _optional(convert):
    def parse(text: str):
        return None if str(text).strip().lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _first_line(doc: str, name: str) -> str:
    """The `name:` entry of a dataclass `Args:` docstring, joined to one line."""
    lines = (doc or "").splitlines()
    out = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        names = [n.strip() for n in stripped.split(":", 1)[0].split(",")]
        if ":" in stripped and name in names:
            out.append(stripped.split(":", 1)[1].strip())
            for follow in lines[i + 1 :]:
                if not follow.strip() or ":" in follow.strip().split(" ", 1)[0]:
                    break
                out.append(follow.strip())
            break
    return " ".join(out).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field (default: not given, so the config file's value stays)."""
    hints = typing.get_type_hints(cls)
    docs = "\n\n".join(c.__doc__ or "" for c in cls.__mro__)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in args
        inner = next(a for a in args if a is not type(None)) if optional else kind
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        names += [f"--{alias}" for alias, target in ALIASES.items() if target == f.name]
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": _first_line(docs, f.name)}
        origin = typing.get_origin(inner)
        if inner is bool:
            kwargs.update(nargs="?", const=True, type=_bool, metavar="BOOL")
        elif origin is typing.Literal:
            choices = list(typing.get_args(inner))
            kwargs.update(choices=choices + (["none"] if optional else []), type=str)
        elif origin is list:
            kwargs.update(nargs="+", type=str, metavar="TEMPLATE")
        elif origin in (typing.Union, types.UnionType):  # e.g. str | Path
            kwargs.update(type=_optional(str) if optional else str)
        else:
            kwargs.update(type=_optional(inner) if optional else inner)
        parser.add_argument(*names, **kwargs)


def build_config(cls, args: argparse.Namespace):
    """The config from `--config` (if any) with the flags given on the command line on top."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in vars(args).items():
        if key in names:
            values[ALIASES.get(key, key)] = None if value == "none" else value
    return cls.from_dict(values)


def _report(result) -> None:
    print(
        json.dumps(
            {
                "path": str(result.path) if result.path else None,
                "metrics": {k: round(v, 6) for k, v in result.metrics.items()},
                "checkpoints": [str(p) for p in result.checkpoints],
            }
        )
    )


XFORMERS_NOTE = (
    "note: --enable_xformers_memory_efficient_attention is accepted for the original lora_pti's command "
    "lines and does nothing: PyTorch's scaled-dot-product attention (SDPA) is always used, as memory-"
    "efficient as xformers"
)


def _add_compat_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the original trainers that have no effect here, accepted so their command lines run."""
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        "--enable-xformers-memory-efficient-attention",
        dest="enable_xformers",
        nargs="?",
        const=True,
        default=False,
        type=_bool,
        metavar="BOOL",
        help="accepted and ignored: PyTorch SDPA attention is always used (the original needed xformers)",
    )


def _compat_notes(args) -> None:
    if getattr(args, "enable_xformers", False):
        import sys

        print(XFORMERS_NOTE, file=sys.stderr)


def run_pti(args) -> int:
    from ..train import run_tuning, train_pti

    _compat_notes(args)

    config = build_config(PTIConfig, args)
    result = run_tuning(config, args.tokens_from) if args.tokens_from else train_pti(config)
    _report(result)
    return 0


def run_dreambooth(args) -> int:
    from ..dreambooth import train_dreambooth

    _compat_notes(args)
    _report(train_dreambooth(build_config(DreamBoothConfig, args)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA: pivotal tuning (pti) or DreamBooth")
    trainers = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    pti = trainers.add_parser(
        "pti",
        help="pivotal tuning: textual inversion, then LoRA (the original lora_pti)",
        description="Pivotal tuning inversion. Flags mirror the original lora_pti; see docs/training.md.",
    )
    pti.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    pti.add_argument("--tokens_from", "--tokens-from", help="run phase 2 only, from this phase-1 output file")
    add_config_flags(pti, PTIConfig)
    _add_compat_flags(pti)
    pti.set_defaults(func=run_pti)
    db = trainers.add_parser(
        "dreambooth",
        help="DreamBooth LoRA with optional prior preservation",
        description="DreamBooth LoRA training; see docs/training.md.",
    )
    db.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    add_config_flags(db, DreamBoothConfig)
    _add_compat_flags(db)
    db.set_defaults(func=run_dreambooth)
