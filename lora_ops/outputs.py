"""Output folders: checked against the inputs, written in a staging folder beside the target, moved in whole.

`--overwrite` replaces only a folder this library wrote (its record file lists every file in it), so it
never deletes an input or anything a user put there; an output that is, contains or lies inside an input
is refused before anything is read or written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def overlaps(a: str | Path, b: str | Path) -> bool:
    """Whether one of two local paths is, contains or lies inside the other."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_disjoint(output: str | Path, inputs: Mapping[str, str | Path | Iterable[str | Path] | None],
                   name: str = "output_dir") -> None:  # fmt: skip
    """Refuse an output path that is, contains or lies inside any input path (inputs: {flag: path(s)})."""
    for flag, paths in inputs.items():
        if paths is None:
            continue
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            if path is not None and Path(path).exists() and overlaps(output, path):
                raise ValueError(
                    f"{name}={str(output)!r} overlaps the input {flag}={str(path)!r} (equal, inside or containing "
                    "it): writing there could overwrite or delete the input; choose an output folder outside it"
                )


def recorded_files(folder: Path, record: str) -> set[str] | None:
    """The files a record (JSON with "files": {path: …}, [path, …] or [{"path": …}, …]) lists, itself included;
    None when there is no readable record."""
    try:
        data = json.loads((folder / record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if isinstance(files, dict):
        names = set(files)
    elif isinstance(files, list):
        names = {f["path"] if isinstance(f, dict) else f for f in files}
    else:
        return None
    return {str(n) for n in names} | {record}


def check_output(output_dir: Path, overwrite: bool, record: str,
                 inputs: Mapping[str, str | Path | Iterable[str | Path] | None] | None = None) -> None:  # fmt: skip
    """Refuse an `output_dir` that overlaps an input, or that is not empty and may not be replaced.

    A non-empty `output_dir` is refused unless `overwrite`, and even then unless it is an earlier output
    whose `record` lists every file in it (nothing else is ever deleted).
    """
    output_dir = Path(output_dir)
    check_disjoint(output_dir, inputs or {})
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"output_dir={str(output_dir)!r} exists and is not a folder")
        present = {str(p.relative_to(output_dir)) for p in output_dir.rglob("*") if p.is_file()}
        if present and not overwrite:
            raise ValueError(f"output_dir={str(output_dir)!r} is not empty; pass overwrite=True (--overwrite)")
        if present:
            ours = recorded_files(output_dir, record)
            if ours is None:
                raise ValueError(
                    f"output_dir={str(output_dir)!r}: --overwrite replaces only a folder lora-ops wrote (with its "
                    f"{record}); this one has none, so nothing in it is deleted: empty it yourself or choose another"
                )
            foreign = sorted(present - ours)
            if foreign:
                raise ValueError(
                    f"output_dir={str(output_dir)!r} holds files lora-ops did not write ({foreign[:5]}"
                    f"{' …' if len(foreign) > 5 else ''}); --overwrite never deletes them: move them or choose "
                    "another folder"
                )


def prepare_output(output_dir: Path, overwrite: bool, record: str,
                   inputs: Mapping[str, str | Path | Iterable[str | Path] | None] | None = None) -> Path:  # fmt: skip
    """`check_output`, then a fresh staging folder beside `output_dir` (move it in with `publish_output`)."""
    output_dir = Path(output_dir)
    check_output(output_dir, overwrite, record, inputs)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))


def publish_output(staging: Path, output_dir: Path) -> None:
    """Move a finished staging folder to `output_dir`; an earlier output there (checked by `prepare_output`)
    is set aside first and removed only after the new one is in place."""
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / "previous")
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
