"""COCO-captions style annotations: ``{"images": [...], "annotations": [...]}`` + an images prefix.

Flickr30k and nocaps ship the same layout once converted to COCO captions JSON.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

from operators.readers.base import Sample, ShardDamage, ShardReader
from ground.errors import ConfigError
from ground.storage import expand_paths, filesystem, join

SHARD_FRAGMENT = "#images="


@functools.lru_cache(maxsize=4)
def _load_annotations(url: str, storage_key: str) -> tuple[list[dict[str, Any]], dict[Any, list[str]]]:
    options = json.loads(storage_key)
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise ConfigError(f"{url}: not a COCO captions file (needs 'images' and 'annotations')")
    captions: dict[Any, list[str]] = {}
    for ann in doc["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    images = sorted(doc["images"], key=lambda im: str(im.get("id")))
    return images, captions


class CocoCaptionsReader(ShardReader):
    """Reads a captions JSON plus images under ``images_prefix``.

    The annotation file is cut into virtual shards of ``coco_images_per_shard`` images
    (``captions.json#images=0-999``) so a large file still gives parallel, resumable tasks.
    ``coco_rows: per_caption`` emits one row per (image, caption), key ``<image id>/<n>``;
    ``per_image`` emits one row per image with the first caption as ``text`` and all of them
    in ``meta.captions``. Failure behaviour: an image file that is missing ->
    ``coco:missing_image``; an image without captions is kept with ``text`` null.
    """

    name = "coco"

    def _storage_key(self) -> str:
        return json.dumps(self.storage_options, sort_keys=True, default=str)

    def list_shards(self) -> list[str]:
        per = int(self.options.get("coco_images_per_shard", 1000))
        shards = []
        for url in expand_paths(self.options["paths"], self.storage_options):
            images, _ = _load_annotations(url, self._storage_key())
            for start in range(0, max(len(images), 1), per):
                end = min(start + per, len(images)) - 1
                shards.append(f"{url}{SHARD_FRAGMENT}{start}-{max(end, start)}")
        return shards

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:
        url, _, span = shard.partition(SHARD_FRAGMENT)
        start, end = (int(x) for x in span.split("-"))
        prefix = self.options.get("images_prefix")
        if not prefix:
            raise ConfigError("input.images_prefix is required for format: coco")
        images, captions = _load_annotations(url, self._storage_key())
        fs, root = filesystem(prefix, self.storage_options)
        per_caption = self.options.get("coco_rows", "per_caption") == "per_caption"
        for im in images[start:end + 1]:
            file_name = im.get("file_name") or im.get("filename")
            caps = [c for c in captions.get(im.get("id"), []) if c is not None]
            try:
                data, reject = fs.cat_file(join(root, file_name)), None
            except FileNotFoundError:
                data, reject = None, "missing_image"
            info = {k: v for k, v in im.items() if k not in ("file_name", "filename")}
            if per_caption and caps:
                for n, cap in enumerate(caps):
                    yield Sample(key=f"{im.get('id')}/{n}", image=data, image_path=file_name,
                                 text=cap.strip(), meta=json.dumps(info, sort_keys=True), reject=reject)
            else:
                info["captions"] = caps
                yield Sample(key=str(im.get("id")), image=data, image_path=file_name,
                             text=caps[0].strip() if caps else None,
                             meta=json.dumps(info, sort_keys=True), reject=reject)
