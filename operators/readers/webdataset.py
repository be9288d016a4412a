"""WebDataset tar shards in the img2dataset layout: KEY.jpg + KEY.txt + KEY.json."""

from __future__ import annotations

import logging
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator

from operators.readers.base import Sample, ShardDamage, ShardReader, check_json, decode_text

logger = logging.getLogger(__name__)

# Preference when a sample has several image members.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTENSIONS = ("txt", "caption")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


class WebDatasetReader(ShardReader):
    """Reads ``.tar`` (or compressed tar) shards as a stream, one sample per key.

    Output: the core reader columns. Caption from ``KEY.txt``; ``meta`` is ``KEY.json`` as is.
    Failure behaviour: a sample without an image -> ``webdataset:missing_image``; a caption
    that is not UTF-8 -> ``webdataset:text_not_utf8``; a sidecar that is not JSON ->
    ``webdataset:invalid_json``. A truncated or corrupt tar yields every sample before the
    cut; the sample being read at the cut becomes ``webdataset:truncated_sample`` and the
    shard's damage is recorded in its ledger record. An object that is not a tar at all (an
    HTML error body, zero bytes) is damaged with 0 rows. Network faults never count as damage:
    reads go through :class:`~ground.storage.ResumableFile`, whose final error is not an
    ``OSError`` and fails the shard instead.
    """

    name = "webdataset"

    def samples(self, shard: str, damage: ShardDamage) -> Iterator[Sample]:
        group_key: str | None = None
        members: dict[str, tuple[str, bytes]] = {}
        count = 0
        with self.open(shard) as f:
            try:
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = split_key(member.name)
                        if group_key is not None and key != group_key:
                            yield self._sample(group_key, members)
                            count += 1
                            members = {}
                        group_key = key
                        data = tar.extractfile(member).read()
                        members[ext] = (member.name, data)
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
                # OSError here is the decompressor's (gzip.BadGzipFile, bz2): storage faults
                # arrive as TransientStorageError or FileNotFoundError/PermissionError.
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                damage.message = f"tar damaged after {count} complete samples: {exc.__class__.__name__}: {exc}"
                # group_key is the sample being read at the cut (not yet yielded), even when
                # the cut falls inside its first member and ``members`` is still empty.
                if group_key is not None:
                    sample = self._sample(group_key, members)
                    sample.reject = "truncated_sample"
                    yield sample
                return
        if group_key is not None and members:
            yield self._sample(group_key, members)

    @staticmethod
    def _sample(key: str, members: dict[str, tuple[str, bytes]]) -> Sample:
        sample = Sample(key=key)
        for ext in IMAGE_EXTENSIONS:
            if ext in members:
                sample.image_path, sample.image = members[ext]
                break
        reasons = []
        for ext in TEXT_EXTENSIONS:
            if ext in members:
                sample.text, why = decode_text(members[ext][1])
                if why:
                    reasons.append(why)
                break
        if "json" in members:
            sample.meta, why = check_json(members["json"][1])
            if why:
                reasons.append(why)
        if sample.image is None:
            reasons.insert(0, "missing_image")
        sample.reject = reasons[0] if reasons else None
        return sample
