"""Folders of images with sidecar captions: ``cat.jpg`` + ``cat.txt`` (+ ``cat.json``)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from operators.readers.base import Sample, ShardDamage, ShardReader, check_json, decode_text
from ground.storage import expand_paths, filesystem


class ImageFolderReader(ShardReader):
    """Each configured folder is one shard; files in it are grouped by stem.

    Output: the core reader columns; the key is the file stem. Failure behaviour: a stem
    with a caption but no image -> ``imagefolder:missing_image``; a non-UTF-8 caption ->
    ``imagefolder:text_not_utf8``; a bad sidecar -> ``imagefolder:invalid_json``.
    """

    name = "imagefolder"

    def list_shards(self) -> list[str]:
        shards = []
        for url in expand_paths(self.options["paths"], self.storage_options):
            fs, path = filesystem(url, self.storage_options)
            if fs.isdir(path):
                shards.append(url.rstrip("/"))
        return shards

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:
        fs, root = filesystem(shard, self.storage_options)
        exts = tuple(e.lower() for e in self.options.get("image_extensions", ()))
        groups: dict[str, dict[str, str]] = {}
        for path in sorted(fs.find(root, maxdepth=1)):
            base = posixpath.basename(path)
            stem, _, ext = base.rpartition(".")
            if not stem:
                continue
            groups.setdefault(stem, {})[ext.lower()] = path
        for stem, files in groups.items():
            image_path = next((files[e] for e in exts if e in files), None)
            if image_path is None and "txt" not in files:
                continue  # neither image nor caption: not a sample (README, .DS_Store, ...)
            sample = Sample(key=stem)
            reasons = []
            if image_path is not None:
                sample.image = fs.cat_file(image_path)
                sample.image_path = posixpath.basename(image_path)
            else:
                reasons.append("missing_image")
            if "txt" in files:
                sample.text, why = decode_text(fs.cat_file(files["txt"]))
                reasons += [why] if why else []
            if "json" in files:
                sample.meta, why = check_json(fs.cat_file(files["json"]))
                reasons += [why] if why else []
            sample.reject = reasons[0] if reasons else None
            yield sample
