"""Decode and preprocess ahead of the model, on threads, within a byte budget.

A model actor spends its time in two places: turning image bytes into model inputs (Pillow
decode + resize, the processor's normalise) and the forward pass. Done one after the other,
a GPU idles while the CPU decodes. ``Prefetcher`` keeps a small thread pool preparing the rows
of the next forward chunks while the current chunk runs on the device. Pillow releases the GIL
while it decodes and resizes, and torch while it computes, so the threads really overlap.

Host memory stays bounded: every row is charged an estimate of its decoded pixels (from the
image header, before decoding) plus its prepared input, and rows are handed to the pool only
while the charges of rows not yet consumed by the model fit in ``budget_bytes``. One row is
always admitted, so a single image larger than the budget still gets through, alone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class Prefetcher:
    """Runs ``prepare(row)`` on a thread pool ahead of its consumer, in row order.

    Args:
        workers: threads preparing rows (about the CPUs the actor was given).
        budget_bytes: cap on the summed ``cost(row)`` of rows handed out and not yet consumed.
    """

    def __init__(self, workers: int, budget_bytes: int):
        self.workers = max(1, int(workers))
        self.budget_bytes = max(1, int(budget_bytes))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mmcurate-prepare")
        #: the largest sum of charges in flight seen so far (for tests and stats)
        self.peak_inflight_bytes = 0

    def chunks(self, rows: Iterable[int], cost: Callable[[int], int], prepare: Callable[[int], Any],
               chunk_rows: int) -> Iterator[tuple[list[int], dict[int, Any], dict[int, BaseException]]]:
        """Yield ``(chunk, prepared, failed)`` for consecutive chunks of at most ``chunk_rows`` rows.

        ``prepared`` maps each row of ``chunk`` that prepared to its value; ``failed`` maps the
        rows whose ``prepare`` raised to the exception. While the consumer works on one chunk,
        the pool keeps preparing the following rows (as far as the budget allows); a chunk's
        charges are released when the consumer asks for the next one.
        """
        todo = deque(rows)
        queue: deque[tuple[int, Future, int]] = deque()
        inflight = 0

        def admit() -> None:
            nonlocal inflight
            while todo:
                row = todo[0]
                charge = max(1, int(cost(row)))
                if queue and inflight + charge > self.budget_bytes:
                    return
                todo.popleft()
                queue.append((row, self.pool.submit(prepare, row), charge))
                inflight += charge
                self.peak_inflight_bytes = max(self.peak_inflight_bytes, inflight)

        while todo or queue:
            admit()
            chunk: list[int] = []
            prepared: dict[int, Any] = {}
            failed: dict[int, BaseException] = {}
            released = 0
            while queue and len(chunk) < chunk_rows:
                row, fut, charge = queue.popleft()
                chunk.append(row)
                released += charge
                try:
                    prepared[row] = fut.result()
                except Exception as exc:  # noqa: BLE001 - one row's bad bytes are that row's problem
                    failed[row] = exc
                # rows finished and taken off the queue: let the pool move further ahead
                admit()
            yield chunk, prepared, failed
            inflight -= released

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
