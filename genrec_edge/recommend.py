"""The embeddable recommender: ``Recommender.open(model, db)`` then ``rec.recommend(user=42, k=10)``.

What one request does (all under one lock, so an instance is safe to share between threads)::

    history titles (database user or ad-hoc list) -> prompt tokens (prompts.build_prompt_ids)
    copy the instruction prefix's KV (evaluated once at open) -> decode only the history part
    constrained beam search over the catalog trie, seen titles masked inside the search
    -> k distinct unseen catalog titles, best first, with the item ids, year and genres of each

Beam width: ``beam`` at open, else ``default_beam(k) = max(10, 2 * k)`` capped by the capacity the
context was created with (``DEFAULT_BEAM_CAPACITY`` sequences). Scores are summed token log-probabilities
of ``title + EOS`` (no length normalisation): the model's probability of generating exactly that title.

The database is opened read-only per request (SQLite connections belong to one thread); the catalog and
its trie are read once at open.
"""

from __future__ import annotations

import difflib
import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    CatalogMismatchError,
    CorruptModelError,
    EmptyHistoryError,
    NotFoundError,
    UsageError,
)
from .prompts import PromptTemplate, build_prompt_ids, prefix_ids

DEFAULT_K = 10
DEFAULT_BEAM_CAPACITY = 40
DEFAULT_SAMPLE_TEMPERATURE = 1.0


def default_beam(k: int) -> int:
    """Twice k (at least 10): enough slack that the k best rarely fall off the beam early."""
    return max(10, 2 * k)


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # decoding the history part of the prompt (the instruction prefix is cached)
    search_ms: float  # constrained beam search (or sampling)
    total_ms: float  # the whole request, database reads included
    prompt_tokens: int  # prefix + history tokens
    decode_steps: int  # llama_decode calls during the search
    decoded_tokens: int  # tokens decoded during the search (all beams)


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_ids: tuple[int, ...]  # all items with this title (duplicate titles are one result)
    title: str
    year: int | None
    genres: tuple[str, ...]
    score: float  # summed log-probability of the title's tokens + EOS (NaN for a sampled title)


@dataclass(frozen=True)
class Recommendations:
    items: tuple[Recommendation, ...]
    timings: Timings

    def to_dict(self) -> dict:
        return {
            "items": [
                {
                    "rank": r.rank,
                    "item_ids": list(r.item_ids),
                    "title": r.title,
                    "year": r.year,
                    "genres": list(r.genres),
                    "score": r.score if math.isfinite(r.score) else None,  # sampled titles have no score
                }
                for r in self.items
            ],
            "timings": self.timings.__dict__.copy(),
        }


@dataclass(frozen=True)
class Ranking:
    """``rank_titles``' result: catalog titles best first with their scores."""

    titles: tuple[str, ...]
    scores: tuple[float, ...]
    timings: Timings


def _header_checks(path: Path) -> dict:
    """Validate the GGUF header (bounded reads) and return its ``genrec.*`` provenance keys."""
    try:
        from .convert.header import require_llama, validate_gguf_header
    except ImportError:  # converter not installed: llama.cpp's loader is the only check
        return {}
    info = require_llama(validate_gguf_header(path))
    return {k[len("genrec.") :]: v for k, v in info.metadata.items() if k.startswith("genrec.")}


class Recommender:
    """A loaded model + catalog trie + database path. Use :meth:`open`; it is a context manager."""

    def __init__(self, engine, trie, catalog, db_path: Path, template: PromptTemplate, capacity: int, beam):
        self.engine = engine
        self.trie = trie
        self.catalog = catalog
        self.db_path = db_path
        self.template = template
        self.capacity = capacity
        self.beam = beam
        self.lock = threading.RLock()
        self.title_index = {t: i for i, t in enumerate(trie.titles)}
        self.titles_by_id = dict(zip(catalog.item_ids, catalog.titles, strict=True))
        self.prefix = prefix_ids(engine.tokenize, template)
        # 0: instruction prefix, 1..capacity: beams, then the request prompt and the graveyard (engine.py)
        self.prompt_seq = capacity + 1
        self.graveyard_seq = capacity + 2
        self._grammar: str | None = None  # the catalog GBNF, built on the first --sample request
        self.last_search_stats = None
        self._prefill_prefix()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        model: str | Path | None = None,
        db: str | Path | None = None,
        threads: int | None = None,
        beam: int | None = None,
        cache_dir: str | Path | None = None,
        warn=None,
    ) -> Recommender:
        """Load ``model`` (default: models.default_model_path()) for the catalog of ``db``.

        Raises NotFoundError / CorruptModelError for a missing or bad model, DatabaseError for a bad
        database, CatalogMismatchError if the model was trained for another catalog.
        """
        from . import paths
        from .engine import Engine, default_threads
        from .history import HistoryDB
        from .models import default_model_path
        from .trie import load_or_build

        warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        db_path = Path(db) if db is not None else paths.default_db()
        if model is None:
            _check_default_model_catalog(db_path)  # before building it (the first time, ~40 s)
        model_path = Path(model) if model is not None else default_model_path()
        if beam is not None and beam < 1:
            raise UsageError(f"--beam must be >= 1 (got {beam})")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be >= 1 (got {threads})")
        if not model_path.is_file():
            raise NotFoundError(f"model file not found: {model_path}")
        provenance = _header_checks(model_path)

        with HistoryDB.open(db_path, readonly=True) as history:
            catalog = history.catalog()
        if len(catalog) == 0:
            raise NotFoundError(f"the database has no items: {db_path}")

        raw_model = Engine.load_model(model_path)
        engine = None
        try:
            from .engine import model_meta

            if not provenance:  # no header parser available: read the keys through llama.cpp
                for key in ("catalog_sha256", "prompt_template"):
                    value = model_meta(raw_model, "genrec." + key)
                    if value is not None:
                        provenance[key] = value
            arch = model_meta(raw_model, "general.architecture")
            if arch != "llama":
                raise CorruptModelError(f"{model_path}: foreign model (architecture {arch!r}, expected 'llama')")
            template = _template_from(provenance, model_path)
            model_sha = provenance.get("catalog_sha256")
            if model_sha is None:
                warn(
                    f"{model_path.name} has no genrec.catalog_sha256 (a zero-shot base model?): "
                    "serving it for this catalog without a training check"
                )
            elif model_sha != catalog.sha256:
                raise CatalogMismatchError(
                    f"{model_path.name} was trained for catalog {str(model_sha)[:12]}…, but the database "
                    f"{db_path} has catalog {catalog.sha256[:12]}…: train or convert a model for this catalog"
                )

            import llama_cpp

            from .engine import tokenize as vocab_tokenize
            from .engine import tokenizer_fingerprint

            vocab = llama_cpp.llama_model_get_vocab(raw_model)
            eos_id = int(llama_cpp.llama_vocab_eos(vocab))
            trie, _ = load_or_build(
                Path(cache_dir) if cache_dir is not None else paths.cache_dir(),
                tokenizer_fingerprint(raw_model, vocab),
                catalog.sha256,
                catalog.unique_titles,
                lambda text: vocab_tokenize(vocab, text, False),
                eos_id,
            )
            capacity = beam if beam is not None else DEFAULT_BEAM_CAPACITY
            prefix_len = len(prefix_ids(lambda t, s: vocab_tokenize(vocab, t, s), template))
            depth = trie.max_depth
            # Room for the prefix, a full history of the longest titles, and every beam's title.
            n_ctx = prefix_len + template.history_len * depth + capacity * depth + 16
            engine = Engine.open(
                model_path, n_ctx=n_ctx, n_seq_max=capacity + 3, threads=threads or default_threads(),
                model=raw_model,
            )
            return cls(engine, trie, catalog, db_path, template, capacity, beam)
        except BaseException:
            if engine is not None:
                engine.close()  # frees the model too
            else:
                _free_model(raw_model)
            raise

    def close(self) -> None:
        with self.lock:
            self.engine.close()

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prefill_prefix(self) -> None:
        engine = self.engine
        engine.seq_clear(-1)
        engine.decode_sequence(self.prefix, 0, 0, last_logits=False)

    # ------------------------------------------------------------------ requests
    def recommend(
        self,
        user: int | None = None,
        history: Sequence[str] | None = None,
        k: int = DEFAULT_K,
        sample: bool = False,
        seed: int = 0,
        temperature: float = DEFAULT_SAMPLE_TEMPERATURE,
        max_tries: int | None = None,
    ) -> Recommendations:
        """Top-``k`` unseen catalog items for a database ``user`` or an ad-hoc ``history`` of exact titles.

        ``sample=True`` draws titles with llama.cpp's grammar sampler instead (temperature, seed) until
        ``k`` distinct unseen titles or ``max_tries`` samples (default 20 k).
        """
        started = time.perf_counter()
        if (user is None) == (history is None):
            raise UsageError("give exactly one of a user or a history")
        if k < 1:
            raise UsageError(f"k must be >= 1 (got {k})")
        from .history import HistoryDB

        # One read-only connection per request: SQLite connections belong to the thread that opened them.
        with HistoryDB.open(self.db_path, readonly=True) as db:
            titles, seen_titles = self._resolve(db, user, history)
            with self.lock:
                if sample:
                    found, timings = self._sample(titles, seen_titles, k, seed, temperature, max_tries or 20 * k)
                else:
                    ranking = self._rank(titles, seen_titles, k, self.beam)
                    found, timings = list(zip(ranking.titles, ranking.scores, strict=True)), ranking.timings
            items = self._describe(db, found)
        total = (time.perf_counter() - started) * 1000
        return Recommendations(tuple(items), _with_total(timings, total))

    def rank_titles(
        self, history_titles: Sequence[str], seen_titles: Sequence[str] | set[str], k: int, beam: int | None = None
    ) -> Ranking:
        """Top-``k`` catalog titles after ``history_titles``, excluding ``seen_titles`` (no database)."""
        unknown = [t for t in history_titles if t not in self.title_index]
        if unknown:
            raise NotFoundError(_unknown_title_message(unknown[0], self.trie.titles))
        if not history_titles:
            raise EmptyHistoryError("the history is empty: nothing to recommend from")
        with self.lock:
            return self._rank(list(history_titles), set(seen_titles), k, beam if beam is not None else self.beam)

    # ------------------------------------------------------------------ internals
    def _resolve(self, db, user, history) -> tuple[list[str], set[str]]:
        if history is not None:
            history = list(history)
            if not history:
                raise EmptyHistoryError("the history is empty: give at least one title")
            unknown = [t for t in history if t not in self.title_index]
            if unknown:
                raise NotFoundError(_unknown_title_message(unknown[0], self.trie.titles))
            return history, set(history)
        interactions = db.history(int(user), limit=self.template.history_len or None)
        if not interactions:
            raise EmptyHistoryError(f"user {user} has no history to recommend from")
        seen_ids = db.seen_items(int(user))
        titles_by_id = self.titles_by_id
        # An item added after open() is not in this catalog (nor in the trie): nothing to exclude.
        seen_titles = {titles_by_id[i] for i in seen_ids if i in titles_by_id}
        return [x.title for x in interactions], seen_titles

    def _prepare(self, titles: list[str], seen_titles: set[str]):
        """Unseen counts and the prompt decoded into the request sequence; returns the pieces."""
        from .engine import log_softmax

        trie = self.trie
        seen = [self.title_index[t] for t in seen_titles if t in self.title_index]
        unseen = trie.unseen_counts(seen)
        if unseen[0] == 0:
            raise UsageError("every catalog title is already in this history: nothing left to recommend")
        engine = self.engine
        prompt = build_prompt_ids(engine.tokenize, engine.eos_id, titles, self.template)
        if prompt[: len(self.prefix)] != self.prefix:  # the cached prefix KV would be wrong
            raise CorruptModelError("the tokenizer does not reproduce the instruction prefix")
        t0 = time.perf_counter()
        for seq in range(1, engine.n_seq_max):
            engine.seq_clear(seq)
        engine.seq_copy(0, self.prompt_seq, -1, -1)
        engine.decode_sequence(prompt[len(self.prefix) :], self.prompt_seq, len(self.prefix))
        log_probs = log_softmax(engine.logits(-1))
        prefill_ms = (time.perf_counter() - t0) * 1000
        return unseen, prompt, log_probs, prefill_ms

    def _rank(self, titles: list[str], seen_titles: set[str], k: int, beam: int | None) -> Ranking:
        from .engine import SearchStats, constrained_beam_search

        width = min(beam if beam is not None else default_beam(k), self.capacity)
        unseen, prompt, log_probs, prefill_ms = self._prepare(titles, seen_titles)
        stats = SearchStats()
        results = constrained_beam_search(
            self.engine, self.trie, unseen, len(prompt), log_probs, k, width, stats, prompt_seq=self.prompt_seq,
            graveyard_seq=self.graveyard_seq,
        )
        # A narrow beam can lose every path to the k-th title; search again without the titles found
        # (rare) so the answer has k items whenever the catalog has k unseen titles.
        while len(results) < k:
            found = [i for i, _ in results]
            more_unseen = self.trie.unseen_counts(
                [self.title_index[t] for t in seen_titles if t in self.title_index] + found
            )
            if more_unseen[0] == 0:
                break
            more = constrained_beam_search(
                self.engine, self.trie, more_unseen, len(prompt), log_probs, k - len(results), width, stats,
                prompt_seq=self.prompt_seq, graveyard_seq=self.graveyard_seq,
            )
            if not more:
                break
            results = sorted(results + more, key=lambda r: -r[1])
        self.last_search_stats = stats  # for the benchmark: per-step batch sizes, time inside llama_decode
        timings = Timings(prefill_ms, stats.search_ms, 0.0, len(prompt), stats.decode_steps, stats.decoded_tokens)
        return Ranking(
            tuple(self.trie.titles[i] for i, _ in results), tuple(float(s) for _, s in results), timings
        )

    def _sample(self, titles, seen_titles, k, seed, temperature, max_tries):
        from .engine import GrammarSampler
        from .grammar import grammar_for_titles

        unseen, prompt, _, prefill_ms = self._prepare(titles, seen_titles)
        t0 = time.perf_counter()
        if self._grammar is None:
            self._grammar = grammar_for_titles(self.trie.titles)  # built and validated once
        sampler = GrammarSampler(self.engine, self._grammar, temperature, seed, validated=True)
        found: dict[str, float] = {}
        steps = tokens = 0
        # GBNF allows non-canonical (longer) token splits; the beams' cells bound what fits in the context.
        max_tokens = min(4 * self.trie.max_depth + 8, self.capacity * self.trie.max_depth)
        try:
            for _ in range(max_tries):
                if len(found) >= k:
                    break
                out = sampler.sample_title(self.prompt_seq, prompt, 1, max_tokens)
                if out is None:
                    continue
                steps += len(out) + 1
                tokens += len(out) + 1
                title = self.engine.detokenize(out)
                # Titles outside the catalog cannot happen (the grammar's language is the catalog); the
                # check keeps that a guarantee rather than an assumption.
                if title in self.title_index and title not in seen_titles and title not in found:
                    found[title] = float("nan")
        finally:
            sampler.close()
        search_ms = (time.perf_counter() - t0) * 1000
        timings = Timings(prefill_ms, search_ms, 0.0, len(prompt), steps, tokens)
        return [(t, s) for t, s in found.items()], timings

    def _describe(self, db, found) -> list[Recommendation]:
        out = []
        for rank, (title, score) in enumerate(found, start=1):
            ids = self.catalog.title_to_items[title]
            item = db.item(ids[0])
            out.append(Recommendation(rank, tuple(ids), title, item.year, item.genres, float(score)))
        return out


def _free_model(model) -> None:
    import llama_cpp

    llama_cpp.llama_model_free(model)


def _with_total(timings: Timings, total_ms: float) -> Timings:
    return Timings(
        timings.prefill_ms, timings.search_ms, total_ms, timings.prompt_tokens, timings.decode_steps,
        timings.decoded_tokens,
    )


def _template_from(provenance: dict, model_path: Path) -> PromptTemplate:
    import json

    raw = provenance.get("prompt_template")
    if raw is None:
        return PromptTemplate()
    try:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
        return PromptTemplate.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise CorruptModelError(f"{model_path}: bad genrec.prompt_template ({exc})") from None


def _check_default_model_catalog(db_path: Path) -> None:
    """The shipped default model is for the bundled catalog: refuse another database's before building it."""
    import json

    from .default_model import shipped_adapter
    from .history import HistoryDB

    adapter = shipped_adapter()
    if adapter is None:
        return
    trained_for = json.loads((adapter / "genrec_run.json").read_text(encoding="utf-8")).get("catalog_sha256")
    with HistoryDB.open(db_path, readonly=True) as history:
        catalog = history.catalog()
    if trained_for and trained_for != catalog.sha256:
        raise CatalogMismatchError(
            f"the default model was trained for catalog {trained_for[:12]}… (the bundled ml-latest-small), but "
            f"the database {db_path} has catalog {catalog.sha256[:12]}…: pass --model with a model for it"
        )


def _unknown_title_message(title: str, titles: Sequence[str]) -> str:
    close = difflib.get_close_matches(title, titles, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown title {title!r} (titles must match the catalog exactly){hint}"
