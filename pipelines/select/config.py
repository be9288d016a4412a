"""The ``select:`` section: rules, top fractions, dedup methods and the survivor order.

Shape::

    select:
      rules:
        - clip_score >= 0.28                 # COLUMN OP VALUE; VALUE is YAML
        - text_lang in [en, de]
        - {rule: "nsfw < 0.5", name: safe}   # optional name for the reject reason
        - top_fraction: {column: clip_score, fraction: 0.3, by: text_lang}
      dedup:
        - exact: {caption: false}
        - phash: {max_distance: 8}
        - semantic: {column: clip_image_embedding, eps: 0.05, clusters: 64}
        - caption: {column: minilm_text_embedding, eps: 0.02, clusters: 16}
      survivor_order: [-clip_score, -pixels]   # then key, always
      index: true
      output: {path: s3://bucket/curated, storage_options: {}}

Rules run in the order listed, then the dedup methods in the order listed; every step only
sees the rows earlier steps kept. Unknown keys are errors, as everywhere in the config.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, Union

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OPERATORS = (">=", "<=", "==", "!=", ">", "<", "not in", "in")
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<|not\s+in\b|in\b)\s*(.+?)\s*$")
# The pseudo-column ``pixels`` (width * height) lets ``survivor_order`` prefer the largest image.
PIXELS = "pixels"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompareRule(_Strict):
    """``COLUMN OP VALUE``: rows where it is false (or the column is null) are rejected."""

    column: str
    op: Literal[">=", "<=", "==", "!=", ">", "<", "in", "not in"]
    value: Any
    name: str | None = Field(None, pattern=r"^[^\s:]+$", description="reject reason suffix (default: the expression)")

    @model_validator(mode="after")
    def _value_fits_op(self) -> "CompareRule":
        if self.op in ("in", "not in"):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"rule on {self.column!r}: '{self.op}' needs a non-empty list, got {self.value!r}")
        elif isinstance(self.value, (list, dict)) or self.value is None:
            raise ValueError(f"rule on {self.column!r}: '{self.op}' needs one number or string, got {self.value!r}")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.value, list):
            return f"{self.column}_{self.op.replace(' ', '_')}_[{','.join(str(v) for v in self.value)}]"
        return f"{self.column}{self.op}{self.value}"

    @property
    def reason(self) -> str:
        return f"select:{self.label}"

    @property
    def columns(self) -> list[str]:
        return [self.column]


class TopFraction(_Strict):
    """Keep the top ``fraction`` of rows by ``column`` (highest first), per ``by`` group if set.

    Exact: ``ceil(fraction * n)`` rows of each group survive, ties broken by ``key`` then the
    row's position in the input, so the cut never depends on block order.
    """

    column: str
    fraction: float = Field(gt=0, le=1)
    by: str | None = None
    name: str | None = Field(None, pattern=r"^[^\s:]+$")

    @property
    def label(self) -> str:
        return self.name or f"top_{self.fraction:g}_{self.column}" + (f"_by_{self.by}" if self.by else "")

    @property
    def reason(self) -> str:
        return f"select:{self.label}"

    @property
    def columns(self) -> list[str]:
        return [self.column] + ([self.by] if self.by else [])


class ExactDedup(_Strict):
    """Identical image bytes (``sha256``), optionally also the same normalised caption."""

    caption: bool = Field(False, description="also require the same caption (lower-cased, whitespace collapsed)")


class PhashDedup(_Strict):
    """Perceptual near duplicates: ``phash`` within ``max_distance`` bits, found by LSH banding."""

    max_distance: int = Field(6, ge=0, le=16, description="Hamming distance k; k+1 bands")
    windows: bool = Field(True, description="also match each row's full hash against other rows' window "
                                            "hashes (phash_windows), which finds crops of up to ~10 % of the area")


class SemanticDedup(_Strict):
    """SemDeDup over an embedding column: k-means, then cosine >= 1 - eps inside a cluster."""

    column: str = "clip_image_embedding"
    eps: float = Field(0.05, gt=0, lt=1, description="pairs with cosine >= 1 - eps are duplicates")
    clusters: int = Field(64, ge=1, description="k-means clusters (SemDeDup uses ~n/10k at scale)")
    sample_rows: int = Field(100_000, ge=1, description="rows the k-means fit sees (a deterministic sample)")
    iterations: int = Field(20, ge=1)
    seed: int = 0


class CaptionDedup(SemanticDedup):
    """Caption near duplicates: SemDeDup over the sentence-embedding column."""

    column: str = "minilm_text_embedding"
    eps: float = Field(0.02, gt=0, lt=1)
    clusters: int = Field(16, ge=1)


DEDUP_METHODS: dict[str, type[_Strict]] = {
    "exact": ExactDedup, "phash": PhashDedup, "semantic": SemanticDedup, "caption": CaptionDedup}

Rule = Union[CompareRule, TopFraction]


def parse_rule(raw: Any) -> Rule:
    """A rule from its YAML form: ``"col OP value"``, ``{rule: ..., name: ...}``, ``{top_fraction: {...}}``
    or the structured ``{column, op, value}``."""
    if isinstance(raw, str):
        return _parse_expression(raw)
    if isinstance(raw, dict) and set(raw) == {"top_fraction"}:
        return TopFraction.model_validate(raw["top_fraction"] or {})
    if isinstance(raw, dict) and "rule" in raw:
        extra = set(raw) - {"rule", "name"}
        if extra:
            raise ValueError(f"unknown key(s) {sorted(extra)} next to 'rule'")
        rule = _parse_expression(raw["rule"])
        return rule.model_copy(update={"name": CompareRule.model_validate(
            {"column": rule.column, "op": rule.op, "value": rule.value, "name": raw.get("name")}).name})
    if isinstance(raw, dict):
        return CompareRule.model_validate(raw)
    raise ValueError(f"a rule is 'COLUMN OP VALUE' or a mapping, got {raw!r}")


def _parse_expression(text: Any) -> CompareRule:
    if not isinstance(text, str):
        raise ValueError(f"rule must be a string 'COLUMN OP VALUE', got {text!r}")
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"cannot parse rule {text!r}: expected 'COLUMN OP VALUE' with OP one of {', '.join(OPERATORS)}")
    column, op, raw_value = m.group(1), " ".join(m.group(2).split()), m.group(3)
    if raw_value[0] in "<>=!~":
        raise ValueError(f"cannot parse rule {text!r}: expected 'COLUMN OP VALUE' with OP one of {', '.join(OPERATORS)}")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        raise ValueError(f"rule {text!r}: value {raw_value!r} is not valid YAML") from None
    return CompareRule(column=column, op=op, value=value)


class LocationConfig(_Strict):
    path: str
    storage_options: dict[str, Any] = Field(default_factory=dict)


# Below this many input rows `shuffle: auto` uses Ray Data's sort-based (task) shuffle: its
# cost is a few tasks per stage, where the hash shuffle starts aggregator actors for every groupby
# (about 10 s per stage on a 2-core machine, for any input size). Above it the hash shuffle's
# scaling wins: the sort shuffle makes blocks x partitions intermediate objects.
SORT_SHUFFLE_MAX_ROWS = 10_000_000


class SelectConfig(_Strict):
    """Phase 2: what to keep of an annotated output, and where the curated set goes."""

    rules: list[Rule] = Field(default_factory=list)
    dedup: list[dict[str, Any]] = Field(default_factory=list)
    survivor_order: list[str] = Field(default_factory=lambda: ["-clip_score", "-pixels"],
                                      description="numeric columns, '-' for highest first; key breaks ties")
    index: bool = Field(True, description="deduplicate against, and extend, CURATED/_mmcurate/index")
    shuffle_partitions: int | None = Field(None, ge=1, description="groupby partitions (default: one per input file, at most 200)")
    shuffle: Literal["auto", "sort", "hash"] = Field(
        "auto", description="Ray Data shuffle behind the groupby stages: sort (pull-based, plain tasks: no "
                            "actors to start, seconds on small inputs), hash (Ray's actor-based hash shuffle, "
                            f"for large inputs); auto: sort below {SORT_SHUFFLE_MAX_ROWS:,} input rows, else hash")
    input: LocationConfig | None = Field(None, description="annotated output to read (CLI --from)")
    output: LocationConfig | None = Field(None, description="curated output (CLI --to)")

    @field_validator("rules", mode="before")
    @classmethod
    def _parse_rules(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError("rules must be a list")
        out = []
        for i, raw in enumerate(v):
            try:
                out.append(parse_rule(raw) if not isinstance(raw, BaseModel) else raw)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"rules[{i}]{'.' + where if where else ''}: {err['msg'].removeprefix('Value error, ')}") from None
            except ValueError as exc:
                raise ValueError(f"rules[{i}]: {exc}") from None
        return out

    @field_validator("dedup", mode="after")
    @classmethod
    def _check_dedup(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out, seen = [], set()
        for i, entry in enumerate(v):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"dedup[{i}] must be a mapping with exactly one method name")
            (name, raw), = entry.items()
            if name not in DEDUP_METHODS:
                raise ValueError(f"dedup[{i}]: unknown method {name!r} (known: {', '.join(DEDUP_METHODS)})")
            if name in seen:
                raise ValueError(f"dedup[{i}]: method {name!r} listed twice")
            seen.add(name)
            out.append({name: DEDUP_METHODS[name].model_validate(raw or {}).model_dump()})
        return out

    @field_validator("survivor_order")
    @classmethod
    def _check_order(cls, v: list[str]) -> list[str]:
        for item in v:
            if not re.match(r"^-?[A-Za-z_][A-Za-z0-9_]*$", item):
                raise ValueError(f"survivor_order entry {item!r}: expected COLUMN or -COLUMN")
        return v

    def methods(self) -> list[tuple[str, Any]]:
        """(name, validated method config) in the configured order."""
        return [(name, DEDUP_METHODS[name].model_validate(raw)) for entry in self.dedup for name, raw in entry.items()]

    def order(self) -> list[tuple[str, bool]]:
        """(column, descending) of the survivor order, most significant first."""
        return [(item.lstrip("-"), item.startswith("-")) for item in self.survivor_order]

    def needed_columns(self) -> dict[str, str]:
        """Input columns the config reads -> what reads them (for the one-line missing-column error)."""
        need: dict[str, str] = {"key": "select", "sha256": "select"}
        for rule in self.rules:
            for c in rule.columns:
                need.setdefault(c, f"rule {rule.label!r}")
        for name, method in self.methods():
            if name == "phash":
                need.setdefault("phash", "dedup phash")
            elif name == "exact" and method.caption:
                need.setdefault("text", "dedup exact (caption)")
            elif name in ("semantic", "caption"):
                need.setdefault(method.column, f"dedup {name}")
        for column, _ in self.order():
            if column == PIXELS:
                need.setdefault("width", "survivor_order pixels")
                need.setdefault("height", "survivor_order pixels")
            else:
                need.setdefault(column, "survivor_order")
        return need

    def check_schema(self, schema: pa.Schema, where: str) -> None:
        """Raise ConfigError naming the first rule/method whose column ``schema`` lacks or cannot compare."""
        from ground.errors import ConfigError

        for column, user in self.needed_columns().items():
            if column not in schema.names:
                raise ConfigError(f"{user} needs column {column!r} but {where} has none "
                                  f"(columns: {', '.join(schema.names)})")
        numeric = (pa.types.is_integer, pa.types.is_floating)
        for column, _ in self.order():
            if column != PIXELS and not any(f(schema.field(column).type) for f in numeric):
                raise ConfigError(f"survivor_order column {column!r} is {schema.field(column).type}, not numeric")
        for rule in self.rules:
            if isinstance(rule, TopFraction) and not any(f(schema.field(rule.column).type) for f in numeric):
                raise ConfigError(f"rule {rule.label!r}: column {rule.column!r} is {schema.field(rule.column).type}, "
                                  "not numeric")
            if isinstance(rule, CompareRule):
                typ = schema.field(rule.column).type
                values = rule.value if isinstance(rule.value, list) else [rule.value]
                is_num = any(f(typ) for f in numeric)
                if is_num and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ConfigError(f"rule {rule.label!r}: column {rule.column!r} is numeric ({typ}) but the "
                                      f"value {rule.value!r} is not a number")
                if not is_num and rule.op in (">=", "<=", ">", "<") and not pa.types.is_string(typ):
                    raise ConfigError(f"rule {rule.label!r}: cannot order column {rule.column!r} of type {typ}")
        for name, method in self.methods():
            if name in ("semantic", "caption") and not pa.types.is_fixed_size_list(schema.field(method.column).type):
                raise ConfigError(f"dedup {name}: column {method.column!r} is {schema.field(method.column).type}, "
                                  "not an embedding (fixed_size_list)")

    def decision_hash(self) -> str:
        """Hash of what decides which rows survive (not where they are read or written)."""
        d = self.model_dump(mode="json", exclude={"input", "output", "shuffle_partitions", "shuffle"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
