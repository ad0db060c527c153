"""The item catalog as the model sees it: titles, merged duplicates, and its hash.

A catalog is the ordered list of (item id, title) pairs of one database. Its sha256 is what a model is
bound to: the converter writes it into the GGUF (``genrec.catalog_sha256``) and the runtime refuses a
model whose hash differs from the database's.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field

from .errors import CatalogMismatchError

# What str.splitlines() breaks a line at; with the spaces around them.
_LINE_BREAKS = re.compile(r"\s*[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+\s*")


def one_line(title: str) -> str:
    """``title`` with each run of line breaks (and the spaces around it) as one space. A prompt lists one title
    per line, so a title that spans two (a quoted CSV field with a newline) would read as two items."""
    return _LINE_BREAKS.sub(" ", title)


def title_spellings(title: str) -> tuple[str, ...]:
    """The spellings of ``title`` to look up, in order: itself; its NFC form (decomposed Unicode, as pasted
    from macOS: 'Jûsan' as u + combining circumflex); that on one line (as ingest stores titles)."""
    composed = unicodedata.normalize("NFC", title)
    return tuple(dict.fromkeys((title, composed, one_line(composed))))


def catalog_sha256(items: list[tuple[int, str]]) -> str:
    """sha256 over the catalog's titles in item-id order: JSON ``[[id, title], ...]``, UTF-8, no spaces."""
    ordered = sorted(items, key=lambda pair: pair[0])
    payload = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def check_model_catalog(
    trained_for: str | None, catalog_sha: str, model: str = "model", database: str = "the database"
) -> bool:
    """Is a model whose ``genrec.catalog_sha256`` is ``trained_for`` fit for a database of catalog ``catalog_sha``?

    True: the same catalog. False: the model has no catalog hash (a zero-shot base), served with a warning.
    Raises :class:`~genrec_edge.errors.CatalogMismatchError` for a model trained for another catalog;
    ``model`` and ``database`` name the two in its message.
    """
    if trained_for is None:
        return False
    if trained_for != catalog_sha:
        raise CatalogMismatchError(
            f"{model} was trained for catalog {str(trained_for)[:12]}…, but {database} has catalog "
            f"{catalog_sha[:12]}…: train or convert a model for this catalog"
        )
    return True


@dataclass(frozen=True)
class Catalog:
    """Items by id, plus the merge of duplicate titles (a hit is a title match)."""

    item_ids: tuple[int, ...]
    titles: tuple[str, ...]
    sha256: str = ""
    title_to_items: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, str]]) -> Catalog:
        ordered = sorted(pairs, key=lambda pair: pair[0])
        merged: dict[str, list[int]] = {}
        for item_id, title in ordered:
            merged.setdefault(title, []).append(item_id)
        return cls(
            item_ids=tuple(i for i, _ in ordered),
            titles=tuple(t for _, t in ordered),
            sha256=catalog_sha256(ordered),
            title_to_items={t: tuple(ids) for t, ids in merged.items()},
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def unique_titles(self) -> list[str]:
        """Distinct titles, in order of first appearance (item-id order)."""
        return list(self.title_to_items)

    def title_of(self, item_id: int) -> str:
        return self._title_by_id()[item_id]

    def _title_by_id(self) -> dict[int, str]:
        cached = self.__dict__.get("_by_id")
        if cached is None:
            cached = dict(zip(self.item_ids, self.titles, strict=True))
            object.__setattr__(self, "_by_id", cached)
        return cached
