"""Language identification of captions with py3langid (model shipped inside the package).

Why py3langid: the langid.py naive-Bayes model (byte n-grams, 140 language labels)
sits in the wheel as ``data/model.npz.xz`` (4.5 MB installed, numpy only, BSD-3-Clause), so nothing
is downloaded at run time; about 1 ms per caption on one core. ``langdetect`` (Apache-2.0) is
non-deterministic unless seeded and slower; ``lingua-language-detector`` (Apache-2.0) is more
accurate on short text but ships ~100 MB of models (plus a Rust extension); the original
``langid`` is unmaintained since 2016 (py3langid is its maintained fork).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from operators.base import Operator, OperatorConfig, Resources, pending_mask, register, set_column, with_rejects

logger = logging.getLogger(__name__)

# ISO 639-2 "undetermined": text without a single feature the model knows (digits, symbols,
# a bare file name) gets every language with equal probability; calling that Serbian would mislead.
UNDETERMINED = "und"
# langid's accuracy saturates long before this; capping keeps a pasted article from costing
# a hundred times a caption (the classifier is linear in the bytes it walks).
MAX_CHARS = 2000


@functools.lru_cache(maxsize=1)
def _identifier():
    """The py3langid identifier with normalised probabilities, loaded once per process (~4 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """Codes the model can return: ISO 639-1 where a language has one, else ISO 639-3."""
    return list(_identifier().labels)


class TextLangConfig(OperatorConfig):
    text_column: str = Field("text", description="the caption column to identify")
    allowed: list[str] | None = Field(
        None, min_length=1,
        description="optional: reject rows whose language is not listed (text_lang:not_allowed); "
                    "rows without text are never rejected here")
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5, batch_size=256))

    @field_validator("allowed")
    @classmethod
    def _known_codes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        codes = [v.strip().lower() for v in value]
        # Loads the model on the driver (seconds), only when a user restricts languages, so a typo
        # ("eng", "english") is a config error before any work rather than every row rejected.
        unknown = sorted(set(codes) - set(known_languages()) - {UNDETERMINED})
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; use ISO 639-1 codes such as en, de, zh")
        return codes


@register
class TextLanguageIdentifier(Operator):
    """Annotates each caption with its language and the model's confidence.

    Input columns: ``text_column`` (``text``), ``reject_reason``.
    Output columns: ``text_lang`` (string: ISO 639-1 code, ISO 639-3 for languages without one,
    ``zxx`` (the model's "no linguistic content" class, e.g. ``"12345 67"``), ``und`` when the
    text has no feature the model knows at all, e.g. ``"IMG_1234.jpg"``) and
    ``text_lang_score`` (float32: the model's probability for that language, 0..1); both null
    when the text is null or blank. Rejected rows are annotated too (selection may want them).
    Resources: a CPU task pool; the model loads once per worker process.
    Failure behaviour: never raises on data. With ``allowed`` set, a row whose language is not
    listed gets ``text_lang:not_allowed`` (only rows no earlier operator rejected).
    """

    name = "text_lang"
    Config = TextLangConfig
    output_columns = ("text_lang", "text_lang_score")

    @classmethod
    def inputs(cls, config: TextLangConfig) -> tuple[str, ...]:
        return (config.text_column,)

    def __init__(self, config: TextLangConfig):
        super().__init__(config)
        self.identifier = _identifier()
        # The probability of a featureless text (the uniform distribution after py3langid folds
        # script aliases), measured instead of derived from the label count.
        self.no_evidence_score = self.identifier.classify("")[1]

    def identify(self, text: str | None) -> tuple[str | None, float | None]:
        """(language, probability) for one caption; (None, None) for null or blank text."""
        if text is None or not text.strip():
            return None, None
        lang, score = self.identifier.classify(text.strip()[:MAX_CHARS])
        if np.isclose(score, self.no_evidence_score, rtol=1e-4, atol=0.0):
            return UNDETERMINED, float(score)
        return lang, float(score)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg: TextLangConfig = self.config
        langs, scores = [], []
        for text in batch[cfg.text_column].to_pylist():
            lang, score = self.identify(text)
            langs.append(lang)
            scores.append(score)
        out = set_column(batch, "text_lang", langs, pa.string())
        out = set_column(out, "text_lang_score", scores, pa.float32())
        if cfg.allowed is None:
            return out
        allowed = set(cfg.allowed)
        pending = pending_mask(batch)
        reasons = [f"{self.name}:not_allowed" if ok and lang is not None and lang not in allowed else None
                   for lang, ok in zip(langs, pending)]
        return with_rejects(out, reasons)
