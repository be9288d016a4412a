"""COCO-captions style annotations: ``{"images": [...], "annotations": [...]}`` + an images prefix.

Flickr30k and nocaps ship the same layout once converted to COCO captions JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from operators.readers.base import Sample, ShardDamage, ShardReader
from ground.errors import ConfigError
from ground.storage import expand_paths, filesystem, join, retry

SHARD_FRAGMENT = "#images="


def _version(url: str, options: dict[str, Any]) -> str:
    """Size and ETag/mtime of the annotation file, so a file that grew is never served from cache."""
    fs, path = filesystem(url, options)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{etag}"


@functools.lru_cache(maxsize=4)
def _load_annotations(url: str, storage_key: str, version: str) -> tuple[list[dict[str, Any]], dict[Any, list[Any]]]:
    options = json.loads(storage_key)
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        try:
            doc = json.load(f)
        except ValueError as exc:
            raise ConfigError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise ConfigError(f"{url}: not a COCO captions file (needs 'images' and 'annotations')")
    captions: dict[Any, list[Any]] = {}
    for ann in doc["annotations"]:
        if isinstance(ann, dict):
            captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    # File order, not sorted ids: a file that grows by appended images then only fills its last
    # virtual shard and adds new ones; committed full shards keep exactly their images.
    images = [im if isinstance(im, dict) else {"id": None, "_invalid": repr(im)[:200]} for im in doc["images"]]
    return images, captions


class CocoCaptionsReader(ShardReader):
    """Reads a captions JSON plus images under ``images_prefix``.

    The annotation file is cut into virtual shards by position in the file's ``images`` list:
    shard ``captions.json#images=1000-1999`` always covers positions 1000..1999, whether or not
    the file has that many images yet. An annotation file that grows by appended images keeps
    every full shard as it was; only the last, partly filled one grows (its fingerprint, the
    count and a digest of its entries, changes, so the run reports it as changed and redoes it
    under ``input.on_change: redo``) and new shards are added after it. Sorting or hashing
    ids instead would move already committed images into other shards.

    ``coco_rows: per_caption`` emits one row per (image, caption), key ``<image id>/<n>``;
    ``per_image`` emits one row per image with the first caption as ``text`` and all of them
    in ``meta.captions``. Failure behaviour: an image file that is missing ->
    ``coco:missing_image``; an entry without ``file_name`` -> ``coco:missing_file_name``; a
    caption that is not a string -> ``coco:bad_caption`` (its value kept in ``meta``); an image
    without captions is kept with ``text`` null.
    """

    name = "coco"

    def _storage_key(self) -> str:
        return json.dumps(self.storage_options, sort_keys=True, default=str)

    def _annotations(self, url: str) -> tuple[list[dict[str, Any]], dict[Any, list[Any]]]:
        return _load_annotations(url, self._storage_key(), _version(url, self.storage_options))

    @property
    def _per_shard(self) -> int:
        return int(self.options.get("coco_images_per_shard", 1000))

    def list_shards(self) -> list[str]:
        per = self._per_shard
        shards = []
        for url in expand_paths(self.options["paths"], self.storage_options):
            images, _ = self._annotations(url)
            for start in range(0, max(len(images), 1), per):
                shards.append(f"{url}{SHARD_FRAGMENT}{start}-{start + per - 1}")
        return shards

    def _slice(self, shard: str) -> tuple[str, list[dict[str, Any]], dict[Any, list[Any]]]:
        url, _, span = shard.partition(SHARD_FRAGMENT)
        start, end = (int(x) for x in span.split("-"))
        images, captions = self._annotations(url)
        return url, images[start:end + 1], captions

    def fingerprint(self, shard: str) -> dict[str, Any]:
        """Number of images in the virtual shard and a digest of their entries and captions."""
        try:
            _, images, captions = self._slice(shard)
        except Exception:  # noqa: BLE001 - a fingerprint is informative, not required
            return {"source_size": None, "source_etag": None}
        blob = json.dumps([[im, captions.get(im.get("id"), [])] for im in images], sort_keys=True, default=str)
        return {"source_size": len(images), "source_etag": hashlib.sha1(blob.encode()).hexdigest()}

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:
        prefix = self.options.get("images_prefix")
        if not prefix:
            raise ConfigError("input.images_prefix is required for format: coco")
        _, images, captions = self._slice(shard)
        fs, root = filesystem(prefix, self.storage_options)
        per_caption = self.options.get("coco_rows", "per_caption") == "per_caption"
        for im in images:
            file_name = im.get("file_name") or im.get("filename")
            caps = [c for c in captions.get(im.get("id"), []) if c is not None]
            bad = [c for c in caps if not isinstance(c, str)]
            data, reject = None, None
            if not isinstance(file_name, str) or not file_name:
                file_name, reject = None, "missing_file_name"
            else:
                path = join(root, file_name)
                try:
                    data = retry(lambda p=path: fs.cat_file(p), f"read {path}")
                except FileNotFoundError:
                    reject = "missing_image"
            info = {k: v for k, v in im.items() if k not in ("file_name", "filename")}
            info = json.loads(json.dumps(info, default=str))  # whatever the file held, as JSON
            if per_caption and caps:
                for n, cap in enumerate(caps):
                    ok = isinstance(cap, str)
                    row_info = info if ok else {**info, "caption": json.loads(json.dumps(cap, default=str))}
                    yield Sample(key=f"{im.get('id')}/{n}", image=data, image_path=file_name,
                                 text=cap.strip() if ok else None, meta=json.dumps(row_info, sort_keys=True),
                                 reject=reject or (None if ok else "bad_caption"))
            else:
                good = [c for c in caps if isinstance(c, str)]
                info["captions"] = json.loads(json.dumps(caps, default=str))
                yield Sample(key=str(im.get("id")), image=data, image_path=file_name,
                             text=good[0].strip() if good else None,
                             meta=json.dumps(info, sort_keys=True), reject=reject or ("bad_caption" if bad else None))
