"""`lora-ops train pti|dreambooth`: train a LoRA from flags and/or a YAML/JSON config file.

Every option of `PTIConfig` / `DreamBoothConfig` is a flag spelled as the original `lora_pti` flag, its flat
name (`--placeholder_tokens="<s1>|<s2>"`, `--lora_rank` for `lora.r`; `--placeholder-tokens` works too). Boolean flags take an optional
value (`--clip_ti_decay`, `--perform_inversion=True`, `--color_jitter=false`). Flags override the file.
"""

from __future__ import annotations

import argparse
import json
import types
import typing

from ..training.config import ALIASES, SECTIONS, DreamBoothConfig, PTIConfig, TrainConfig
from ..training.options import Option, load_config_file, options
from . import examples, resolve_device

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


def show_default(value) -> str:
    """A default as it is typed on the command line: `none`, `true`, `4`, `<s>`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flag_help(o: Option) -> str:
    text = o.help
    if o.default != "" or "(required)" not in text:
        text += f" (default: {show_default(o.default)})"
    return text.replace("%", "%%")


def _unwrap(kind):
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(kind)
    optional = (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in args
    return (next(a for a in args if a is not type(None)) if optional else kind), optional


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per option, by its flat name, its help from the field's metadata (default: not given, so the
    config file's value stays)."""
    for o in options(cls):
        if not o.field.init:
            continue
        inner, optional = _unwrap(o.type)
        names = [f"--{o.name}"] + ([f"--{o.name.replace('_', '-')}"] if "_" in o.name else [])
        names += [f"--{alias}" for alias, target in ALIASES.items() if target == o.name]
        kwargs: dict = {"dest": o.name, "default": argparse.SUPPRESS, "help": _flag_help(o)}
        origin = typing.get_origin(inner)
        if inner is bool:
            kwargs.update(nargs="?", const=True, type=_optional(_bool) if optional else _bool, metavar="BOOL")
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


def options_table(cls, sections: tuple[str, ...] | None = None, shared: bool = True) -> str:
    """The markdown table of docs/training.md for `cls` from the same metadata: the options of `sections`
    (their names; `""` is the config's own options), and without `shared`, only those `TrainConfig` lacks."""
    common = {o.key for o in options(TrainConfig)}
    rows = ["| option | config key | default | meaning |", "|---|---|---|---|"]
    for o in options(cls):
        if (sections is not None and o.section not in sections) or (not shared and o.key in common):
            continue
        inner, _ = _unwrap(o.type)
        values = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else ()
        choices = ", ".join(f"`{v}`" for v in values) if all(isinstance(v, str) for v in values) else ""
        if all(f"`{v}`" in o.help for v in values):  # the help names them already
            choices = ""
        meaning = o.help + (f"; one of {choices}" if choices else "") + "."
        default = "" if o.default == "" else f"`{show_default(o.default)}`"
        rows.append(f"| `--{o.name}` | `{o.key}` | {default} | {meaning} |")
    return "\n".join(row if i < 2 else _escape_pipes(row) for i, row in enumerate(rows)) + "\n"


def _escape_pipes(row: str) -> str:
    """Escape `|` inside the cells of one table row (the cell separators are ` | `)."""
    cells = row[2:-2].split(" | ")
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def docs_tables() -> dict[str, str]:
    """{marker: table} for the option tables in docs/training.md: one per section, then each trainer's own."""
    tables = {name or "shared": options_table(TrainConfig, (name,)) for name in ("", *SECTIONS)}
    tables["pti"] = options_table(PTIConfig, shared=False)
    tables["dreambooth"] = options_table(DreamBoothConfig, shared=False)
    return tables


def render_docs(text: str) -> str:
    """`text` (docs/training.md) with every `<!-- options:NAME -->` … `<!-- /options -->` block regenerated."""
    for name, table in docs_tables().items():
        begin, end = f"<!-- options:{name} -->\n", "<!-- /options -->"
        i = text.index(begin) + len(begin)
        text = text[:i] + table + text[text.index(end, i) :]
    return text


def build_config(cls, args: argparse.Namespace):
    """The config from `--config` (if any, flat or nested) with the flags given on the command line on top."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    names = {o.name for o in options(cls)}
    for key, value in vars(args).items():
        if key in names:
            values[key] = None if value == "none" else value
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
    from ..training.pti import run_tuning, train_pti

    _compat_notes(args)

    config = build_config(PTIConfig, args)
    config.runtime.device = resolve_device(config.runtime.device)
    result = run_tuning(config, args.tokens_from) if args.tokens_from else train_pti(config)
    _report(result)
    return 0


def run_dreambooth(args) -> int:
    from ..training.dreambooth import train_dreambooth

    _compat_notes(args)
    config = build_config(DreamBoothConfig, args)
    config.runtime.device = resolve_device(config.runtime.device)
    _report(train_dreambooth(config))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA: pivotal tuning (pti) or DreamBooth",
        **examples(
            "lora-ops train pti --pretrained_model_name_or_path=./sd15 --instance_data_dir=./photos "
            '--output_dir=./out --placeholder_tokens="<s1>|<s2>" --use_template=object',
            "lora-ops train dreambooth --pretrained_model_name_or_path=./sd15 --instance_data_dir=./dog "
            '--output_dir=./out --instance_prompt="a photo of sks dog"',
        ),
    )
    trainers = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    pti = trainers.add_parser(
        "pti",
        help="pivotal tuning: textual inversion, then LoRA (the original lora_pti)",
        description="Pivotal tuning inversion. Flags mirror the original lora_pti; see docs/training.md.",
        **examples(
            "lora-ops make-tiny-model ./tiny",
            "lora-ops train pti --pretrained_model_name_or_path=./tiny --instance_data_dir=./photos "
            '--output_dir=./out --resolution=32 --placeholder_tokens="<s1>|<s2>" --use_template=object '
            "--max_train_steps_ti=50 --max_train_steps_tuning=50",
            "lora-ops train pti --config subject.yaml --max_train_steps_tuning=500 --resume=auto",
        ),
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
        **examples(
            "lora-ops train dreambooth --pretrained_model_name_or_path=./sd15 --instance_data_dir=./dog "
            '--output_dir=./out --instance_prompt="a photo of sks dog" --max_train_steps=800',
            "lora-ops train dreambooth --pretrained_model_name_or_path=./sd15 --instance_data_dir=./dog "
            '--output_dir=./out --instance_prompt="a photo of sks dog" --with_prior_preservation '
            '--class_prompt="a photo of dog" --class_data_dir=./class-dog',
        ),
    )
    db.add_argument("--config", help="YAML or JSON file of options (flags override it)")
    add_config_flags(db, DreamBoothConfig)
    _add_compat_flags(db)
    db.set_defaults(func=run_dreambooth)


if __name__ == "__main__":  # python -m lora_ops.commands.train docs/training.md: regenerate its option tables
    import pathlib
    import sys

    doc = pathlib.Path(sys.argv[1])
    doc.write_text(render_docs(doc.read_text()))
