"""Base models for the steps: a hub id, a local diffusers folder, an `s3://` prefix holding one, or a one-file
checkpoint (a local `.safetensors` / `.ckpt` file or such an `s3://` object) with the diffusers folder or hub
id of its architecture as its config (`--base-model-config`).

`s3://` models are downloaded once into `$LORA_PIPELINE_CACHE/models/<content sha256>/`; an index maps
the prefix's object listing (names, sizes, ETags) to that content hash, so a second step on the same
machine finds the model without downloading it again, and a changed prefix is downloaded afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .artifacts import (
    Store,
    describe_files,
    fetch,
    listing_hash,
    parse_uri,
    read_manifest,
)


def cache_root() -> Path:
    return Path(os.environ.get("LORA_PIPELINE_CACHE") or Path.home() / ".cache" / "lora-pipeline")


@dataclass
class BaseModel:
    """A base model ready for `lora_ops.load_pipeline`.

    Args:
        ref: what the user passed (recorded in metadata, so serving can find the same model).
        path: a local folder, a hub id or a local one-file checkpoint to load from.
        sha256: content hash (hub ids: the id itself, hashed; they are not downloaded here).
        config: for a one-file checkpoint, the resolved model its configs and tokenizer come from
            (`load_pipeline`'s `config`); None otherwise.
    """

    ref: str
    path: str
    sha256: str
    config: BaseModel | None = None

    def lineage(self) -> dict[str, str]:
        out = {"uri": self.ref, "sha256": self.sha256}
        if self.config is not None:
            out |= {"config": self.config.ref, "config_sha256": self.config.sha256}
        return out

    @property
    def config_path(self) -> str | None:
        return self.config.path if self.config is not None else None


def resolve_base_model(
    ref: str, store: Store | None = None, cache: str | Path | None = None, config: str | None = None
) -> BaseModel:
    """Make `ref` loadable locally; raises ValueError naming `--base-model` when it is none of the above.

    Args:
        config: for a one-file checkpoint: a hub id, diffusers folder or `s3://` prefix of the same
            architecture (its configs and tokenizer); refused for any other base.
    """
    if not ref:
        raise ValueError("--base-model: empty")
    single = ref.lower().endswith(CHECKPOINT_SUFFIXES)
    if config and not single:
        raise ValueError(f"--base-model-config is for one-file checkpoints; --base-model={ref} is not one")
    if single:
        base = _single_file(ref, store, Path(cache) if cache else cache_root())
        if config:
            base.config = resolve_base_model(config, store, cache)
        return base
    if ref.startswith("s3://"):
        return _from_s3(ref, store, Path(cache) if cache else cache_root())
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith(("/", ".", "~", "file://")):
        path = parse_uri(ref, "--base-model").key if ref.startswith("file://") else path
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--base-model={ref}: not a diffusers model folder (no model_index.json)")
        return BaseModel(ref, str(path.resolve()), _folder_hash(path))
    if ref.count("/") == 1 and " " not in ref:
        return BaseModel(ref, ref, hashlib.sha256(f"hub:{ref}".encode()).hexdigest())
    raise ValueError(
        f"--base-model={ref!r}: not an s3:// prefix, an existing diffusers folder, a one-file checkpoint "
        "(.safetensors/.ckpt) or a hub id 'org/name'"
    )


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def _single_file(ref: str, store: Store | None, cache: Path) -> BaseModel:
    """A one-file checkpoint: a local file (hashed), or an `s3://` object downloaded once into the cache."""
    from lora_ops.hashing import sha256_file

    if not ref.startswith("s3://"):
        path = Path(parse_uri(ref, "--base-model").key if ref.startswith("file://") else ref).expanduser()
        if not path.is_file():
            raise ValueError(f"--base-model={ref}: no such checkpoint file")
        return BaseModel(ref, str(path.resolve()), sha256_file(path))
    loc = parse_uri(ref, "--base-model")
    store = store or Store.for_uri(loc)
    name = loc.key.rsplit("/", 1)[-1]
    etag = next((e for e in _etags(store, loc) if e.rsplit(" ", 1)[0] == loc.key), None)
    if etag is None:
        raise FileNotFoundError(f"--base-model={ref}: no such object")
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    index_file = models / "index.json"
    key = hashlib.sha256(json.dumps([ref, etag]).encode()).hexdigest()
    cached = (json.loads(index_file.read_text()) if index_file.is_file() else {}).get(key)
    if cached and (models / cached / name).is_file():
        return BaseModel(ref, str(models / cached / name), cached)

    def download(tmp: Path) -> str:
        store.get_file(loc, tmp / name)
        return sha256_file(tmp / name)

    digest = _into_cache(models, download)
    _remember(index_file, key, digest)
    return BaseModel(ref, str(models / digest / name), digest)


def _into_cache(models: Path, download) -> str:
    """Run `download(tmp)` (fills a fresh folder, returns its content hash) and move the folder to
    `models/<hash>` (kept if it is there already); a failed download leaves nothing behind."""
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=models))
    try:
        digest = download(tmp)
        final = models / digest
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return digest


def _remember(index_file: Path, key: str, digest: str) -> None:
    """Record `key` -> `digest` in the cache index (written atomically)."""
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    index[key] = digest
    tmp_index = index_file.with_suffix(f".{os.getpid()}.tmp")
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, index_file)


def _folder_hash(path: Path) -> str:
    """Content hash of a local model folder, memoised next to nothing: a small sidecar keyed by size+mtime."""
    stamp_src = sorted(
        (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()
    )
    stamp = hashlib.sha256(json.dumps(stamp_src).encode()).hexdigest()
    memo = cache_root() / "folder-hashes" / stamp
    if memo.is_file():
        return memo.read_text().strip()
    digest = listing_hash(describe_files(path))
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def _from_s3(ref: str, store: Store | None, cache: Path) -> BaseModel:
    loc = parse_uri(ref, "--base-model").as_prefix()
    store = store or Store.for_uri(loc)
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    found = read_manifest(loc, store)
    if found is not None:
        _, listing_key = found  # a published model: its manifest hash names the content
    else:
        objects = store.list(loc)
        if not objects:
            raise FileNotFoundError(f"--base-model={ref}: nothing there")
        etags = _etags(store, loc)
        listing_key = hashlib.sha256(json.dumps([str(loc), objects, etags]).encode()).hexdigest()
    index_file = models / "index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    cached = index.get(listing_key)
    if cached and (models / cached / "model_index.json").is_file():
        return BaseModel(ref, str(models / cached), cached)

    def download(tmp: Path) -> str:
        fetched = fetch(ref, tmp, store, name="--base-model")
        if not (tmp / "model_index.json").is_file():
            raise ValueError(f"--base-model={ref}: not a diffusers model folder (no model_index.json)")
        return fetched.sha256

    digest = _into_cache(models, download)
    _remember(index_file, listing_key, digest)
    return BaseModel(ref, str(models / digest), digest)


def _etags(store: Store, loc) -> list[str]:
    return sorted(
        f"{o.object_name} {o.etag}"
        for o in store._retry(
            lambda: list(store.client.list_objects(loc.bucket, loc.key, recursive=True)), f"list {loc}"
        )
    )
