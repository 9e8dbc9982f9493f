"""The command line itself: `--help` and `--version` answer without loading the ML stack."""

from __future__ import annotations

import importlib.util
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


def _parsers(parser, path=("lora-ops",)):
    """(command path, parser) of every parser under `parser`, subcommands included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_subcommand_help_ends_with_examples_that_parse():
    import shlex

    from lora_ops.cli import build_parser

    parser = build_parser()
    checked = 0
    for path, sub in _parsers(parser):
        if len(path) == 1:
            continue
        text = sub.format_help()
        assert "\nexamples:\n" in text, f"{' '.join(path)} --help has no examples"
        lines = [line.strip() for line in text.split("\nexamples:\n", 1)[1].splitlines() if line.strip()]
        assert 1 <= len(lines) <= 3, (path, lines)
        for line in lines:
            argv = shlex.split(line, comments=True)
            assert argv[0] == "lora-ops", line
            args = parser.parse_args(argv[1:])  # runnable as written: it parses (SystemExit otherwise)
            assert callable(args.func), line
            checked += 1
    assert checked >= 20


def test_train_options_help_comes_from_the_fields_with_defaults():
    from lora_ops.cli import build_parser
    from lora_ops.commands.train import show_default
    from lora_ops.training.config import DreamBoothConfig, PTIConfig
    from lora_ops.training.options import options

    parser = build_parser()
    for cls, trainer in ((PTIConfig, "pti"), (DreamBoothConfig, "dreambooth")):
        helps = {o.name: o.help for o in options(cls)}
        assert len(helps) == len(options(cls)), "two options share a flat name"
        assert all(len(h) > 10 for h in helps.values()), [n for n, h in helps.items() if len(h) <= 10]
        repeated = {h for h in helps.values() if list(helps.values()).count(h) > 1}
        assert not repeated, f"{cls.__name__}: help copied between options: {repeated}"
        sub = next(p for path, p in _parsers(parser) if path[1:] == ("train", trainer))
        actions = {a.dest: a for a in sub._actions}
        for o in options(cls):
            assert actions[o.name].help.startswith(helps[o.name].replace("%", "%%")), o.name
            if o.default != "":
                assert actions[o.name].help.endswith(f"(default: {show_default(o.default)})"), o.name
    text = " ".join(next(p for path, p in _parsers(parser) if path[1:] == ("train", "pti")).format_help().split())
    assert "--lora_rank LORA_RANK, --lora-rank LORA_RANK rank r of the LoRA adapters (default: 4)" in text
    assert "--max_train_steps_ti MAX_TRAIN_STEPS_TI, --max-train-steps-ti MAX_TRAIN_STEPS_TI optimizer steps of phase 1" in text  # fmt: skip


def test_training_docs_tables_match_the_field_metadata():
    from pathlib import Path

    from lora_ops.commands.train import docs_tables, render_docs

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert render_docs(doc) == doc, "docs/training.md is stale: python -m lora_ops.commands.train docs/training.md"
    assert "| `--lora_rank` | `lora.r` | `4` | rank r of the LoRA adapters. |" in docs_tables()["lora"]
    assert (
        "| `--continue_inversion_lr` | `continue_inversion_lr` | `none` | learning rate of the tokens in phase 2"
        in docs_tables()["pti"]
    )


def test_device_defaults_to_auto_everywhere(monkeypatch):
    import torch
    from lora_pipeline.steps.common import parser as step_parser

    from lora_ops.cli import build_parser
    from lora_ops.commands import resolve_device

    found = []
    for path, sub in [*_parsers(build_parser()), (("step",), step_parser("tune", "x"))]:
        for action in sub._actions:
            if "--device" in action.option_strings:
                found.append(path)
                # train flags leave unset options to the config (its default is auto), the others default to auto
                assert action.default == "auto" or "(default: auto)" in action.help, path
                assert "auto" in action.help, path
    assert {("lora-ops", c) for c in ("distill", "evaluate", "generate", "preprocess", "resize")} <= set(found)
    assert ("lora-ops", "train", "pti") in found and ("step",) in found
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_errors_name_the_flag_as_typed(tmp_path, capsys):
    import json

    from lora_ops.cli import main, name_flags

    train = ["train", "pti", "--pretrained_model_name_or_path=m", f"--instance_data_dir={tmp_path}"]
    assert main([*train, f"--output_dir={tmp_path}", "--lora-rank=0"]) == 2
    assert "lora-ops train: error: --lora-rank=0 must be an integer >= 1" in capsys.readouterr().err
    assert main(train) == 2
    assert "error: --output_dir is required" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"output_dir": str(tmp_path), "lora_rank": 0}))
    assert main([*train, "--config", str(tmp_path / "c.json")]) == 2  # from the file: the file's key
    assert "error: lora_rank=0 must be" in capsys.readouterr().err
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    evaluate = ["evaluate", str(tmp_path / "model"), str(lora), "--out", str(tmp_path / "e")]
    assert main([*evaluate, "--select-metric", "dino"]) == 2
    assert "error: --select-metric='dino' needs --instance-dir" in capsys.readouterr().err
    assert main([*evaluate, "--steps", "0", "--instance-dir", str(tmp_path)]) == 2
    assert "error: --steps=0 must be a positive integer" in capsys.readouterr().err
    # one-word names only as `name=`; words in prose stay words
    flags = {"device": "--device", "lora_rank": "--lora-rank"}
    assert (
        name_flags("device='x' on a CUDA device; lora_rank too", flags)
        == "--device='x' on a CUDA device; --lora-rank too"
    )


def test_torchvision_fallback_line_is_quiet():
    code = (
        "import sys\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from lora_ops.cli import quiet_known_warnings\n"
        "    quiet_known_warnings()\n"
        "from diffusers import StableDiffusionPipeline\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    loud, quiet = (
        subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300, env=env)
        for mode in ("loud", "quiet")
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "requires torchvision" not in quiet.stderr, quiet.stderr
    # without torchvision (as here) transformers prints the line, and the filter is what removes it
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    assert has_torchvision or "requires torchvision" in loud.stderr, loud.stderr[-2000:]


def test_the_noise_filter_drops_only_the_known_line(caplog):
    import logging

    from lora_ops.quiet import quiet_known_warnings

    quiet_known_warnings()
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`.")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
