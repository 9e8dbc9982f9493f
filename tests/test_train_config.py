"""The trainers' configuration: sections, flat names of the original flags, nested files, what resume may change."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lora_ops.training.config import ALIASES, SECTIONS, DreamBoothConfig, LoraSection, PTIConfig, TrainConfig
from lora_ops.training.options import load_config_file, options, resumable_config, resume_changes

PATHS = dict(pretrained_model_name_or_path="base", instance_data_dir="photos", output_dir="out")


def test_flat_names_and_nested_sections_build_the_same_config():
    flat = PTIConfig(**PATHS, lora_rank=2, lora_dropout_p=0.1, learning_rate_unet=3e-4, mixed_precision="no", seed=5)
    nested = PTIConfig(
        runtime=PATHS,
        lora={"r": 2, "lora_dropout": 0.1},
        optim={"learning_rate_unet": 3e-4},
        compute={"mixed_precision": "no"},
        seed=5,
    )
    assert flat == nested
    assert flat.lora == LoraSection(r=2, lora_dropout=0.1)
    assert flat.lora.r == 2 and flat.optim.learning_rate_unet == 3e-4 and flat.runtime.output_dir == "out"
    # a section may be given as its dataclass too, and a flat name after it wins
    assert PTIConfig(**PATHS, lora=LoraSection(r=8), lora_rank=3).lora.r == 3
    # inside a section, the flat name works as well as the field name
    assert PTIConfig(**PATHS, lora={"lora_rank": 6}).lora.r == 6


def test_to_dict_is_nested_and_from_dict_reads_it_back(tmp_path):
    config = PTIConfig(**PATHS, lora_rank=2, use_template="style", templates=["a {}"], color_jitter=True)
    saved = config.to_dict()
    assert set(SECTIONS) <= set(saved) and saved["lora"]["r"] == 2 and saved["data"]["color_jitter"] is True
    assert "lora_rank" not in saved and saved["use_template"] == "style"
    assert PTIConfig.from_dict(json.loads(json.dumps(saved))) == config
    # a nested YAML file, as a user writes one
    (tmp_path / "c.yaml").write_text(
        "placeholder_tokens: <s1>|<s2>\nlora:\n  r: 1\noptim:\n  lr_scheduler: cosine\nruntime:\n"
        "  pretrained_model_name_or_path: base\n  instance_data_dir: photos\n  output_dir: out\n"
    )
    loaded = PTIConfig.from_dict(load_config_file(tmp_path / "c.yaml"))
    assert loaded.lora.r == 1 and loaded.optim.lr_scheduler == "cosine" and loaded.placeholder_tokens == "<s1>|<s2>"
    assert loaded.flat_dict()["lora_rank"] == 1


def test_unknown_and_misplaced_options_are_named():
    with pytest.raises(ValueError, match=r"unknown PTIConfig option\(s\): \['lora.rank', 'lora_rnak'\]"):
        PTIConfig(**PATHS, lora_rnak=2, lora={"rank": 2})
    with pytest.raises(ValueError, match=r"\['lora.resolution'\]"):  # an option of another section
        PTIConfig(**PATHS, lora={"resolution": 64})
    with pytest.raises(ValueError, match="lora must be a mapping of its options"):
        PTIConfig(**PATHS, lora=4)
    with pytest.raises(ValueError, match="unknown DreamBoothConfig option"):  # a PTI option
        DreamBoothConfig(**PATHS, instance_prompt="a sks dog", placeholder_tokens="<s>")
    # validation names the flag a user types, whichever way the value came
    with pytest.raises(ValueError, match="lora_rank=0"):
        PTIConfig(**PATHS, lora={"r": 0})
    with pytest.raises(ValueError, match="lora_dropout_p=1.5"):
        PTIConfig(**PATHS, lora_dropout_p=1.5)


def test_the_original_mask_flags_are_aliases_of_use_masks():
    for alias in ALIASES:
        assert PTIConfig(**PATHS, **{alias: True}).data.use_masks
        assert PTIConfig.from_dict({**PATHS, "data": {alias: True}}).data.use_masks


def test_every_option_has_one_flat_name_and_lives_in_one_place():
    for cls in (TrainConfig, PTIConfig, DreamBoothConfig):
        names = [o.name for o in options(cls)]
        assert len(names) == len(set(names)), cls
        assert {o.section for o in options(cls)} == {"", *SECTIONS}
    # the LoRA section speaks peft's vocabulary; the original flags name it
    lora = {o.field.name: o.name for o in options(PTIConfig) if o.section == "lora"}
    assert lora["r"] == "lora_rank" and lora["lora_dropout"] == "lora_dropout_p" and lora["lora_alpha"] == "lora_alpha"
    keys = {o.name: o.key for o in options(DreamBoothConfig)}
    assert (
        keys["class_data_dir"] == "runtime.class_data_dir" and keys["learning_rate_unet"] == "optim.learning_rate_unet"
    )


def test_a_resumed_run_may_change_the_runtime_section_and_nothing_else():
    config = DreamBoothConfig(**PATHS, instance_prompt="a sks dog", class_data_dir="class")
    saved = resumable_config(config)
    runtime = {f.name for f in dataclasses.fields(config.runtime)}
    assert runtime and not runtime & set(saved), "a runtime option is recorded as resumable"
    assert len(saved) == len(options(DreamBoothConfig)) - len(runtime)
    moved = dataclasses.replace(
        config,
        runtime=dataclasses.replace(config.runtime, output_dir="elsewhere", class_data_dir="c2", device="cpu"),
    )
    assert resume_changes(saved, moved) == []
    changed = DreamBoothConfig(**PATHS, instance_prompt="a sks dog", class_data_dir="class", lora_rank=8, seed=1)
    assert resume_changes(saved, changed) == ["lora_rank", "seed"]
    # a checkpoint written before an option existed matches while the option keeps its default
    older = {k: v for k, v in saved.items() if k != "noise_offset"}
    assert resume_changes(older, config) == []
    assert resume_changes(older, dataclasses.replace(config, optim={"noise_offset": 0.1})) == ["noise_offset"]
