"""The Ray Data datasource over shard readers: exactly one read task per shard.

Readers (``operators/readers``) know formats and know nothing of Ray; this adapter is the
only place they meet Ray Data. A read task never raises for a data or storage problem: the
reader turns damage and failures into stamped blocks or marker rows (see
``operators.readers.base``), so one bad shard cannot kill the plan. Only a config error
(the config does not fit the data) escapes and stops the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators.readers.base import BLOCK_SCHEMA, ShardReader


class ShardDatasource(Datasource):
    """A Ray Data datasource with exactly one read task per shard."""

    def __init__(self, reader: ShardReader, shards: list[str]):
        super().__init__()
        self._reader = reader
        self._shards = list(shards)

    def get_name(self) -> str:
        return f"Read{self._reader.name.capitalize()}"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for shard in self._shards:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[shard], exec_stats=None)
            reader = self._reader

            def read_fn(shard: str = shard, reader: ShardReader = reader) -> Iterator[pa.Table]:
                yield from reader.read_blocks(shard)

            tasks.append(ReadTask(read_fn, meta, schema=BLOCK_SCHEMA))
        return tasks
