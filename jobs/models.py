"""``mmcurate models``: copy a pipeline's models to object storage so workers load them offline.

``mmcurate models prefetch CONFIG --to s3://bucket/models`` resolves every model the config
names (HF ids through the hub client and its cache, local folders, object-storage prefixes),
copies the files under ``--to/<name>/`` and writes ``mmcurate_manifest.json`` last (source
id, revision, resolved commit, sha256 of each weight file). Point the config at the copies
(``--write-config`` writes that config) and run with ``HF_HUB_OFFLINE=1``: each node stages
the copy once, and the Parquet metadata records the digests from the manifest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from operators.models import loading
from operators.models.base import ModelConfig
from operators.models.heads import HeadConfig
from ground.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

models_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Stage the models a pipeline uses (prefetch to object storage or a local folder).")

# Hub files never copied unless the operator allows pickle weights.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite"]


@dataclass
class ModelRef:
    """One model reference in a pipeline config: ``operators[index][op][field]``."""

    index: int
    op: str
    field: str
    ref: str
    revision: str | None
    storage_options: dict[str, Any]
    allow_pickle: bool
    trust_remote_code: bool


def model_refs(cfg) -> list[ModelRef]:
    """Every model or head-weights reference in a validated pipeline config, in operator order."""
    refs = []
    for i, (name, op_cfg) in enumerate(cfg.operator_specs()):
        if isinstance(op_cfg, ModelConfig):
            refs.append(ModelRef(i, name, "model", op_cfg.model, op_cfg.revision, op_cfg.storage_options,
                                 op_cfg.allow_pickle, op_cfg.trust_remote_code))
        elif isinstance(op_cfg, HeadConfig):
            refs.append(ModelRef(i, name, "weights", op_cfg.weights, None, op_cfg.storage_options,
                                 op_cfg.allow_pickle, False))
    return refs


def slug(ref: ModelRef) -> str:
    """Folder name of a model under ``--to``: ``org--name@rev`` for hub ids, else the base name."""
    if loading.kind_of(ref.ref) == "hub":
        return ref.ref.replace("/", "--") + (f"@{ref.revision}" if ref.revision else "")
    return ref.ref.rstrip("/").rsplit("/", 1)[-1]


def local_source(ref: ModelRef) -> tuple[Path, str | None]:
    """(local folder or file holding the model, resolved hub commit or None). Fetches hub ids."""
    kind = loading.kind_of(ref.ref)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        ignore = None if ref.allow_pickle else PICKLE_PATTERNS
        try:
            path = Path(snapshot_download(ref.ref, revision=ref.revision, ignore_patterns=ignore))
        except Exception as exc:  # noqa: BLE001 - offline without cache, unknown id, auth
            raise StorageError(f"cannot fetch {ref.ref}@{ref.revision or 'main'} from the hub: "
                               f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return path, path.name
    path = Path(loading.resolve_local(ref.ref, ref.storage_options))
    if not path.exists():
        raise ConfigError(f"operators[{ref.index}].{ref.op}.{ref.field}: {ref.ref} does not exist")
    return path, None


def prefetch_one(ref: ModelRef, to: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy one model under ``to`` and write its manifest last; returns the manifest (with ``url``)."""
    from ground.storage import filesystem, join

    src, commit = local_source(ref)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file() and ".cache" not in p.parts)
    if not ref.allow_pickle:
        files = [p for p in files if not p.name.endswith(loading.PICKLE_SUFFIXES)]
    dest = join(to, slug(ref))
    fs, dest_path = filesystem(dest, storage_options)
    if src.is_dir():
        fs.makedirs(dest_path, exist_ok=True)
    for f in files:
        rel = f.name if src.is_file() else str(f.relative_to(src))
        target = dest_path if src.is_file() else dest_path.rstrip("/") + "/" + rel
        if src.is_dir() and "/" in rel:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(f), target)
    manifest = {
        "model": ref.ref, "revision": ref.revision, "commit": commit,
        "files": loading.digest_dir(src) if src.is_file() else
        {str(p.relative_to(src)): loading.sha256_file(p) for p in files if p.name.endswith(loading.WEIGHT_SUFFIXES)},
        "random_weights": loading.is_random(src),
        "prefetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if src.is_dir():  # a single weights file is its own manifest-less object; directories get one
        with fs.open(dest_path.rstrip("/") + "/" + loading.MANIFEST, "wb") as fh:
            fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return {**manifest, "url": dest}


def rewritten_config(config_path: Path, overrides: list[str], urls: dict[tuple[int, str, str], str]) -> dict[str, Any]:
    """The config's YAML data with each prefetched reference replaced by its copy."""
    from pipelines import config as config_mod

    data = config_mod.apply_overrides(yaml.safe_load(config_path.read_text()) or {}, overrides)
    for (i, op, field), url in urls.items():
        data["operators"][i][op][field] = url
    return data


@models_app.command()
def prefetch(config: Path = typer.Argument(..., help="pipeline YAML"),
             to: str = typer.Option(..., "--to", help="destination: s3://bucket/models, gs://..., or a local folder"),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="override: dotted.key=YAML value"),
             storage_options: Optional[str] = typer.Option(None, "--storage-options",
                                                           help="JSON fsspec options for --to (default: AWS chain)"),
             write_config: Optional[Path] = typer.Option(None, "--write-config",
                                                         help="write the config pointing at the copies here")) -> None:
    """Copy every model the pipeline names to --to; workers then load from there offline."""
    from pipelines import config as config_mod

    cfg = config_mod.load(config, set_ or [])
    opts = json.loads(storage_options) if storage_options else {}
    refs = model_refs(cfg)
    if not refs:
        typer.echo(f"{config}: no model operators")
        return
    urls = {}
    for ref in refs:
        man = prefetch_one(ref, to, opts)
        urls[(ref.index, ref.op, ref.field)] = man["url"]
        note = " (random weights)" if man["random_weights"] else ""
        typer.echo(f"{ref.ref}{'@' + ref.revision if ref.revision else ''} -> {man['url']}  "
                   f"[{len(man['files'])} weight file(s)]{note}")
    for (i, op, field), url in urls.items():
        typer.echo(f"  --set operators.{i}.{op}.{field}={url}")
    if write_config:
        write_config.write_text(yaml.safe_dump(rewritten_config(config, set_ or [], urls), sort_keys=False))
        typer.echo(f"wrote {write_config}")
