"""Subcommands of `lora-ops`; every module here is discovered by `lora_ops.cli`.

What the command modules share: the help layout (`examples(...)`: an epilog of runnable example lines) and
the `--device` flag (`add_device_flag`, `resolve_device`). Nothing here imports torch at import time.
"""

from __future__ import annotations

import argparse

from ..devices import resolve_device  # noqa: F401 - the commands' import point

DEVICE_HELP = "auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N, mps (default: auto)"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions and help as usual, keeps the `examples:` epilog line for line."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*lines: str) -> dict:
    """`add_parser` keyword arguments for an epilog of example command lines (each runnable as written)."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines), "formatter_class": HelpFormatter}


MODEL_CONFIG_HELP = (
    "for a one-file --base checkpoint: a diffusers folder or hub id of the same architecture (configs, tokenizer)"
)


def add_model_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)


def resolve_base(base, model_config=None):
    """A `--base` as the library takes it: a folder or hub id as given, a one-file checkpoint (`.safetensors`,
    `.ckpt`) loaded as a pipeline (with `--model-config`'s configs); None stays None."""
    if base is None:
        return None
    from ..models import is_single_file, load_pipeline

    if is_single_file(base):
        return load_pipeline(base, config=model_config)
    if model_config is not None:
        raise ValueError(f"--model-config is for one-file checkpoints; --base {base} is not one")
    return base


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
