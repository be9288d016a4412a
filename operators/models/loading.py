"""Where model weights come from: HF ids, local folders, object-storage prefixes.

* ``resolve_local`` (in the actor) turns a model reference into something ``from_pretrained``
  loads: a local folder as is, an object-storage prefix staged once per node into a local
  cache (a file lock makes concurrent actors on one node wait for one copy), an HF id left
  to the hub client (which honours ``HF_HUB_OFFLINE`` and its own cache).
* ``model_provenance`` (on the driver) digests the weight files for the Parquet metadata,
  without fetching from the hub: hub ids are digested only when already in the local HF
  cache, object-storage prefixes through the manifest ``mmcurate models prefetch`` writes.

No torch import here: the driver uses this module to build file metadata.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from ground.errors import ConfigError

logger = logging.getLogger(__name__)

# Files whose bytes are the model; config/tokenizer files do not change what a digest proves.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Written by `mmcurate models prefetch` next to the copied files: {files: {name: sha256}, ...}.
MANIFEST = "mmcurate_manifest.json"
# Written by jobs/tiny_models.py: outputs from such a folder are labelled random weights.
RANDOM_WEIGHTS_MARKER = "mmcurate_random_weights.json"
_COMPLETE = ".mmcurate_complete"
# What an image processor loads (AutoImageProcessor.from_pretrained): a CPU prepare stage
# (operators.models.clip.ClipPrepare) stages only these from object storage, never the weights.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "config.json")
_HASH_CHUNK = 8 * 1024 * 1024


def cache_root() -> Path:
    """Per-node folder for staged models (``MMCURATE_MODEL_CACHE``, default ``~/.cache/mmcurate/models``)."""
    return Path(os.environ.get("MMCURATE_MODEL_CACHE") or Path.home() / ".cache" / "mmcurate" / "models")


def is_remote(ref: str) -> bool:
    """True for fsspec URLs other than local files (``s3://``, ``gs://``, ``hf://`` ...)."""
    return "://" in ref and not ref.startswith("file://")


def _strip_file(ref: str) -> str:
    return ref[len("file://"):] if ref.startswith("file://") else ref


def kind_of(ref: str) -> str:
    """``remote`` (object storage), ``local`` (a path that exists here) or ``hub`` (an HF id)."""
    if is_remote(ref):
        return "remote"
    path = _strip_file(ref)
    if ref.startswith(("/", ".", "~", "file://")) or os.path.exists(os.path.expanduser(path)):
        return "local"
    return "hub"


def _fs(url: str, storage_options: dict[str, Any]):
    from ground.storage import filesystem

    return filesystem(url, storage_options)


def read_manifest(url: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The prefetch manifest at an object-storage prefix, or None when there is none."""
    fs, path = _fs(url, storage_options)
    try:
        with fs.open(path.rstrip("/") + "/" + MANIFEST, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def stage(url: str, storage_options: dict[str, Any] | None = None, files: tuple[str, ...] | None = None) -> Path:
    """Copy an object-storage prefix (or one object) into the node cache once; return the local path.

    Concurrent callers on one node wait on a file lock; the copy lands in a temporary folder
    renamed into place, so a killed copy is never mistaken for a complete one. The cache key
    includes the manifest's digest, so a re-prefetch to the same URL is staged again. With
    ``files`` (base names), only those files of a prefix are copied, into a cache entry of their own.
    """
    from filelock import FileLock

    opts = storage_options or {}
    fs, path = _fs(url, opts)
    manifest = read_manifest(url, opts) if fs.isdir(path) else None
    only = "" if files is None else json.dumps(sorted(files))  # a partial copy is an entry of its own
    key = hashlib.sha1((url + json.dumps(manifest, sort_keys=True) + only).encode()).hexdigest()[:16]
    base = path.rstrip("/").rsplit("/", 1)[-1] or "model"
    dest = cache_root() / f"{base}-{key}"
    done = dest / _COMPLETE
    if done.exists():
        return _staged_target(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if done.exists():
            return _staged_target(dest)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if fs.isdir(path):
            for src in fs.find(path):
                rel = src[len(path.rstrip("/")) + 1:]
                if files is not None and rel.rsplit("/", 1)[-1] not in files:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(src, str(tmp / rel))
        else:
            fs.get_file(path, str(tmp / base))
            (tmp / ".single_file").write_text(base)
        (tmp / _COMPLETE).write_text(url)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        logger.info("staged %s into %s", url, dest)
    return _staged_target(dest)


def _staged_target(dest: Path) -> Path:
    single = dest / ".single_file"
    return dest / single.read_text() if single.exists() else dest


def missing_local(ref: str) -> str | None:
    """The path ``ref`` names when it is a local path that does not exist on this machine, else None."""
    if kind_of(ref) != "local":
        return None
    path = os.path.expanduser(_strip_file(ref))
    return None if os.path.exists(path) else path


def resolve_local(ref: str, storage_options: dict[str, Any] | None = None, files: tuple[str, ...] | None = None) -> str:
    """What ``from_pretrained`` (or a weights loader) should open for ``ref`` on this node
    (an object-storage model is staged whole, or only ``files`` of it: see :func:`stage`).

    Raises:
        ConfigError: ``ref`` is a local path that does not exist here (without this, transformers
            takes it for a hub id and fails with a message about repo id syntax).
    """
    kind = kind_of(ref)
    if kind == "remote":
        return str(stage(ref, storage_options, files))
    if kind == "local":
        if missing_local(ref):
            raise ConfigError(f"model {ref!r}: no such file or folder on {socket.gethostname()}")
        return os.path.expanduser(_strip_file(ref))
    return ref


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local HF cache snapshot of ``repo_id`` at ``revision``, or None. Never fetches."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): nothing to digest here
        return None


def weight_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_dir(root: Path) -> dict[str, str]:
    """{relative file name: sha256} for the weight files under ``root`` (or of ``root`` itself)."""
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {str(p.relative_to(root)): sha256_file(p) for p in weight_files(root)}


def is_random(root: Path) -> bool:
    """True for a folder built by jobs/tiny_models.py, or a safetensors file whose header says so."""
    if root.is_dir():
        return (root / RANDOM_WEIGHTS_MARKER).exists()
    if root.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(root), framework="numpy") as f:
            return (f.metadata() or {}).get("random_weights") == "true"
    return False


@functools.lru_cache(maxsize=64)
def _provenance_cached(ref: str, revision: str | None, opts_json: str) -> dict[str, Any]:
    opts = json.loads(opts_json)
    kind = kind_of(ref)
    out: dict[str, Any] = {"model": ref, "revision": revision, "weights_sha256": None}
    root: Path | None = None
    if kind == "local":
        if missing_local(ref):
            # A cluster's driver need not see the paths its workers load from; a local run
            # refuses a missing path before Ray starts (pipelines.runner.check_local_sources).
            logger.warning("model %s is not on this machine: its weights digest is not recorded", ref)
        else:
            root = Path(resolve_local(ref))
    elif kind == "hub":
        root = hub_snapshot(ref, revision)
        if root is None:
            logger.warning("model %s@%s is not in the local HF cache: its weights digest is not recorded "
                           "(run `mmcurate models prefetch` and point the config at the copy)", ref, revision or "main")
        else:
            out["commit"] = root.name
    else:
        fs, path = _fs(ref, opts)
        manifest = read_manifest(ref, opts) if fs.isdir(path) else None
        if manifest is not None:
            out["weights_sha256"] = manifest.get("files") or None
            out["source"] = {k: manifest.get(k) for k in ("model", "revision", "commit") if manifest.get(k)}
            if manifest.get("random_weights"):
                out["random_weights"] = True
            return out
        logger.warning("%s has no %s; staging it on the driver to digest the weights", ref, MANIFEST)
        root = stage(ref, opts)
    if root is not None:
        out["weights_sha256"] = digest_dir(root) or None
        if is_random(root):
            out["random_weights"] = True
    return out


def model_provenance(ref: str, revision: str | None = None, storage_options: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """{model, revision, weights_sha256: {file: sha256} | None, random_weights?, commit?} (driver side)."""
    return dict(_provenance_cached(ref, revision, json.dumps(storage_options or {}, sort_keys=True)))


def check_weights_allowed(local: str, allow_pickle: bool) -> None:
    """Refuse a local model folder holding only pickle weights unless ``allow_pickle``.

    ``use_safetensors=True`` makes ``from_pretrained`` refuse too; this check names the
    config key in the message instead of a loader traceback.
    """
    root = Path(local)
    if allow_pickle or not root.exists():
        return
    files = weight_files(root)
    if files and not any(f.name.endswith((".safetensors", ".npz")) for f in files):
        from ground.errors import ConfigError

        raise ConfigError(f"{local}: only pickle weights ({files[0].name}); convert them to safetensors "
                          "or set allow_pickle: true for a source you trust")
