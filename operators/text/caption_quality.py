"""Caption quality: boilerplate, file names, bare URLs, character classes and repetition.

Web alt-texts are full of captions that say nothing about the picture ("image", "IMG_1234.jpg",
"click to enlarge", "buy buy buy"). This filter names each kind in ``reject_reason`` so that a
user can see what was caught and loosen one check without losing the others.
"""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa
from pydantic import Field, model_validator

from operators.base import OperatorConfig, RowFilter, register

# Whole captions that describe nothing, gathered from alt-text conventions of CMSs, galleries,
# stock sites and camera uploads (LAION/DataComp samples show each of these thousands of times).
# Compared after normalisation: case-folded, punctuation removed, whitespace collapsed.
DEFAULT_BLOCKLIST = (
    "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "pics", "untitled",
    "untitled image", "untitled photo", "no description", "no description available",
    "no caption", "no title", "no alt text", "alt text", "alt", "description", "caption", "title",
    "thumbnail", "thumb", "preview", "click to enlarge", "click here", "click to zoom",
    "click for larger image", "click image to enlarge", "click to view", "view larger",
    "view full size", "enlarge", "zoom", "loading", "placeholder", "image placeholder",
    "default image", "no image", "no image available", "image not found", "image not available",
    "photo not available", "coming soon", "product image", "featured image", "header image",
    "banner", "logo", "icon", "avatar", "profile picture", "spacer", "blank", "null", "none",
    "undefined", "nan", "na", "n a", "unknown", "test", "download", "download image", "share",
    "pin it", "pinterest", "facebook", "twitter", "instagram", "stock photo", "stock image",
    "royalty free", "royalty free stock photo", "copyright", "all rights reserved",
    "image may contain", "image may contain text", "screenshot", "screen shot", "scan",
    "attachment", "jpg", "jpeg", "png", "gif", "webp",
)

_IMAGE_EXTENSIONS = r"jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|raw|cr2|nef|arw|dng"
# Whole-caption file names: one "word" (no spaces, or camera-style separators) ending in an image
# extension, e.g. "IMG_1234.jpg", "2019-05-03 14.22.11.png", "DSC00012 (2).JPG".
_FILE_WITH_EXTENSION = re.compile(rf"^[\w\-.()\[\]~+#@%&' ]{{0,120}}\.(?:{_IMAGE_EXTENSIONS})$", re.IGNORECASE)
# Camera / phone / app default names without an extension: IMG_1234, DSC00012, DSCN0042,
# PXL_20230101_123456789, MVIMG_..., GOPR0123, DJI_0042, P1010203 (Panasonic), SAM_1234 (Samsung),
# WP_20140101_001, image0001, "DSC00012 (2)". The number follows the prefix directly or after _ / -
# (never a space: "Sam 2019" is a person and a year).
_CAMERA_NAME = re.compile(
    r"^(?:img|image|dsc[nfr]?|dcim|pxl|mvimg|gopr|gp|dji|sam|wp|pic|photo|p|vid|scan|fb_img|pano|burst)"
    r"[_\-]?\d{3,}(?:[_\-.]\d+)*(?:[_\-]\w{1,12})?(?: ?\(\d+\))?$",
    re.IGNORECASE)
# Dated default names: "Screenshot 2023-01-01", "Screen Shot 2019-03-04 at 10.21.33 AM",
# "Screenshot_20230101-101010_Chrome", "Screenshot from 2022-11-05 12-00-01",
# "WhatsApp Image 2021-03-04 at 10.11.12", "Photo 2019-05-03".
_DATED_NAME = re.compile(
    r"^(?:screen ?shot|whatsapp image|photo|image|snapshot|scan)(?: from| at)?[ _\-]*"
    r"\d{4}[\-_.]?\d{2}[\-_.]?\d{2}.{0,40}$", re.IGNORECASE)
# Hex digests and UUIDs used as names by upload pipelines.
_HASH_NAME = re.compile(r"^(?:[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$",
                        re.IGNORECASE)
# A caption that is nothing but links: scheme URLs, www. hosts or bare domains with a path.
_URL = re.compile(r"(?:https?|ftp)://\S+|www\.\S+|(?:[a-z0-9\-]+\.)+(?:com|net|org|io|co|uk|de|fr|ru|jp|cn|info|biz|"
                  r"ly|me|tv|us|ca|au|in|br|it|es|nl|pl)(?:/\S*)?", re.IGNORECASE)
_URL_SEPARATORS = re.compile(r"[\s,;|<>()\[\]\"']+")
# A run of one unit of 1-4 characters repeated at least 3 more times ("hahaha", "!!!!", "xoxoxo").
_CHAR_RUN = re.compile(r"(.{1,4}?)\1{3,}", re.DOTALL)
_WORD = re.compile(r"\w+", re.UNICODE)
# "Untitled-1", "Image 3", "photo 2 12": a blocklisted caption with a counter after it says no more.
_TRAILING_NUMBERS = re.compile(r"(?: \d+)+$")

# Characters that are not text: controls (other than whitespace), private use, surrogates,
# unassigned code points, and U+FFFD (what a wrong decoder leaves). Format characters (Cf) are
# *not* counted: zero-width joiners are part of emoji and of Persian/Indic writing.
_NONPRINTABLE_CATEGORIES = {"Cc", "Co", "Cs", "Cn"}
_REPLACEMENT_CHARACTER = "\ufffd"


def normalize_caption(text: str) -> str:
    """Case-folded, NFKC, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch)[0] in "PSZ" else ch for ch in text)
    return " ".join(kept.split())


def looks_like_file_name(text: str) -> bool:
    """True for captions that are an image file name or a camera/screenshot default name."""
    t = text.strip()
    return bool(_FILE_WITH_EXTENSION.match(t) or _CAMERA_NAME.match(t) or _DATED_NAME.match(t)
                or _HASH_NAME.match(t))


def is_url_only(text: str) -> bool:
    """True when every token of the caption is a URL (separators like ``|`` and commas aside)."""
    tokens = [t for t in _URL_SEPARATORS.split(text.strip()) if t]
    return bool(tokens) and all(_URL.fullmatch(t) for t in tokens)


def character_ratios(text: str) -> dict[str, float]:
    """Fractions of the non-whitespace characters that are letters (incl. combining marks),
    digits, punctuation/symbols, and non-printable."""
    counts = {"letters": 0, "digits": 0, "punctuation": 0, "nonprintable": 0}
    total = 0
    for ch in text:
        if ch.isspace():
            continue
        total += 1
        cat = unicodedata.category(ch)
        if ch == _REPLACEMENT_CHARACTER or cat in _NONPRINTABLE_CATEGORIES:
            counts["nonprintable"] += 1
        elif cat[0] in "LM":
            counts["letters"] += 1
        elif cat[0] == "N":  # decimal digits, and ², ½, Roman numerals
            counts["digits"] += 1
        elif cat[0] in "PS":
            counts["punctuation"] += 1
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def repeated_word_ratio(text: str) -> tuple[float, int]:
    """(1 - distinct words / words, number of words), words case-folded."""
    words = [w.casefold() for w in _WORD.findall(text)]
    if not words:
        return 0.0, 0
    return 1.0 - len(set(words)) / len(words), len(words)


def longest_char_run_ratio(text: str) -> float:
    """Longest stretch made of one 1-4 character unit repeated >= 4 times, over the caption length."""
    t = text.strip()
    if not t:
        return 0.0
    longest = max((m.end() - m.start() for m in _CHAR_RUN.finditer(t)), default=0)
    return longest / len(t)


class CaptionQualityConfig(OperatorConfig):
    """Each check can be switched off with ``null`` (or ``false`` for the boolean ones)."""

    text_column: str = Field("text", description="the caption column to check")
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST),
                                 description="whole captions to reject (replaces the default list)")
    blocklist_extra: list[str] = Field(default_factory=list, description="added to blocklist")
    file_names: bool = Field(True, description="reject captions that are file or camera names")
    url_only: bool = Field(True, description="reject captions made only of URLs")
    max_nonprintable_ratio: float | None = Field(
        0.0, ge=0, le=1, description="control/private-use/U+FFFD characters over non-space characters")
    max_digit_ratio: float | None = Field(0.5, ge=0, le=1)
    max_punctuation_ratio: float | None = Field(0.4, ge=0, le=1, description="punctuation and symbols (incl. emoji)")
    min_letter_ratio: float | None = Field(0.3, ge=0, le=1)
    max_repeated_word_ratio: float | None = Field(
        0.5, ge=0, le=1, description="1 - distinct/total words; 'buy buy buy buy' is 0.75")
    repetition_min_words: int = Field(4, ge=1, description="captions with fewer words skip the word-repetition check")
    max_char_run_ratio: float | None = Field(
        0.5, ge=0, le=1, description="longest run of a repeated 1-4 character unit over caption length")
    char_run_min_chars: int = Field(8, ge=1, description="shorter captions skip the character-run check")

    @model_validator(mode="after")
    def _normalised_blocklist(self) -> "CaptionQualityConfig":
        empty = [b for b in self.blocklist + self.blocklist_extra if not normalize_caption(b)]
        if empty:
            raise ValueError(f"blocklist entries {empty!r} are empty after removing case and punctuation")
        return self


@register
class CaptionQualityFilter(RowFilter):
    """Rejects captions that carry no description of the image (annotates, never drops).

    Input columns: ``text_column`` (``text``), ``reject_reason``.
    Output: ``reject_reason`` = ``caption_quality:<reason>``, first match in this order:
    ``boilerplate`` (the whole caption, case- and punctuation-insensitively, is on the blocklist,
    also with trailing numbers removed: ``Untitled-1``, ``Image 3``),
    ``url_only``, ``file_name`` (``IMG_1234.jpg``, ``DSC00012``, ``Screenshot 2023-01-01``, hex
    digests), ``nonprintable``, ``too_many_digits``, ``too_much_punctuation``, ``too_few_letters``
    (ratios over non-whitespace characters), ``repeated_words``, ``repeated_characters``.
    Null or blank captions pass (``caption_length`` with ``min_words`` handles missing text).
    Resources: a light CPU task, fused with the other filters.
    Failure behaviour: never raises on data.
    """

    name = "caption_quality"
    Config = CaptionQualityConfig

    @classmethod
    def inputs(cls, config: CaptionQualityConfig) -> tuple[str, ...]:
        return (config.text_column,)

    def __init__(self, config: CaptionQualityConfig):
        super().__init__(config)
        self.blocked = {normalize_caption(b) for b in config.blocklist + config.blocklist_extra}

    def reason(self, text: str | None) -> str | None:
        """The first check ``text`` fails, or None."""
        c: CaptionQualityConfig = self.config
        if text is None or not text.strip():
            return None
        normalized = normalize_caption(text)
        if normalized in self.blocked:
            return "boilerplate"
        if c.url_only and is_url_only(text):
            return "url_only"
        if c.file_names and looks_like_file_name(text):
            return "file_name"
        # after the file-name check, so "Screenshot 2023-01-01" is named a file name
        if _TRAILING_NUMBERS.sub("", normalized) in self.blocked:
            return "boilerplate"
        ratios = character_ratios(text)
        if c.max_nonprintable_ratio is not None and ratios["nonprintable"] > c.max_nonprintable_ratio:
            return "nonprintable"
        if c.max_digit_ratio is not None and ratios["digits"] > c.max_digit_ratio:
            return "too_many_digits"
        if c.max_punctuation_ratio is not None and ratios["punctuation"] > c.max_punctuation_ratio:
            return "too_much_punctuation"
        if c.min_letter_ratio is not None and ratios["letters"] < c.min_letter_ratio:
            return "too_few_letters"
        if c.max_repeated_word_ratio is not None:
            ratio, words = repeated_word_ratio(text)
            if words >= c.repetition_min_words and ratio > c.max_repeated_word_ratio:
                return "repeated_words"
        if (c.max_char_run_ratio is not None and len(text.strip()) >= c.char_run_min_chars
                and longest_char_run_ratio(text) > c.max_char_run_ratio):
            return "repeated_characters"
        return None

    def check(self, batch: pa.Table) -> list[str | None]:
        return [self.reason(t) for t in batch[self.config.text_column].to_pylist()]
