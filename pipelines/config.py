"""Pipeline configuration: YAML validated by pydantic, with ``--set`` overrides.

The shape is::

    name: basic
    input: {format: webdataset, paths: [...], storage_options: {...}}
    output: {path: ..., storage_options: {...}}
    operators:
      - decode: {max_pixels: 89478485}
      - min_side: {min: 64}
    ray: {address: null}

Unknown keys are rejected everywhere; errors name the file, the dotted key and the value.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from operators.base import registry
from ground.errors import ConfigError
from pipelines.select.config import SelectConfig

# Keys inside storage_options whose values never leave the driver in clear text.
SECRET_KEYS = ("key", "secret", "token", "password", "session_token", "aws_access_key_id",
               "aws_secret_access_key", "aws_session_token", "access_key", "secret_key")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(StrictModel):
    """Where the shards are and how to read them."""

    format: Literal["webdataset", "parquet", "imagefolder", "coco"]
    paths: list[str] = Field(min_length=1, description="URLs, brace ranges {00000..00099} and globs")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    block_rows: int = Field(256, ge=1, description="rows per block a read task emits")
    read_concurrency: int | None = Field(None, ge=1, description="max read tasks at once (default: Ray decides)")
    # parquet
    image_column: str = "image"
    text_column: str | None = "text"
    id_column: str | None = None
    # imagefolder / coco
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"])
    images_prefix: str | None = Field(None, description="coco: folder/URL the file_name entries are relative to")
    coco_rows: Literal["per_caption", "per_image"] = "per_caption"
    coco_images_per_shard: int = Field(1000, ge=1)
    # shard outcomes and incremental runs (README: "Unattended nightly runs")
    read_attempts: int = Field(5, ge=1, description="re-opens at the broken byte offset before a read fails")
    shard_retries: int = Field(2, ge=0, description="in-run retries of failed shards, with backoff")
    shard_retry_backoff_s: float = Field(5.0, ge=0, description="wait before the first in-run retry; doubles")
    quarantine_after: int = Field(3, ge=1, description="consecutive failed runs before a shard is quarantined")
    on_change: Literal["report", "redo", "ignore"] = Field(
        "report", description="a committed shard whose size/ETag changed: warn, redo it, or do not check")

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class OutputConfig(StrictModel):
    """Where enriched Parquet, rejects and the ledger go."""

    path: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    target_file_size_mb: float = Field(256.0, gt=0, description="upper bound for one Parquet file")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    compression_level: int | None = 3
    image_compression: Literal["none", "zstd", "snappy", "gzip"] = Field(
        "none", description="codec of the image bytes (already-compressed JPEG/PNG/WebP files)")
    rejected_image_bytes: bool = Field(False, description="keep image bytes in rejected/ rows")
    write_batch_rows: int = Field(2048, ge=1, description="rows a writer task gathers before writing")
    lock_ttl_s: float = Field(600.0, gt=0, description="a run lock not renewed for this long is taken over")


class RayConfig(StrictModel):
    """How to reach Ray. ``address: null`` starts a local Ray on this machine."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local Ray only")
    object_store_memory_mb: int | None = Field(None, ge=64, description="local Ray only")
    no_progress_timeout_s: float = Field(600.0, gt=0, description="a stalled plan becomes an error")
    connect_timeout_s: float = Field(60.0, gt=0, description="give up connecting to ray.address after this")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand: resource checks warn, not fail")


class SubmitConfig(StrictModel):
    """How ``mmcurate submit`` packages the run as a Ray job (``mmcurate run`` ignores it).

    Either ``pip`` (installed on top of the cluster's Python; the project's packages are
    shipped with the job) or ``image`` (a container that already has mmcurate installed).
    """

    pip: list[str] = Field(default_factory=list, description="pip requirements the job installs")
    image: str | None = Field(None, description="container image the job runs in (Ray's image_uri)")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of the job's processes")
    entrypoint_num_cpus: float | None = Field(None, ge=0, description="CPUs reserved for the driver")


class PipelineConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputConfig
    output: OutputConfig
    operators: list[dict[str, Any]] = Field(default_factory=list)
    ray: RayConfig = Field(default_factory=RayConfig)
    submit: SubmitConfig = Field(default_factory=SubmitConfig)
    select: SelectConfig | None = Field(None, description="phase 2, run after this pipeline (README: Curation)")

    @model_validator(mode="after")
    def _validate_operators(self) -> "PipelineConfig":
        for i, entry in enumerate(self.operators):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"operators[{i}] must be a mapping with exactly one operator name")
        if self.submit.image and self.submit.pip:
            # Checked here, not on SubmitConfig, so the error does not echo submit.env_vars.
            raise ValueError("submit.pip cannot be combined with submit.image (Ray runs the image as is: "
                             "install the requirements into the image)")
        return self

    def operator_specs(self) -> list[tuple[str, BaseModel]]:
        """(name, validated operator config) for each configured operator, in order."""
        specs = []
        for entry in self.operators:
            (name, raw), = entry.items()
            op_cls = registry.get(name)
            specs.append((name, op_cls.Config.model_validate(raw or {})))
        return specs


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _value_at(data: Any, loc: tuple) -> Any:
    cur = data
    for part in loc:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def validate(data: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    """Validate a config mapping, including each operator's own config.

    Raises:
        ConfigError: one line naming ``source``, the dotted key and the bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, data, source, prefix=()) from None
    for i, entry in enumerate(cfg.operators):
        (name, raw), = entry.items()
        if name not in registry.names():
            raise ConfigError(
                f"{source}: operators[{i}]: unknown operator {name!r} "
                f"(known: {', '.join(sorted(registry.names()))})")
        try:
            registry.get(name).Config.model_validate(raw or {})
        except ValidationError as exc:
            raise config_error(exc, raw or {}, source, prefix=("operators", i, name)) from None
    return cfg


def config_error(exc: ValidationError, data: Any, source: str, prefix: tuple) -> ConfigError:
    """One-line ConfigError for a pydantic error: the file, the dotted key and the offending value."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _loc(prefix + loc)
    value = _value_at(data, loc)
    if err["type"] == "extra_forbidden":
        msg = f"unknown key {key!r}"
    elif err["type"] == "missing":
        msg = f"missing key {key!r}"
    elif not key:
        # A whole-document check: its value is the entire config (storage options included).
        msg = err["msg"].removeprefix("Value error, ")
    else:
        msg = f"{key}={value!r}: {err['msg']}"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return ConfigError(f"{source}: {msg}{more}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=VALUE`` overrides; VALUE is parsed as YAML.

    ``operators.1.min_side.min=128`` indexes into lists by position.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
        parts = key.strip().split(".")
        cur: Any = data
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(cur, list):
                if not part.isdigit() or int(part) >= len(cur):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of {'.'.join(parts[:j])}")
                if last:
                    cur[int(part)] = value
                else:
                    cur = cur[int(part)]
            elif isinstance(cur, dict):
                if last:
                    cur[part] = value
                else:
                    if cur.get(part) is None:
                        cur[part] = {}
                    cur = cur[part]
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:j])} is not a mapping")
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, override and validate a pipeline YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    data = apply_overrides(data, overrides or [])
    return validate(data, source=str(path))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with secret-looking storage options replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: ("***" if str(k).lower() in SECRET_KEYS and v is not None else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def public_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved config as stored in run folders and metadata: secrets redacted."""
    return redact(cfg.model_dump(mode="json"))


def _without_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return {k: _without_key(v, key) for k, v in obj.items() if k != key}
    if isinstance(obj, list):
        return [_without_key(v, key) for v in obj]
    return obj


def config_hash(cfg: PipelineConfig) -> str:
    """Hash of what decides the output rows: input format and columns, operators, output format.

    Storage options, paths, batching and Ray settings are excluded: credentials must never
    leak into it, a nightly run over new shards is the same job, and moving the job to another
    cluster does not change its results.
    """
    d = cfg.model_dump(mode="json")
    # Where shards are (a nightly run sees new paths), how they are batched and how big
    # files get do not change which rows come out or what they hold.
    for key in ("storage_options", "paths", "block_rows", "read_concurrency", "read_attempts", "shard_retries",
                "shard_retry_backoff_s", "quarantine_after", "on_change"):
        d["input"].pop(key, None)
    for key in ("storage_options", "path", "write_batch_rows", "target_file_size_mb", "lock_ttl_s"):
        d["output"].pop(key, None)
    d.pop("ray", None)
    d.pop("submit", None)  # how a job is packaged does not change its rows
    d.pop("select", None)  # phase 2 re-tunes without touching phase-1 rows
    d = _without_key(d, "storage_options")  # model operators take them too
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
