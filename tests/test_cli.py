"""The command line itself: `--help` and `--version` answer without loading the ML stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors", "numpy", "PIL")


def test_help_builds_every_parser_without_importing_the_ml_stack():
    code = (
        "import sys\n"
        "from lora_ops.cli import build_parser\n"
        "build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"building the parsers imported {out.stdout.strip()}"


def test_version_and_help_answer():
    version = subprocess.run([sys.executable, "-m", "lora_ops", "--version"], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("lora-ops 0.")
    helped = subprocess.run([sys.executable, "-m", "lora_ops", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "convert" in helped.stdout and "train" in helped.stdout


def test_make_tiny_model_choices_match_the_library():
    from lora_ops.commands.make_tiny_model import ARCHS
    from lora_ops.tiny import ARCHS as LIBRARY_ARCHS

    assert ARCHS == LIBRARY_ARCHS


def test_package_exports_resolve():
    import lora_ops

    for name in lora_ops.__all__:
        assert getattr(lora_ops, name) is not None, name
