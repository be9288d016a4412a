"""Readers, by input ``format``."""

from operators.readers.base import ShardReader
from operators.readers.coco import CocoCaptionsReader
from operators.readers.imagefolder import ImageFolderReader
from operators.readers.parquet import ParquetReader
from operators.readers.webdataset import WebDatasetReader

READERS: dict[str, type[ShardReader]] = {
    cls.name: cls for cls in (WebDatasetReader, ParquetReader, ImageFolderReader, CocoCaptionsReader)
}


def make_reader(input_options: dict) -> ShardReader:
    """The reader for an ``input`` config section (as a dict)."""
    return READERS[input_options["format"]](options=input_options)


__all__ = ["READERS", "ShardReader", "make_reader"]
