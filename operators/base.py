"""The operator contract shared by every row operator.

An operator is one class:

* ``name``: the key used in YAML (``operators: [{decode: {...}}]``) and the prefix of the
  ``reject_reason`` it writes (``decode:truncated``).
* ``Config``: a pydantic model (extra keys forbidden) validated on the driver.
* ``resources()``: data (cpus, gpus, actors, batch size) that exactly one adapter in
  ``pipelines/`` lowers to ``map_batches``.
* ``__init__(config)`` runs once per task or actor and loads heavy state;
  ``__call__(table)`` maps a pyarrow Table to a new Table with its output columns added,
  never mutating its input and never dropping a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

REJECT_REASON = "reject_reason"


class OperatorConfig(BaseModel):
    """Base for operator configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Resources(BaseModel):
    """What one operator needs from Ray; lowered to ``map_batches`` in one place.

    ``max_actors is None`` means a stateless task pool; otherwise an actor pool of
    ``min_actors..max_actors`` actors, each loading the operator once. ``num_cpus`` left
    unset (None) is derived at run time from the connected cluster's nodes by
    ``pipelines.plan.resolve_resources``; a value set here always wins.
    """

    model_config = ConfigDict(extra="forbid")

    num_cpus: float | None = Field(None, gt=0, description="CPUs per task/actor; unset: derived from the node")
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int | None = Field(256, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _actor_range(self) -> Resources:
        if self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) is greater than max_actors ({self.max_actors})")
        return self

    @property
    def uses_actors(self) -> bool:
        return self.max_actors is not None


class Operator:
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``__call__``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[OperatorConfig]] = OperatorConfig
    #: columns read from the batch; missing ones are a plan-time error
    input_columns: ClassVar[tuple[str, ...]] = ()
    #: columns added (model operators with configurable prefixes override :meth:`outputs`)
    output_columns: ClassVar[tuple[str, ...]] = ()
    #: True for operators whose work is a model forward: on CPU they get most of a node's
    #: CPUs by default, the light stages (read, decode, filters, write) fractional shares
    heavy: ClassVar[bool] = False
    #: True for a task whose every call keeps one core busy (a model's decode + resize stage):
    #: where the node has room it reserves a whole CPU, so no more of them run than there are
    #: cores (each is a process with torch imported), instead of a light stage's fraction
    cpu_bound: ClassVar[bool] = False

    def __init__(self, config: OperatorConfig):
        self.config = config

    @classmethod
    def resources(cls, config: OperatorConfig) -> Resources:
        """Default: a light CPU task. Operators override or read ``config.resources``."""
        res = getattr(config, "resources", None)
        return res if isinstance(res, Resources) else Resources()

    @classmethod
    def inputs(cls, config: OperatorConfig) -> tuple[str, ...]:
        """Columns this operator reads for ``config`` (checked at plan time)."""
        return cls.input_columns

    @classmethod
    def outputs(cls, config: OperatorConfig) -> tuple[str, ...]:
        """Columns this operator adds for ``config``."""
        return cls.output_columns

    @classmethod
    def prepare_stage(cls, config: OperatorConfig) -> type[Operator] | None:
        """A light task operator the planner runs right before this one with the same config (a
        model operator's decode + resize spread over CPU tasks), or None. Default: None."""
        return None

    @classmethod
    def provenance(cls, config: OperatorConfig) -> dict[str, Any]:
        """Per output column, what produced it (model id, revision, weights digest). Empty for plain ops."""
        return {}

    @classmethod
    def sources(cls, config: OperatorConfig) -> dict[str, str]:
        """Model references this operator loads, by config key (``{"model": ...}``). Empty for plain ops."""
        return {}

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


class OperatorRegistry:
    """Name -> operator class. Built-ins register on import of :mod:`operators`."""

    def __init__(self) -> None:
        self._ops: dict[str, type[Operator]] = {}

    def register(self, cls: type[Operator]) -> type[Operator]:
        if not cls.name:
            raise TypeError(f"{cls.__name__} has no name")
        if cls.name in self._ops and self._ops[cls.name] is not cls:
            raise TypeError(f"operator name {cls.name!r} registered twice")
        self._ops[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Operator]:
        if name not in self._ops:
            import operators  # noqa: F401  (registers built-ins)
        return self._ops[name]

    def names(self) -> list[str]:
        import operators  # noqa: F401
        return list(self._ops)


registry = OperatorRegistry()


def pending_mask(batch: pa.Table) -> np.ndarray:
    """Boolean mask of rows no earlier operator rejected (the rows that get work)."""
    if REJECT_REASON not in batch.column_names:
        return np.ones(batch.num_rows, dtype=bool)
    return pc.is_null(batch[REJECT_REASON]).to_numpy(zero_copy_only=False)


def with_rejects(batch: pa.Table, reasons: list[str | None]) -> pa.Table:
    """Return ``batch`` with ``reject_reason`` set where it was null and ``reasons`` is not.

    The first failure wins: a reason already on a row is never overwritten.
    """
    new = pa.array(reasons, type=pa.string())
    if REJECT_REASON in batch.column_names:
        old = batch[REJECT_REASON].combine_chunks()
        merged = pc.coalesce(old, new)
        idx = batch.column_names.index(REJECT_REASON)
        return batch.set_column(idx, REJECT_REASON, merged)
    return batch.append_column(REJECT_REASON, new)


def set_column(batch: pa.Table, name: str, values: pa.Array | list[Any], type: pa.DataType | None = None) -> pa.Table:
    """Add or replace one column, returning a new table."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type)
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, arr)
    return batch.append_column(name, arr)


class RowFilter(Operator):
    """Base for filters that annotate rows with a reason instead of dropping them.

    Subclasses implement :meth:`check` on the batch and return one reason (without the
    operator prefix) or ``None`` per row; rows rejected earlier are not checked.
    """

    def check(self, batch: pa.Table) -> list[str | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        pending = pending_mask(batch)
        raw = self.check(batch)
        reasons = [f"{self.name}:{r}" if (r is not None and ok) else None for r, ok in zip(raw, pending)]
        return with_rejects(batch, reasons)


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: add an operator to the registry."""
    return registry.register(cls)


Factory = Callable[[], Operator]
