"""The machinery of the trainers' configs: options with help text, sections, flat names, checks, files.

A config class (`config_class`) is a dataclass whose fields are its own options and its sections (dataclasses
of options, `section`). Each option has a nested name (`lora.r`) and one flat name (`lora_rank`: the field's
`flag`, else its field name); the constructor takes either, and the class's `ALIASES` (`{old name: flat
name}`) too. The section named `runtime` holds what a resumed run may change (`resumable_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIME = "runtime"


def option(default, help: str, flag: str | None = None):
    """A config field with its help text: `lora-ops train --help`, docs/training.md and the class docstring
    all read it from `field.metadata["help"]`. `flag` is its flat name (the CLI flag) where that differs from
    the field name (`lora.r` is `--lora_rank`)."""
    return dataclasses.field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


def section(cls, help: str):
    """A field holding one section of options (a dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def help_text(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


@dataclass(frozen=True)
class Option:
    """One option of a config class: the section holding it (`""`: the config itself) and its field."""

    section: str
    field: dataclasses.Field
    type: Any

    @property
    def name(self) -> str:
        """The flat name: the CLI flag (`--lora_rank`), a key of a flat config file."""
        return self.field.metadata.get("flag", self.field.name)

    @property
    def key(self) -> str:
        """The nested name: `lora.r`."""
        return f"{self.section}.{self.field.name}" if self.section else self.field.name

    @property
    def default(self):
        return self.field.default

    @property
    def help(self) -> str:
        return help_text(self.field)

    def get(self, config):
        return getattr(getattr(config, self.section) if self.section else config, self.field.name)


def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("section")}


@functools.cache
def options(cls) -> tuple[Option, ...]:
    """Every option of a config class, section by section (the order of `--help` and the docs)."""
    hints, sections = typing.get_type_hints(cls), _sections(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if f.name in sections:
            inner = typing.get_type_hints(sections[f.name])
            out += [Option(f.name, g, inner[g.name]) for g in dataclasses.fields(sections[f.name])]
        else:
            out.append(Option("", f, hints[f.name]))
    return tuple(out)


def _route(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of `cls` from flat names, aliases and nested sections (mappings or instances);
    later entries win. Unknown names are one ValueError naming them all."""
    sections, aliases = _sections(cls), getattr(cls, "ALIASES", {})
    by_name = {o.name: o for o in options(cls)}
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in sections}
    unknown = []
    for key, value in values.items():
        key = aliases.get(key, key)
        if key in sections:
            if isinstance(value, sections[key]):
                value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping of its options, not {value!r}")
            fields = {o.field.name: o for o in options(cls) if o.section == key}
            flags = {o.name: o for o in fields.values()}
            for inner, v in value.items():
                inner_name = aliases.get(inner, inner)
                o = fields.get(inner_name) or flags.get(inner_name)
                if o is None:
                    unknown.append(f"{key}.{inner}")
                else:
                    nested[key][o.field.name] = v
        elif key in by_name:
            o = by_name[key]
            if o.section:
                nested[o.section][o.field.name] = value
            else:
                out[o.field.name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {sorted(unknown)}")
    for name, section_cls in sections.items():
        out[name] = section_cls(**nested[name])
    return out


def document(cls):
    """Append an `Args:` section, built from the fields' help, to a config class's docstring."""
    own = [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
    lines = []
    for f in own:
        flag = f.metadata.get("flag")
        default = "" if f.metadata.get("section") else f" (default: {f.default!r})"
        lines.append(f"        {f.name}: {help_text(f)}{f' (flag `--{flag}`)' if flag else ''}{default}.")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


def config_class(cls):
    """A trainer's config: a documented dataclass whose constructor takes flat names and sections alike."""
    cls = document(dataclass(cls))
    names = [o.name for o in options(cls)]
    clashes = {n for n in names if names.count(n) > 1}
    if clashes:
        raise TypeError(f"{cls.__name__}: options share the flat name(s) {sorted(clashes)}")
    generated = cls.__init__

    def __init__(self, **values):
        generated(self, **_route(type(self), values))

    __init__.__doc__ = "Options by flat name (`lora_rank=4`) or by section (`lora=LoraSection(r=4)` or a mapping)."
    cls.__init__ = __init__
    return cls


def resumable_config(config) -> dict[str, Any]:
    """The options a checkpoint records and a resumption must repeat, by flat name: all but the runtime ones."""
    return {o.name: o.get(config) for o in options(type(config)) if o.section != RUNTIME}


def resume_changes(saved: Mapping[str, Any], config) -> list[str]:
    """The options that differ between a checkpoint's `resumable_config` and `config`, sorted; an option added
    after the checkpoint was written counts as unchanged while it has its default."""
    now = resumable_config(config)
    defaults = {o.name: o.default for o in options(type(config))}
    return sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def check_float(name: str, value, minimum: float = 0.0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a finite number >= {minimum}")


def check_bools(obj) -> None:
    for f in dataclasses.fields(obj):
        if f.type == "bool" and not isinstance(getattr(obj, f.name), bool):
            raise ValueError(f"{f.metadata.get('flag', f.name)}={getattr(obj, f.name)!r} must be true or false")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from a file (by extension; .yaml/.yml/.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"config file {path}: use a .yaml, .yml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: must hold a mapping of option: value")
    return data
