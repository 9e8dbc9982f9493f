"""Step inputs and outputs on an S3-compatible object store (minio SDK) or a local directory.

A step output is a prefix (`s3://bucket/runs/<run_id>/<step>/` or a local folder) whose `manifest.json`
is written last and lists every file with its size and sha256, the inputs with their hashes, the
parameters and the package versions. A reader trusts a prefix only through its manifest, and checks every
file it downloads against it. Endpoint, credentials and region come from the environment only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from lora_ops.hashing import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lora-pipeline/manifest/v1"
# the hash of the raw dataset a run started from, carried forward by every manifest of the run (preprocess
# records its input's hash; each later step copies it from its inputs) and tagged on the registered version
SOURCE_DATASET = "source_dataset_sha256"
SHA256_META = "sha256"  # user metadata key every published object carries (x-amz-meta-sha256)
PUBLISH_ROUNDS = 6  # how often `publish` re-uploads when a concurrent attempt interleaved with it
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part
PART_SIZE = 16 * 1024 * 1024  # files above this are uploaded in parts of this size
T = TypeVar("T")

# S3 error codes that mean "the request was fine, the server could not serve it now"
TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "ServerError",
}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}


class StorageError(RuntimeError):
    """The object store could not be reached or kept failing after every retry (retrying later may help)."""


class CredentialsError(ValueError):
    """The object store rejected the credentials from the environment."""


class IntegrityError(ValueError):
    """A prefix is incomplete or a file does not match its manifest."""


# ---------------------------------------------------------------------------------------------------------
# configuration and URIs


@dataclass(frozen=True)
class StoreConfig:
    """Where the object store is and how to sign requests (from the environment, see `from_env`).

    Args:
        endpoint: `host:port` without scheme.
        secure: TLS on (`https://` endpoint).
        access_key, secret_key: credentials; never printed (`repr` hides them).
        region: optional region name.
        attempts: tries per request before giving up (transient errors only).
        backoff: first wait in seconds; doubles after every failed try up to `max_backoff`.
        part_size: multipart part size in bytes (files above it are uploaded in parts).
        read_timeout: seconds a request may wait for the server's answer before it counts as a transient
            failure and is retried (a frozen server, a stalled connection).
    """

    endpoint: str
    secure: bool
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str | None = None
    attempts: int = 6
    backoff: float = 0.5
    max_backoff: float = 8.0
    part_size: int = PART_SIZE
    read_timeout: float = 120.0

    def __post_init__(self):
        if not self.read_timeout > 0:
            raise ValueError(f"read_timeout={self.read_timeout!r} must be > 0 seconds")
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts!r} must be >= 1")
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size={self.part_size!r} must be at least {MIN_PART_SIZE} (S3 minimum)")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> StoreConfig:
        env = dict(os.environ if env is None else env)
        url = env.get("S3_ENDPOINT_URL") or "https://s3.amazonaws.com"
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"S3_ENDPOINT_URL={url!r} must look like http://host:port or https://host")
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise CredentialsError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set in the environment to use s3:// URIs"
            )
        kwargs: dict[str, Any] = {}
        for field_name, var, kind in (("attempts", "LORA_PIPELINE_S3_ATTEMPTS", int),
                                      ("read_timeout", "LORA_PIPELINE_S3_READ_TIMEOUT", float)):  # fmt: skip
            if env.get(var):
                try:
                    kwargs[field_name] = kind(env[var])
                except ValueError:
                    raise ValueError(f"{var}={env[var]!r} must be a {kind.__name__}") from None
        kwargs.update(overrides)
        return cls(
            endpoint=parsed.netloc,
            secure=parsed.scheme == "https",
            access_key=key,
            secret_key=secret,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            **kwargs,
        )

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


@dataclass(frozen=True)
class Location:
    """A parsed URI: `s3://bucket/key` or a local path. S3 prefixes are normalised to end with `/`."""

    scheme: str  # "s3" | "file"
    bucket: str
    key: str  # s3: object key or prefix; file: absolute path

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key

    def join(self, name: str) -> Location:
        if self.scheme == "s3":
            return Location("s3", self.bucket, self.key.rstrip("/") + "/" + name if self.key else name)
        return Location("file", "", str(Path(self.key) / name))

    def as_prefix(self) -> Location:
        if self.scheme == "s3":
            return Location("s3", self.bucket, self.key.rstrip("/") + "/" if self.key.strip("/") else "")
        return self


def parse_uri(uri: str | Path, name: str = "uri") -> Location:
    """`s3://bucket/prefix`, `file:///path` or a local path. Raises ValueError naming `name` for bad URIs."""
    text = str(uri)
    if not text:
        raise ValueError(f"{name}: empty URI")
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"{name}={text!r}: an s3:// URI needs a bucket (s3://bucket/prefix/)")
            return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
        if parsed.scheme == "file":
            return Location("file", "", str(Path(parsed.path).resolve()))
        raise ValueError(f"{name}={text!r}: unsupported scheme {parsed.scheme!r} (use s3://bucket/prefix/ or a path)")
    return Location("file", "", str(Path(text).expanduser().resolve()))


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def _is_uri(text: str) -> bool:
    """An s3:// or file:// URI, or a local path that exists (a hub id such as `org/model` is neither)."""
    return "://" in text or Path(text).expanduser().exists()


def overlaps(a: Location, b: Location) -> bool:
    """Whether one of two prefixes is, contains or lies inside the other."""
    if a.scheme != b.scheme or a.bucket != b.bucket:
        return False
    if a.scheme == "s3":
        ka, kb = a.as_prefix().key, b.as_prefix().key
        return ka.startswith(kb) or kb.startswith(ka)
    from lora_ops.outputs import overlaps as paths_overlap  # stdlib only: fine in the Airflow image

    return paths_overlap(a.key, b.key)


def refuse_overlap(out: str | Path | None, inputs: dict[str, str | Path | Iterable[str | Path] | None]) -> None:
    """Refuse an output prefix that equals, contains or lies inside any input prefix ({flag: uri(s)}).

    Called by every step before it reads or writes anything: writing into an input would overwrite the
    user's data, and the next retry would find inputs that changed under it.
    """
    if not out:
        return
    where = parse_uri(out, "--out")
    for flag, uris in inputs.items():
        for uri in [uris] if isinstance(uris, (str, Path)) else (uris or []):
            if uri and _is_uri(str(uri)) and overlaps(where, parse_uri(uri, flag)):
                raise ValueError(
                    f"--out={out} overlaps the input {flag}={uri} (equal, inside or containing it): the step would "
                    "write into its own input; choose an output prefix outside every input (e.g. runs/<run_id>/<step>/)"
                )


RUN_LAYOUT = re.compile(r"(^|/)runs/[^/]+/[^/]+")


def in_run_layout(loc: Location) -> bool:
    """Whether a prefix lies in the pipeline's run layout (`runs/<run_id>/<step>/…`): only step outputs live there."""
    return loc.scheme == "s3" and bool(RUN_LAYOUT.search(loc.as_prefix().key))


# ---------------------------------------------------------------------------------------------------------
# retries


def _classify(exc: BaseException) -> str:
    """'transient', 'credentials', 'missing' or 'fatal' for an exception from the minio SDK or urllib3."""
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, S3Error):
        if exc.code in CREDENTIAL_CODES:
            return "credentials"
        if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchUpload", "ResourceNotFound"):
            return "missing"
        return "transient" if exc.code in TRANSIENT_CODES else "fatal"
    if isinstance(exc, ServerError):  # 5xx without an S3 error body
        return "transient"
    if isinstance(exc, InvalidResponseError):  # e.g. an HTML page from a restarting proxy
        return "transient"
    if isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError)):
        return "transient"
    return "fatal"


def retry(fn: Callable[[], T], what: str, config: StoreConfig, log: Callable[[str], None] | None = None) -> T:
    """Call `fn` until it succeeds, retrying transient errors with exponential backoff.

    Raises CredentialsError for rejected credentials, FileNotFoundError for missing objects and
    StorageError when every attempt failed.
    """
    from minio.error import S3Error

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wait = config.backoff
    for attempt in range(1, config.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            kind = _classify(exc)
            if kind == "credentials":
                raise CredentialsError(
                    f"{what}: the object store at {config.url} rejected the credentials "
                    f"({exc.code if isinstance(exc, S3Error) else exc}); check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY"
                ) from None
            if kind == "missing":
                raise FileNotFoundError(f"{what}: not found ({exc.code})") from None
            if kind == "fatal":
                raise
            if attempt == config.attempts:
                raise StorageError(
                    f"{what}: object store at {config.url} still failing after {attempt} attempts: {_short(exc)}"
                ) from None
            log(f"{what}: {_short(exc)}; retry {attempt}/{config.attempts - 1} in {wait:.1f}s")
            time.sleep(wait)
            wait = min(wait * 2, config.max_backoff)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------------------
# the store: the same operations on S3 and on a local folder


class Store:
    """Object operations with retries. One instance per process is enough; `Store.for_uri` picks it."""

    def __init__(self, config: StoreConfig | None = None):
        self.config = config
        self._client = None

    @classmethod
    def for_uri(cls, uri: str | Path | Location, config: StoreConfig | None = None) -> Store:
        loc = uri if isinstance(uri, Location) else parse_uri(uri)
        if loc.scheme == "s3":
            return cls(config or StoreConfig.from_env())
        return cls(None)

    @property
    def client(self):
        if self._client is None:
            import urllib3
            from minio import Minio

            cfg = self.config
            if cfg is None:
                raise ValueError("no object store configured for an s3:// URI")
            # No retries inside urllib3: `retry` owns the policy (and logs every retry).
            tls = {}
            if cfg.secure:
                import certifi

                tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("SSL_CERT_FILE") or certifi.where()}
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=10, read=cfg.read_timeout), retries=False, maxsize=8, **tls
            )
            self._client = Minio(
                cfg.endpoint,
                access_key=cfg.access_key,
                secret_key=cfg.secret_key,
                region=cfg.region,
                secure=cfg.secure,
                http_client=http,
            )
        return self._client

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what, self.config)

    # -- single objects ------------------------------------------------------------------------------------

    def ensure_bucket(self, loc: Location) -> None:
        if loc.scheme != "s3":
            return
        if not self._retry(lambda: self.client.bucket_exists(loc.bucket), f"s3://{loc.bucket}"):
            from minio.error import S3Error

            try:
                self._retry(lambda: self.client.make_bucket(loc.bucket), f"create bucket s3://{loc.bucket}")
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_file(self, src: str | Path, loc: Location, sha256: str | None = None) -> None:
        """Upload `src` to `loc`; `sha256` (of `src`) is kept as object metadata (see `stored_sha256`)."""
        if loc.scheme == "file":
            Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(loc.key).with_name(f".{Path(loc.key).name}.partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, loc.key)
            return
        meta = {SHA256_META: sha256} if sha256 else None
        # fput_object re-opens the file on every attempt; above part_size it uploads in parts
        # (a failed multipart upload is aborted by a later one with the same key or by bucket lifecycle).
        self._retry(
            lambda: self.client.fput_object(
                loc.bucket, loc.key, str(src), part_size=self.config.part_size, metadata=meta
            ),
            f"upload {loc}",
        )

    def stored_sha256(self, loc: Location) -> str | None:
        """The sha256 the object at `loc` was uploaded with (None when absent or uploaded without one).

        A local file is hashed; an S3 object is only stat-ed, so checking a whole prefix is cheap.
        """
        if loc.scheme == "file":
            return sha256_file(loc.key) if Path(loc.key).is_file() else None
        try:
            stat = self._retry(lambda: self.client.stat_object(loc.bucket, loc.key), f"stat {loc}")
        except FileNotFoundError:
            return None
        return {k.lower(): v for k, v in (stat.metadata or {}).items()}.get(f"x-amz-meta-{SHA256_META}")

    def put_bytes(self, data: bytes, loc: Location, content_type: str = "application/octet-stream") -> None:
        if loc.scheme == "file":
            Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(loc.key).with_name(f".{Path(loc.key).name}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, loc.key)
            return
        import io

        self._retry(
            lambda: self.client.put_object(loc.bucket, loc.key, io.BytesIO(data), len(data), content_type=content_type),
            f"upload {loc}",
        )

    def get_bytes(self, loc: Location) -> bytes:
        if loc.scheme == "file":
            path = Path(loc.key)
            if not path.is_file():
                raise FileNotFoundError(f"{loc}: no such file")
            return path.read_bytes()

        def read() -> bytes:
            resp = self.client.get_object(loc.bucket, loc.key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry(read, f"download {loc}")

    def get_file(self, loc: Location, dest: str | Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if loc.scheme == "file":
            if not Path(loc.key).is_file():
                raise FileNotFoundError(f"{loc}: no such file")
            shutil.copyfile(loc.key, dest)
            return
        # fget_object writes to a temporary name and renames when complete
        self._retry(lambda: self.client.fget_object(loc.bucket, loc.key, str(dest)), f"download {loc}")

    def exists(self, loc: Location) -> bool:
        if loc.scheme == "file":
            return Path(loc.key).is_file()
        try:
            self._retry(lambda: self.client.stat_object(loc.bucket, loc.key), f"stat {loc}")
            return True
        except FileNotFoundError:
            return False

    def remove(self, loc: Location) -> None:
        if loc.scheme == "file":
            Path(loc.key).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self._retry(lambda: self.client.remove_object(loc.bucket, loc.key), f"delete {loc}")

    def list(self, prefix: Location) -> list[tuple[str, int]]:
        """(relative path, size) of every object under `prefix`, sorted; hidden local temp files skipped."""
        prefix = prefix.as_prefix()
        if prefix.scheme == "file":
            root = Path(prefix.key)
            if not root.is_dir():
                return []
            return sorted(
                (p.relative_to(root).as_posix(), p.stat().st_size)
                for p in root.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )

        def listing():
            return [
                (o.object_name[len(prefix.key) :], o.size)
                for o in self.client.list_objects(prefix.bucket, prefix.key, recursive=True)
                if not o.is_dir
            ]

        try:
            return sorted(self._retry(listing, f"list {prefix}"))
        except FileNotFoundError:  # no such bucket
            return []


# ---------------------------------------------------------------------------------------------------------
# manifests


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lora-pipeline", "torch", "diffusers", "transformers", "peft", "safetensors", "minio", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def listing_hash(files: Iterable[dict[str, Any]]) -> str:
    """Content hash of a set of files: sha256 of the sorted `path size sha256` lines."""
    lines = sorted(f"{f['path']} {f['size']} {f['sha256']}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def describe_files(root: str | Path) -> list[dict[str, Any]]:
    """path/size/sha256 of every (non-hidden) file under `root`, sorted by path."""
    root = Path(root)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.as_posix() != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files.append({"path": rel.as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return files


def read_manifest(uri: str | Path | Location, store: Store | None = None) -> tuple[dict[str, Any], str] | None:
    """(manifest, sha256 of its bytes) of a prefix, or None when it has no manifest."""
    loc = (uri if isinstance(uri, Location) else parse_uri(uri)).as_prefix()
    store = store or Store.for_uri(loc)
    try:
        data = store.get_bytes(loc.join(MANIFEST))
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{loc.join(MANIFEST)}: not valid JSON; the prefix cannot be trusted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"{loc.join(MANIFEST)}: not a {MANIFEST_FORMAT} manifest")
    return manifest, hashlib.sha256(data).hexdigest()


# download folder -> the URI it came from, so that errors name what the user gave (see `local_names`)
_DOWNLOADS: dict[str, str] = {}


def local_names(text: str) -> str:
    """`text` with every download folder replaced by the URI it was fetched from."""
    for local in sorted(_DOWNLOADS, key=len, reverse=True):
        text = text.replace(local, _DOWNLOADS[local])
    return text


@dataclass
class Fetched:
    """A downloaded input: local folder, its manifest (None for a plain prefix) and its content hash."""

    uri: str
    path: Path
    sha256: str
    manifest: dict[str, Any] | None = None

    def lineage(self) -> dict[str, str]:
        """What a manifest records of this input: URI and hash, and the raw dataset hash it carries forward."""
        out = {"uri": self.uri, "sha256": self.sha256}
        source = (self.manifest or {}).get(SOURCE_DATASET)
        if source:
            out[SOURCE_DATASET] = source
        return out


def _inside(dest: Path, rel: str, uri: str) -> Path:
    """dest / rel, refusing object keys or manifest paths that would land outside `dest`."""
    target = (dest / rel).resolve()
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not target.is_relative_to(dest.resolve()):
        raise IntegrityError(f"{uri}: refusing file path {rel!r}: it points outside the download folder")
    return dest / rel


def fetch(
    uri: str | Path,
    dest: str | Path,
    store: Store | None = None,
    name: str = "input",
    require_manifest: bool = False,
    include: Callable[[str], bool] | None = None,
) -> Fetched:
    """Download a prefix into `dest` and check it.

    With a manifest, exactly the listed files are downloaded and every size and sha256 must match
    (IntegrityError otherwise); the hash is the manifest's sha256. Without one (a raw dataset or model
    folder) every object is downloaded and the hash is the listing hash of what arrived.

    Args:
        name: the flag the URI came from (named in errors).
        require_manifest: a prefix without manifest.json is an error (a step output that never finished).
        include: only files whose relative path passes are downloaded (and checked).
    """
    loc = parse_uri(uri, name).as_prefix()
    store = store or Store.for_uri(loc)
    dest = Path(dest)
    for form in {str(dest), str(dest.resolve())}:
        _DOWNLOADS[form.rstrip("/")] = str(loc).rstrip("/")
    found = read_manifest(loc, store)
    if found is None:
        if require_manifest or in_run_layout(loc):
            raise IntegrityError(
                f"{name}={uri}: no {MANIFEST} there, so it is not a completed step output "
                "(the step that writes it has not finished, or the URI is wrong)"
            )
        objects = [(p, s) for p, s in store.list(loc) if include is None or include(p)]
        if not objects:
            raise FileNotFoundError(f"{name}={uri}: nothing there")
        files = []
        for rel, size in objects:
            _inside(dest, rel, uri)
            store.get_file(loc.join(rel), dest / rel)
            files.append({"path": rel, "size": size, "sha256": sha256_file(dest / rel)})
        return Fetched(str(uri), dest, listing_hash(files), None)
    manifest, digest = found
    for entry in manifest["files"]:
        rel = entry["path"]
        if include is not None and not include(rel):
            continue
        target = _inside(dest, rel, uri)
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue  # already here (a retried step)
        store.get_file(loc.join(rel), target)
        check_file(target, entry, f"{loc.join(rel)}")
    return Fetched(str(uri), dest, digest, manifest)


def check_file(path: Path, entry: dict[str, Any], where: str) -> None:
    size = path.stat().st_size
    if size != entry["size"]:
        raise IntegrityError(
            f"{where}: size {size} does not match the manifest ({entry['size']}); the object was changed or "
            "truncated after publishing: re-run the step that wrote it"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise IntegrityError(
            f"{where}: sha256 {digest[:12]}… does not match the manifest ({entry['sha256'][:12]}…); the object was "
            "corrupted or replaced after publishing: re-run the step that wrote it"
        )


def verify(uri: str | Path, store: Store | None = None) -> dict[str, Any]:
    """Check a published prefix without keeping the files; returns its manifest."""
    with tempfile.TemporaryDirectory(prefix="lora-verify-") as tmp:
        fetched = fetch(uri, tmp, store, require_manifest=True)
    return fetched.manifest or {}


def find_completed(
    out: str | Path,
    step: str,
    inputs: dict[str, dict[str, str]],
    parameters: dict[str, Any],
    store: Store | None = None,
) -> dict[str, Any] | None:
    """The recorded result when `out` already holds this step's output for the same inputs and parameters.

    Returns None when there is no manifest (nothing done yet, or a crashed attempt). Raises ValueError when
    the manifest records other inputs or parameters: the caller must pick a new run id or output prefix.
    """
    loc = parse_uri(out, "--out").as_prefix()
    store = store or Store.for_uri(loc)
    found = read_manifest(loc, store)
    if found is None:
        return None
    manifest, digest = found
    if not _same_output(manifest, step, inputs, parameters):
        raise ValueError(
            f"--out={out}: already holds a {manifest.get('step')!r} output made from other inputs or parameters; "
            "use a new --run-id or another --out (outputs are never overwritten)"
        )
    return {**manifest.get("result", {}), "manifest_sha256": digest, "reused": True}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _same_output(manifest: dict[str, Any], step: str, inputs: dict[str, dict[str, str]], parameters: dict) -> bool:
    """Whether `manifest` records `step` run on the same inputs (by sha256) with the same parameters."""
    recorded_inputs = {k: v.get("sha256") for k, v in manifest.get("inputs", {}).items()}
    wanted_inputs = {k: v.get("sha256") for k, v in inputs.items()}
    return (
        manifest.get("step") == step
        and recorded_inputs == wanted_inputs
        and _canonical(manifest.get("parameters", {})) == _canonical(parameters)
    )


def _consistent(loc: Location, manifest: dict[str, Any], store: Store) -> bool:
    """Whether every file `manifest` lists is in the store with the sha256 it lists (by object metadata)."""
    return all(store.stored_sha256(loc.join(f["path"])) == f["sha256"] for f in manifest["files"])


def source_dataset(inputs: dict[str, dict[str, str]]) -> str | None:
    """The raw dataset hash behind a step's inputs: carried by an input that records one, else the hash of the
    `dataset` input itself (a raw dataset: the first step of a run)."""
    for lineage in inputs.values():
        if lineage.get(SOURCE_DATASET):
            return lineage[SOURCE_DATASET]
    return inputs.get("dataset", {}).get("sha256")


def run_prefix_of(step_out: str | Path) -> str:
    """The run prefix a step output lies in: `s3://b/runs/<run>/evaluate/` -> `s3://b/runs/<run>/` (every step
    of a run publishes to `<run prefix>/<step>[-<variant>]/`, docs/steps.md)."""
    loc = parse_uri(step_out).as_prefix()
    if loc.scheme == "s3":
        parent = loc.key.rstrip("/").rpartition("/")[0]
        return str(Location("s3", loc.bucket, parent + "/" if parent else ""))
    return str(Path(loc.key).parent)


def publish(
    local_dir: str | Path,
    out: str | Path,
    *,
    step: str,
    run_id: str,
    inputs: dict[str, dict[str, str]],
    parameters: dict[str, Any],
    result: dict[str, Any],
    store: Store | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload every file of `local_dir` under `out`, then write `manifest.json` last.

    Any manifest already there is removed first, so a prefix never looks complete while it is being
    written. Two attempts of one step may publish at once (an Airflow retry racing a zombie attempt), and
    their uploads can interleave: each attempt therefore reads the manifest back and checks every file it
    lists against the store (the sha256 each object was uploaded with), uploading again until the prefix
    is consistent. When the other attempt's manifest is the one that stands, its result is returned with
    `reused` true. Returns the result with `manifest_sha256` added.
    """
    loc = parse_uri(out, "--out").as_prefix()
    store = store or Store.for_uri(loc)
    store.ensure_bucket(loc)
    files = describe_files(local_dir)
    source = source_dataset(inputs)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": files,
        "inputs": inputs,
        "parameters": parameters,
        "versions": package_versions(),
        "result": result,
        **({SOURCE_DATASET: source} if source else {}),
        **(extra or {}),
    }
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    ours = hashlib.sha256(data).hexdigest()
    for round_ in range(PUBLISH_ROUNDS):
        if round_:
            time.sleep(random.uniform(0.2, 1.0) * round_)  # let the other attempt finish its round
        store.remove(loc.join(MANIFEST))
        for entry in files:
            store.put_file(Path(local_dir) / entry["path"], loc.join(entry["path"]), sha256=entry["sha256"])
        store.put_bytes(data, loc.join(MANIFEST), content_type="application/json")
        found = read_manifest(loc, store)
        if found is None:
            continue  # another attempt removed it to publish: check again after its round
        standing, digest = found
        if not _same_output(standing, step, inputs, parameters):
            raise ValueError(
                f"--out={out}: another {standing.get('step')!r} attempt with other inputs or parameters is "
                "publishing to the same prefix; use a new --run-id or another --out"
            )
        if _consistent(loc, standing, store):
            return {**standing.get("result", {}), "manifest_sha256": digest, "reused": digest != ours}
    raise IntegrityError(
        f"--out={out}: another attempt kept writing to the same prefix through {PUBLISH_ROUNDS} rounds of "
        "publishing; stop the other attempt and re-run the step"
    )


def uri_of(out: str | Path, rel: str) -> str:
    """URI of the file `rel` under the output prefix `out` (same form as `out`)."""
    return str(parse_uri(out).as_prefix().join(rel))
