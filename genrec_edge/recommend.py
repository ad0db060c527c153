"""The embeddable recommender: ``Recommender.open(model, db)`` then ``rec.recommend(user=42, k=10)``.

What one request does (all under one lock, so an instance is safe to share between threads)::

    history titles (database user or ad-hoc list) -> prompt tokens (prompts.build_prompt_ids)
    copy the instruction prefix's KV (evaluated once at open) -> decode only the history part
    the collaborative prior's log P_CF over the unseen titles -> per-trie-node prior mass (cf.py)
    constrained beam search over the catalog trie (search.py), seen titles masked inside the search,
    scored log P_LM(title) + λ · log P_CF(title)
    -> k distinct unseen catalog titles, best first, with the item ids, year and genres of each

The prior: a model may have a ``cf-prior.json`` sidecar (kind, λ, variant; see ``cf.py``) next to its
GGUF; it is used unless the caller asks for another (``prior="none"`` is the pure language model,
``"pop"`` a popularity prior counted from the database, ``"sasrec"`` the sidecar's SASRec).
``recommend_many`` runs several requests' searches together: their beams share each llama_decode.

Beam width: ``beam`` at open, else ``default_beam(k) = max(10, 2 * k)`` capped by the capacity the
context was created with (``DEFAULT_BEAM_CAPACITY`` sequences per request slot with ``batch=1``;
``default_beam(DEFAULT_K)`` = 20 per slot with ``batch`` >= 2: a request whose beam is wider is searched
alone, with every slot's beams, so it gets ``batch=1``'s width and answer). Scores are summed token
log-probabilities of ``title + EOS`` (no length normalisation): the model's probability of generating exactly that title.

The database is opened read-only per request (SQLite connections belong to one thread); the catalog and
its trie are read once at open.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import operator
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import check_model_catalog, title_spellings
from .errors import (
    CatalogMismatchError,
    CorruptModelError,
    EmptyHistoryError,
    NotFoundError,
    UnknownItemError,
    UsageError,
    stop_if_cancelled,
)
from .prompts import PromptTemplate, build_prompt_ids, prefix_ids

if TYPE_CHECKING:
    import numpy as np

    from .cf import CFPrior
    from .search import SearchStats

DEFAULT_K = 10
# The most titles the CLI and the HTTP API return per request. Past the beam's capacity the search runs again
# without the titles found (user 42 on 2 cores: 6.3 s for k = 100); the Python API takes any k.
MAX_K = 100
DEFAULT_BEAM_CAPACITY = 40
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
DEFAULT_SAMPLE_TEMPERATURE = 1.0
SAMPLE_TRIES_PER_TITLE = 20  # sample=True draws at most this many samples per title asked for, by default

# λ beyond this makes log P_LM vanish below the rounding of λ·log P_CF (a λ of 1e20 gave lm_score 0.0): the
# ranking is the prior's alone, which --prior-weight cannot be meant to ask. Tuned values here are 1 to 5.
MAX_PRIOR_WEIGHT = 1000.0


def check_prior_weight(weight) -> None:
    """UsageError unless ``weight`` is a number (not a bool) in [0, MAX_PRIOR_WEIGHT]."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) \
            or not 0 <= weight <= MAX_PRIOR_WEIGHT:
        raise UsageError(f"the prior weight must be a number from 0 to {MAX_PRIOR_WEIGHT:g} (got {weight!r})")


def default_beam(k: int) -> int:
    """Twice k (at least 10): enough slack that the k best rarely fall off the beam early."""
    return max(10, 2 * k)


def _slot_capacity(beam: int | None, batch: int, prior: CFPrior | None) -> int:
    """Beams (llama.cpp sequences) per request slot of a context opened for ``batch`` requests at a time."""
    if beam is not None:
        return beam
    capacity = DEFAULT_BEAM_CAPACITY if batch == 1 else default_beam(DEFAULT_K)
    if prior is not None and prior.config.variant == "rerank":
        capacity = max(capacity, prior.config.candidates)  # one exact search over the candidates
    return capacity


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # decoding the history part of the prompt (the instruction prefix is cached)
    search_ms: float  # constrained beam search (or sampling); shared by the requests of one batch
    total_ms: float  # the whole request, database reads included
    prompt_tokens: int  # prefix + history tokens
    decode_steps: int  # llama_decode calls during the search
    decoded_tokens: int  # tokens decoded during the search (all beams)
    prior_ms: float = 0.0  # the collaborative prior: its forward pass and the trie's node masses
    prefilled_tokens: int = 0  # prompt tokens decoded for this request (0: its prompt was restored, or cached)


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_ids: tuple[int, ...]  # all items with this title (duplicate titles are one result)
    title: str
    year: int | None
    genres: tuple[str, ...]
    score: float  # what ranks: log P_LM + λ · log P_CF, up to a per-user constant (NaN for a sampled title)
    lm_score: float = float("nan")  # log P_LM(title + EOS | history): the model's own log-probability


@dataclass(frozen=True)
class FirstStep:
    """The first constrained step of a search (``first_step=True``): every token a title can start with,
    the model's log-probability of each after the prompt, and whether it still leads to an unseen title."""

    tokens: np.ndarray  # the trie root's child tokens, ascending
    log_probs: np.ndarray  # float64 log P_LM(token | prompt), full-vocabulary normalisation
    allowed: np.ndarray  # bool: the search may expand it (an unseen title below)


@dataclass(frozen=True)
class Recommendations:
    items: tuple[Recommendation, ...]
    timings: Timings
    prior: str = "none"  # the prior used: "none", "pop" or "sasrec"
    prior_weight: float = 0.0  # its λ
    stats: SearchStats | None = field(default=None, repr=False, compare=False)  # per-decode detail (bench)
    first_step: FirstStep | None = field(default=None, repr=False, compare=False)
    cached: bool = False  # answered from the recommender's result cache (``Recommender.open(cache=...)``)

    def to_dict(self) -> dict:
        out = {
            "items": [
                {
                    "rank": r.rank,
                    "item_ids": list(r.item_ids),
                    "title": r.title,
                    "year": r.year,
                    "genres": list(r.genres),
                    "score": _finite(r.score),  # sampled titles have no score
                    "lm_score": _finite(r.lm_score),
                }
                for r in self.items
            ],
            "prior": self.prior,
            "prior_weight": self.prior_weight,
            "timings": self.timings.__dict__.copy(),
        }
        if self.cached:  # only then: batch files and `recommend --json` (never cached) keep their shape
            out["cached"] = True
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Ranking:
    """``rank_titles``' result: catalog titles best first with their scores (fused) and LM scores."""

    titles: tuple[str, ...]
    scores: tuple[float, ...]
    timings: Timings
    lm_scores: tuple[float, ...] = ()
    prior: str = "none"
    prior_weight: float = 0.0
    stats: SearchStats | None = field(default=None, repr=False, compare=False)
    first_step: FirstStep | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Request:
    """One request of :meth:`Recommender.recommend_many`: a database ``user`` or an ad-hoc ``history``."""

    user: int | None = None
    history: tuple[str, ...] | None = None
    prior: str | None = None  # None: the recommender's default; "none", "pop", "sasrec"
    prior_weight: float | None = None  # None: the prior's own λ
    first_step: bool = False  # also return the first constrained step's log-probs (Recommendations.first_step)
    exclude: tuple[int, ...] = ()  # item ids not to recommend, besides the history's (a cart, items shown before)
    only: tuple[int, ...] | None = None  # recommend from these item ids alone (None: the whole catalog)

    @classmethod
    def one_of(cls, user: int | None, history: Sequence[str] | None, prior: str | None = None,
               prior_weight: float | None = None, first_step: bool = False, exclude: Iterable[int] | None = (),
               only: Iterable[int] | None = None) -> Request:
        """The request for exactly one of a ``user`` or a ``history`` (UsageError for both or neither)."""
        if (user is None) == (history is None):
            raise UsageError("give exactly one of a user or a history")
        return cls(user=None if user is None else _user_id(user), history=None if history is None else _titles(history),
                   prior=prior, prior_weight=prior_weight, first_step=first_step,
                   exclude=() if exclude is None else _item_ids(exclude, "exclude"),
                   only=None if only is None else _item_ids(only, "only"))

    @classmethod
    def of(cls, value) -> Request:
        if isinstance(value, Request):  # checked like any other: Request(user=1.5) was searched for user 1
            return cls.one_of(value.user, value.history, value.prior, value.prior_weight, value.first_step,
                              value.exclude, value.only)
        if value is None or isinstance(value, bool):
            raise UsageError(f"not a user id or a history: {value!r}")
        if hasattr(value, "__index__"):  # an int, or a numpy integer
            return cls(user=_user_id(value))
        return cls(history=_titles(value))


def _titles(history) -> tuple[str, ...]:
    """A history as a tuple of titles; one string (whose characters would each be a 'title') is refused."""
    if isinstance(history, str | bytes):
        raise UsageError("a history is a list of titles, not one string: wrap it in a list")
    try:
        titles = tuple(history)
    except TypeError:
        raise UsageError(f"a history is a list of titles, not {type(history).__name__}") from None
    for title in titles:
        if not isinstance(title, str):
            raise UsageError(f"a history holds titles (strings), not {title!r}")
    return titles


def _user_id(value) -> int:
    """A user id as an int (numpy integers too); a bool, a float or a string is refused, as over HTTP."""
    return _whole(value, "a user id")


def _item_ids(values, name: str) -> tuple[int, ...]:
    """``exclude`` / ``only`` as a sorted tuple of distinct item ids (a list, set, tuple or numpy array of ints)."""
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__iter__"):
        raise UsageError(f"{name} is a list of item ids, not {values!r}")
    try:
        values = list(values)
    except TypeError:  # a 0-d numpy array has __iter__, and refuses it
        raise UsageError(f"{name} is a list of item ids, not {values!r}") from None
    return tuple(sorted({_whole(v, f"an item id in {name}") for v in values}))


def check_item_ids(known, exclude: Sequence[int], only: Sequence[int] | None, catalog: str) -> None:
    """UnknownItemError (a NotFoundError) naming the first ``exclude`` / ``only`` id not in ``known`` (the
    ``catalog`` named)."""
    for name, ids in (("exclude", exclude), ("only", only or ())):
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise UnknownItemError(f"unknown item {unknown[0]} in {name}: not in {catalog}", unknown[0], name)


def _lru_put(store: OrderedDict, key, value, size: int) -> None:
    """``store[key] = value`` as its most recent entry, the least recent ones out past ``size``."""
    store[key] = value
    store.move_to_end(key)
    while len(store) > size:
        store.popitem(last=False)


def stderr_warning(message: str) -> None:
    """Where a warning goes when the caller gives no ``warn``: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def model_provenance(path: Path) -> dict:
    """Validate the GGUF header (bounded reads, a LLaMA model) and return its ``genrec.*`` provenance keys."""
    from .convert import provenance_of, require_llama, validate_gguf_header

    return provenance_of(require_llama(validate_gguf_header(path)))


PRIOR_CHOICES = ("none", "pop", "sasrec")
MAX_THREADS = 512  # GGML_MAX_N_THREADS
MAX_SEED = 2**32 - 2  # llama.cpp's sampler seed is 32 bits; 2**32 - 1 is LLAMA_DEFAULT_SEED, "random"


class Recommender:
    """A loaded model + catalog trie + database path (+ a collaborative prior). Use :meth:`open`."""

    def __init__(self, engine, trie, catalog, db_path: Path, template: PromptTemplate, capacity: int, beam,
                 batch: int = 1, prior: CFPrior | None = None, model_dir: Path | None = None, cache: int = 0,
                 prompt_cache: int = 0):
        self.engine = engine
        self.trie = trie
        self.catalog = catalog
        self.db_path = db_path
        self.template = template
        self.capacity = capacity
        self.beam = beam
        self.batch = batch
        # The widest beam a request searched alone gets: what ``batch=1`` gives it, from every slot's beams.
        self.lone_capacity = min(_slot_capacity(beam, 1, prior), batch * capacity)
        self.lock = threading.RLock()
        self._closed = False
        self.title_index = {t: i for i, t in enumerate(trie.titles)}
        self.titles_by_id = dict(zip(catalog.item_ids, catalog.titles, strict=True))
        self.first_item = {t: ids[0] for t, ids in catalog.title_to_items.items()}
        self.prefix = prefix_ids(engine.tokenize, template)
        # Sequences (engine.py, search.py): 0 the instruction prefix; request slot r has its prompt at
        # 1 + r * (capacity + 1) and its beams right after; the last id is the shared graveyard.
        self.graveyard_seq = 1 + batch * (capacity + 1)
        self.priors: dict[str, CFPrior] = {}
        if prior is not None:
            self.priors[prior.kind] = prior
        self.default_prior = prior.kind if prior is not None else "none"
        self.model_dir = model_dir
        self.jump_forward = True
        self.cache_size = cache
        self._cache: OrderedDict[bytes, Ranking] = OrderedDict()  # search inputs' digest -> result, oldest first
        self.prompt_cache_size = prompt_cache
        # prompt token ids -> (the prompt sequence's KV cells, its last logits row), oldest first
        self._prompts: OrderedDict[tuple[int, ...], tuple[object, np.ndarray]] = OrderedDict()
        self.prompt_hits = 0  # prompts restored instead of decoded
        self._grammar: str | None = None  # the catalog GBNF, built on the first --sample request
        self._catalog_mark: tuple | None = None  # the database file and stored catalog hash it was opened on
        self._prefill_prefix()

    @property
    def model_path(self) -> Path:
        return Path(self.engine.path)

    @property
    def prompt_seq(self) -> int:
        return self._slot_seqs(0)[0]

    def _slot_seqs(self, slot: int) -> tuple[int, list[int]]:
        prompt = 1 + slot * (self.capacity + 1)
        return prompt, list(range(prompt + 1, prompt + 1 + self.capacity))

    def _lone_seqs(self) -> tuple[int, list[int]]:
        """Slot 0's prompt and the beams of every slot: a request searched alone (its sequences, and the
        cells ``open`` sized for ``batch`` slots, hold ``lone_capacity`` beams)."""
        beams = [seq for slot in range(self.batch) for seq in self._slot_seqs(slot)[1]]
        return self._slot_seqs(0)[0], beams[: self.lone_capacity]

    def _group_size(self, k: int, beam: int | None) -> int:
        """Requests per search: ``batch``, or 1 when ``k``'s beam is wider than a slot holds. Alone, a
        request gets every slot's beams, so its width (and its answer) is the one ``batch=1`` gives."""
        want = beam if beam is not None else default_beam(k)
        return 1 if min(want, self.lone_capacity) > self.capacity else self.batch

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
        prior: str | Path | CFPrior | None = None,
        prior_weight: float | None = None,
        batch: int = 1,
        jump_forward: bool = True,
        flash_attn: bool | None = None,
        cache: int = 0,
        prompt_cache: int = 0,
    ) -> Recommender:
        """Load ``model`` (default: models.default_model_path()) for the catalog of ``db``.

        ``prior``: None uses the model's ``cf-prior.json`` sidecar if it has one (else no prior);
        ``"none"`` the pure language model; ``"pop"`` popularity counted from ``db``; ``"sasrec"`` the
        sidecar's SASRec (NotFoundError without one); a directory holding a sidecar; or a loaded
        :class:`~genrec_edge.cf.CFPrior`. ``prior_weight`` replaces its λ. ``batch``: how many requests
        :meth:`recommend_many` searches together (each needs ``capacity + 1`` sequences and its cells).
        ``jump_forward=False`` decodes forced title suffixes one step at a time, as before search.py's
        jump-forward (same results, more llama_decode calls: for benchmarks). ``flash_attn=False`` swaps
        llama.cpp's attention kernel (``Engine.open``; changes scores: for ``bench.attention_cost`` only).
        ``cache``: how many searches :meth:`recommend_many` keeps, least recently used out first (0: none).
        A request whose search inputs - prompt titles, seen titles, the prior's item history, prior, λ, k,
        beam - equal a kept one's gets its result back without a search (``Recommendations.cached``); a
        user's new interaction changes those inputs, so the answer is never stale. For a server asked the
        same users again (``serve --cache``); the items' descriptions are read from the database each time.
        ``first_step`` requests are never kept (their arrays are the caller's).
        ``prompt_cache``: how many decoded prompts (their KV cells and last logits, ~6 MB each for the default
        model) to keep, least recently used out first (0: none). A request whose prompt - the instruction
        and the user's last titles - equals a kept one's restores it instead of decoding it again (its
        ``prefill_ms`` is the copy's, under a millisecond here): the same user asked with another ``k``, filter, prior or
        beam, as a page of several shelves or "show more" asks. The cells restored are the ones decoded, so
        results are identical to the bit (tested).

        Raises NotFoundError / CorruptModelError for a missing or bad model, DatabaseError for a bad
        database, CatalogMismatchError if the model (or the prior) was made for another catalog.
        """
        from . import paths
        from .engine import Engine, default_threads
        from .history import HistoryDB
        from .models import default_model_path, require_model_file
        from .trie import load_or_build

        warn = warn or stderr_warning
        db_path = Path(db) if db is not None else paths.default_db()
        beam = None if beam is None else _whole(beam, "--beam", 1)
        threads = None if threads is None else _whole(threads, "--threads", 1)
        if threads is not None and threads > MAX_THREADS:  # 100,000 segfaulted inside ggml, 10**6 aborted
            raise UsageError(f"--threads is at most {MAX_THREADS}, llama.cpp's limit (got {threads})")
        batch = _whole(batch, "batch", 1)
        cache = _whole(cache, "the result cache (searches kept)", 0)
        prompt_cache = _whole(prompt_cache, "the prompt cache (prompts kept)", 0)
        if isinstance(prior, str) and prior not in PRIOR_CHOICES and not Path(prior).is_dir():
            raise UsageError(f"unknown prior {prior!r}; use one of {', '.join(PRIOR_CHOICES)} or a directory")
        if prior_weight is not None:
            check_prior_weight(prior_weight)
        if model is None:
            check_default_model_catalog(db_path)  # before building it (the first time, ~40 s)
        model_path = Path(model) if model is not None else default_model_path()
        require_model_file(model_path)
        provenance = model_provenance(model_path)

        with HistoryDB.open(db_path, readonly=True) as history:
            catalog = history.catalog()
            catalog_mark = _catalog_mark(db_path, history)
        if len(catalog) == 0:
            raise NotFoundError(f"the database has no items: {db_path}")
        loaded_prior = load_prior(prior, prior_weight, model_path.parent, catalog, db_path)
        capacity = _slot_capacity(beam, batch, loaded_prior)
        if 2 + batch * (capacity + 1) > MAX_SEQUENCES:
            raise UsageError(
                f"batch {batch} x beam {capacity} needs {2 + batch * (capacity + 1)} llama.cpp sequences; "
                f"at most {MAX_SEQUENCES}: lower the batch or the beam"
            )

        raw_model = Engine.load_model(model_path)
        engine = None
        try:
            template = _template_from(provenance, model_path)
            if not check_model_catalog(provenance.get("catalog_sha256"), catalog.sha256, model=model_path.name,
                                       database=f"the database {db_path}"):
                warn(
                    f"{model_path.name} has no genrec.catalog_sha256 (a zero-shot base model?): "
                    "serving it for this catalog without a training check"
                )

            from .engine import (
                llama_cpp,  # engine.py sets OpenMP's environment before llama_cpp loads
                tokenizer_fingerprint,
            )
            from .engine import tokenize as vocab_tokenize

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
            prefix_len = len(prefix_ids(lambda t, s: vocab_tokenize(vocab, t, s), template))
            depth = trie.max_depth
            # Room for the prefix and, per request slot, a full history of the longest titles, every beam's
            # title and as much again decoded ahead on forced suffixes (search.py's speculation budget).
            n_ctx = prefix_len + batch * (template.history_len * depth + 2 * capacity * depth) + 16
            if prompt_cache:  # a restored prompt has its own copy of the prefix's cells
                n_ctx += batch * prefix_len
            engine = Engine.open(
                model_path, n_ctx=n_ctx, n_seq_max=2 + batch * (capacity + 1), threads=threads or default_threads(),
                model=raw_model, flash_attn=flash_attn,
            )
            rec = cls(engine, trie, catalog, db_path, template, capacity, beam, batch, loaded_prior,
                      model_path.parent, cache, prompt_cache)
            rec.jump_forward = jump_forward
            rec._catalog_mark = catalog_mark
            return rec
        except BaseException:
            if engine is not None:
                engine.close()  # frees the model too
            else:
                _free_model(raw_model)
            raise

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.engine.close()
            self._prompts.clear()  # ~6 MB each: not kept for a closed recommender someone still holds
            self._cache.clear()

    @contextlib.contextmanager
    def _engine(self):
        """The lock that serialises requests; UsageError once closed (the model's memory is freed: a call
        into it would crash the process)."""
        with self.lock:
            if self._closed:
                raise UsageError("this Recommender is closed: open another with Recommender.open")
            yield

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
        prior: str | None = None,
        prior_weight: float | None = None,
        first_step: bool = False,
        progress: Callable[[int, int], None] | None = None,
        exclude: Iterable[int] | None = (),
        only: Iterable[int] | None = None,
    ) -> Recommendations:
        """Top-``k`` unseen catalog items for a database ``user`` or an ad-hoc ``history`` of exact titles.

        ``prior`` / ``prior_weight``: this request's choice (see :meth:`open`; None = the default).
        ``first_step``: also return the first constrained step's log-probabilities (``FirstStep``).
        ``exclude``: item ids not to recommend, besides those already in the history (a cart, titles shown
        before); ``only``: item ids to recommend from (None: the whole catalog). An id that is not in the catalog
        raises :class:`~genrec_edge.errors.NotFoundError`. Both are masks inside the exact search, like the seen
        titles: the answer is the search over what is left, not the unfiltered top-k with items removed, so it
        still has ``k`` items whenever ``k`` are left. ``sample=True`` takes ``exclude`` (dropped like seen titles)
        but not ``only``: the sampler draws from the whole catalog, so it would rarely draw an allowed title.
        ``sample=True`` draws titles with llama.cpp's grammar sampler instead (temperature, seed) until
        ``k`` distinct unseen titles or ``max_tries`` samples (default ``SAMPLE_TRIES_PER_TITLE * k``); no prior.
        ``progress(samples drawn, distinct titles found)`` is called after each sample (a low temperature draws
        the same titles again and again: long runs).
        """
        request = Request.one_of(user, history, prior, prior_weight, first_step, exclude, only)
        if not sample:
            return self.recommend_many([request], k=k)[0]
        started = time.perf_counter()
        k = _check_k(k)
        user, history = request.user, request.history  # a generator given as the history is read once, there
        if prior is not None or prior_weight is not None:
            raise UsageError("sampling fuses no prior: drop prior / prior_weight, or search instead (sample=False)")
        if request.only is not None:
            raise UsageError("sampling draws from the whole catalog, so it would rarely find a title of only: drop "
                             "only, or search instead (sample=False)")
        max_tries = None if max_tries is None else _whole(max_tries, "max_tries", 1)
        seed = _whole(seed, "the sampling seed")
        if not 0 <= seed <= MAX_SEED:  # llama.cpp keeps 32 bits, and 0xFFFFFFFF means "a random seed"
            raise UsageError(f"the sampling seed must be from 0 to {MAX_SEED} (got {seed}): each seed gives the "
                             "same titles again")
        if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
                                                  and temperature > 0):
            raise UsageError(f"the sampling temperature must be a finite number > 0 (got {temperature!r}); "
                             "for the most likely titles, search instead (sample=False)")
        temperature = float(temperature)  # a numpy float too
        from .history import HistoryDB

        with HistoryDB.open(self.db_path, readonly=True) as db:
            self._check_catalog(db)
            titles, seen_titles, _ = self._resolve(db, request)
            with self._engine():
                found, timings = self._sample(titles, seen_titles, k, seed, temperature,
                                              max_tries or SAMPLE_TRIES_PER_TITLE * k, progress)
            items = self._describe(db, [(t, s, s) for t, s in found])
        total = (time.perf_counter() - started) * 1000
        return Recommendations(tuple(items), _with_total(timings, total))

    def recommend_many(self, requests: Sequence, k: int = DEFAULT_K,
                       cancel: Callable[[], bool] | None = None) -> list[Recommendations]:
        """Top-``k`` for each request (a user id, a list of titles, or a :class:`Request`), in order.

        Up to ``batch`` (set at open) requests are searched together: their beams share each
        llama_decode. Each result is the one :meth:`recommend` gives for that request alone.
        A bad request (unknown user, empty history, unknown title) raises before any search runs.
        ``cancel``: asked between llama.cpp calls (and once the lock is ours) whether the answers are still
        wanted; True raises :class:`~genrec_edge.errors.SearchCancelled` (the stopped group's answers are
        not cached; the next call is unaffected). An HTTP server passes "every client of these requests has
        disconnected".
        """
        started = time.perf_counter()
        k = _check_k(k)
        if isinstance(requests, str | bytes) or not hasattr(requests, "__iter__"):
            raise UsageError(f"recommend_many takes a list of requests (user ids, title lists), not {requests!r}")
        requests = [Request.of(r) for r in requests]
        from .history import HistoryDB

        out: list[Recommendations] = []
        with HistoryDB.open(self.db_path, readonly=True) as db:
            self._check_catalog(db)
            resolved = [self._resolve(db, r) for r in requests]
            priors = [self._prior_for(r.prior, r.prior_weight) for r in requests]
            keys = [self._cache_key(resolved[i], priors[i], k, r.first_step) for i, r in enumerate(requests)]
            rankings: list[Ranking | None] = [None] * len(requests)
            cached = [False] * len(requests)
            with self._engine():
                stop_if_cancelled(cancel)
                for i, key in enumerate(keys):
                    if key is not None and key in self._cache:
                        self._cache.move_to_end(key)
                        rankings[i], cached[i] = self._cache[key], True
                todo = [i for i in range(len(requests)) if rankings[i] is None]
                size = self._group_size(k, self.beam)
                for first in range(0, len(todo), size):
                    group = todo[first : first + size]
                    found = self._rank_group(
                        [(resolved[i][0], resolved[i][1], resolved[i][2], priors[i]) for i in group], k, self.beam,
                        first_step=[requests[i].first_step for i in group], cancel=cancel,
                    )
                    for i, ranking in zip(group, found, strict=True):
                        rankings[i] = ranking
                        self._remember(keys[i], ranking)
            for ranking, hit in zip(rankings, cached, strict=True):
                found = list(zip(ranking.titles, ranking.scores, ranking.lm_scores, strict=True))
                timings = ranking.timings if not hit else Timings(0.0, 0.0, 0.0, ranking.timings.prompt_tokens, 0, 0)
                out.append(Recommendations(tuple(self._describe(db, found)), timings, ranking.prior,
                                           ranking.prior_weight, None if hit else ranking.stats, ranking.first_step,
                                           cached=hit))
        total = (time.perf_counter() - started) * 1000
        return [_replace_total(r, total) for r in out]  # a batch's requests share its wall time

    def rank_titles(
        self, history_titles: Sequence[str], seen_titles: Sequence[str] | set[str], k: int, beam: int | None = None,
        history_items: Sequence[int] | None = None, prior: str | None = None, prior_weight: float | None = None,
    ) -> Ranking:
        """Top-``k`` catalog titles after ``history_titles``, excluding ``seen_titles`` (no database).

        ``history_items``: the full item history the prior reads (default: each title's first item).
        """
        return self.rank_many([(history_titles, seen_titles, history_items)], k, beam, prior, prior_weight)[0]

    def rank_many(self, requests: Sequence[tuple[Sequence[str], Sequence[str] | set[str], Sequence[int] | None]], k: int,
                  beam: int | None = None, prior: str | None = None, prior_weight: float | None = None) -> list[Ranking]:
        """:meth:`rank_titles` for several ``(history_titles, seen_titles, history_items)`` requests, no database.

        Up to ``batch`` (set at open) are searched together; each gets exactly what ``rank_titles`` gives it
        alone (engine.py keeps llama.cpp's numerics batch-independent). A bad request raises before any
        search. For workers without the history database (``cluster.RankActor``), fed what a driver read.
        """
        k = _check_k(k)
        beam = None if beam is None else _whole(beam, "beam", 1)
        chosen = self._prior_for(prior, prior_weight)
        group = []
        for history_titles, seen_titles, history_items in requests:
            history_titles = _titles(history_titles)
            unknown = [t for t in history_titles if t not in self.title_index]
            if unknown:
                raise NotFoundError(_unknown_title_message(unknown[0], self.trie.titles))
            if not history_titles:
                raise EmptyHistoryError("the history is empty: nothing to recommend from")
            items = list(history_items) if history_items is not None else [self.first_item[t] for t in history_titles]
            titles = list(history_titles)[-self.template.history_len:] if self.template.history_len > 0 else []
            group.append((titles, set(seen_titles), items, chosen))
        out: list[Ranking] = []
        with self._engine():
            beam = beam if beam is not None else self.beam
            size = self._group_size(k, beam)
            for first in range(0, len(group), size):
                out += self._rank_group(group[first : first + size], k, beam)
        return out

    def score_titles(self, history_titles: Sequence[str], titles: Sequence[str]) -> dict[str, float]:
        """log P_LM(title + EOS | history) of each of ``titles`` (exact; no prior, no seen-title exclusion).

        A search over the trie restricted to these titles, with a beam as wide as them (in groups of the
        context's capacity): shared prefixes are decoded once.
        """
        unknown = [t for t in list(history_titles) + list(titles) if t not in self.title_index]
        if unknown:
            raise NotFoundError(_unknown_title_message(unknown[0], self.trie.titles))
        if not history_titles:
            raise EmptyHistoryError("the history is empty: nothing to score from")
        wanted = list(dict.fromkeys(titles))
        prompt = list(history_titles)[-self.template.history_len:] if self.template.history_len > 0 else []
        out: dict[str, float] = {}
        with self._engine():
            for first in range(0, len(wanted), self.capacity):
                chunk = set(wanted[first : first + self.capacity])
                others = [t for t in self.trie.titles if t not in chunk]
                ranking = self._rank_group([(prompt, set(others), [], None)], len(chunk), len(chunk))[0]
                out.update(zip(ranking.titles, ranking.lm_scores, strict=True))
        return {t: out[t] for t in wanted if t in out}

    def prompt_ids(self, history_titles: Sequence[str]) -> list[int]:
        """The token ids a request with this history is answered from (prefix + last titles + EOS each)."""
        with self._engine():
            return build_prompt_ids(self.engine.tokenize, self.engine.eos_id, list(history_titles), self.template)

    def unseen_counts(self, seen_titles) -> np.ndarray:
        """Per trie node, how many titles outside ``seen_titles`` lie below it (what the search expands)."""
        return self.trie.unseen_counts([self.title_index[t] for t in seen_titles if t in self.title_index])

    # ------------------------------------------------------------------ internals
    def _cache_key(self, resolved, prior: CFPrior | None, k: int, first_step: bool) -> bytes | None:
        """A digest of everything a search's result depends on besides the model and catalog (fixed at open),
        or None when nothing is cached. A prior is named by its kind and λ: ``self.priors`` holds one per
        kind. A digest, not the inputs: a long history's seen titles would make each key tens of kB."""
        if not self.cache_size or first_step:  # a FirstStep's arrays are the caller's to change: not shared
            return None
        import hashlib
        import json

        titles, seen_titles, items = resolved
        inputs = [list(titles), sorted(seen_titles), [int(i) for i in items], prior.kind if prior else "none",
                  float(prior.weight) if prior else 0.0, k, self.beam]
        return hashlib.sha256(json.dumps(inputs, ensure_ascii=False).encode()).digest()

    def _remember(self, key: bytes | None, ranking: Ranking) -> None:
        if key is None:
            return
        import dataclasses

        _lru_put(self._cache, key, dataclasses.replace(ranking, stats=None), self.cache_size)  # stats: shared

    def _prior_for(self, choice: str | None, weight: float | None) -> CFPrior | None:
        """The prior a request asked for (None: the default), with its weight; None for no prior."""
        kind = self.default_prior if choice is None else choice
        if kind not in PRIOR_CHOICES:
            raise UsageError(f"unknown prior {kind!r}; use one of {', '.join(PRIOR_CHOICES)}")
        if weight is not None:
            check_prior_weight(weight)
            weight = float(weight)  # a numpy float too: results carry it into JSON
        if kind == "none":
            if weight:
                raise UsageError(_WEIGHT_WITHOUT_PRIOR)
            return None
        prior = self.priors.get(kind)
        if prior is None and kind == "pop":  # counted once, at λ = 1; this request's λ is applied below
            prior = self.priors["pop"] = _popularity_from_db(self.db_path, self.catalog, None)
        if prior is None:
            raise NotFoundError(
                f"this model has no {kind} prior (no {kind} cf-prior.json next to it): "
                "build one with `genrec-edge prior build`, or use --prior none|pop"
            )
        return prior if weight is None or weight == prior.weight else prior.with_weight(weight)

    def _check_catalog(self, db) -> None:
        """Refuse to answer from a database whose catalog is not the one this model was opened on: the file
        was replaced, or items were ingested, while a server ran (answers named unknown items, or old titles).
        A stat and one row per request; the catalog is re-read only when the file or its stored hash moved."""
        mark = _catalog_mark(self.db_path, db)
        if mark == self._catalog_mark:
            return
        if db.catalog().sha256 != self.catalog.sha256:
            raise CatalogMismatchError(
                f"the catalog of {self.db_path} changed since this model was opened (another file, or items "
                "ingested): open it again (restart the server)"
            )
        self._catalog_mark = mark

    def _catalog_title(self, title: str) -> str | None:
        """The catalog's spelling of ``title`` (:func:`~.catalog.title_spellings`: itself, NFC, on one line);
        None if none is a catalog title."""
        return next((spelling for spelling in title_spellings(title) if spelling in self.title_index), None)

    def _resolve(self, db, request: Request) -> tuple[list[str], set[str], list[int]]:
        """(prompt titles, titles not to recommend, item history for the prior) of one request: the titles not
        to recommend are the history's, the request's ``exclude`` and, with ``only``, every other title."""
        prompt, seen_titles, items = self._resolve_history(db, request.user, request.history)
        return prompt, self.filtered_seen(seen_titles, request.exclude, request.only), items

    def filtered_seen(self, seen_titles: set[str], exclude: Sequence[int] = (),
                      only: Sequence[int] | None = None) -> set[str]:
        """The titles not to recommend: ``seen_titles``, the titles of the ``exclude`` item ids and, with
        ``only``, every title none of its ids has. NotFoundError for an id outside the catalog; UsageError
        when the filters leave nothing (what a request with these filters gets; ``cluster.RankActor``'s too).
        """
        if not exclude and only is None:
            return seen_titles
        titles_by_id = self.titles_by_id
        check_item_ids(titles_by_id, exclude, only, "this model's catalog")
        seen_titles = set(seen_titles) | {titles_by_id[i] for i in exclude}
        if only is not None:
            allowed = {titles_by_id[i] for i in only}
            seen_titles |= {t for t in self.title_index if t not in allowed}
        if all(t in seen_titles for t in self.title_index):
            raise UsageError("every catalog title is in this history, in exclude or outside only: nothing "
                             "left to recommend")
        return seen_titles

    def _resolve_history(self, db, user, history) -> tuple[list[str], set[str], list[int]]:
        """(prompt titles, seen titles, item history for the prior) of a user or an ad-hoc history."""
        if history is not None:
            given = list(history)
            if not given:
                raise EmptyHistoryError("the history is empty: give at least one title")
            history = [self._catalog_title(t) for t in given]
            unknown = [t for t, found in zip(given, history, strict=True) if found is None]
            if unknown:
                raise NotFoundError(_unknown_title_message(unknown[0], self.trie.titles))
            titles = history[-self.template.history_len:] if self.template.history_len > 0 else []
            return titles, set(history), [self.first_item[t] for t in history]
        longest = max(self.template.history_len, *(p.history_window for p in self.priors.values()), 1)
        interactions = db.history(int(user), limit=longest)
        if not interactions:
            raise EmptyHistoryError(f"user {user} has no history to recommend from")
        seen_ids = db.seen_items(int(user))
        titles_by_id = self.titles_by_id
        # An item added after open() is not in this catalog (nor in the trie): nothing to exclude.
        seen_titles = {titles_by_id[i] for i in seen_ids if i in titles_by_id}
        prompt = [x.title for x in interactions]
        prompt = prompt[-self.template.history_len:] if self.template.history_len > 0 else []
        return prompt, seen_titles, [x.item_id for x in interactions if x.item_id in titles_by_id]

    def _prepare(self, slot: int, titles: list[str], seen_titles: set[str]):
        """Unseen counts and the prompt decoded into the slot's prompt sequence."""
        trie = self.trie
        seen = [self.title_index[t] for t in seen_titles if t in self.title_index]
        unseen = trie.unseen_counts(seen)
        if unseen[0] == 0:
            raise UsageError("every catalog title is already in this history: nothing left to recommend")
        engine = self.engine
        prompt = self.prompt_ids(titles)
        if prompt[: len(self.prefix)] != self.prefix:  # the cached prefix KV would be wrong
            raise CorruptModelError("the tokenizer does not reproduce the instruction prefix")
        prompt_seq, _ = self._slot_seqs(slot)
        t0 = time.perf_counter()
        key = tuple(prompt) if self.prompt_cache_size else None
        kept = self._prompts.get(key) if key is not None else None
        prefilled = 0
        if kept is not None and engine.seq_restore(prompt_seq, kept[0]):
            self._prompts.move_to_end(key)
            self.prompt_hits += 1
            logits = kept[1].copy()
        else:
            prefilled = len(prompt) - len(self.prefix)
            engine.seq_copy(0, prompt_seq, -1, -1)
            engine.decode_sequence(prompt[len(self.prefix):], prompt_seq, len(self.prefix))
            logits = engine.logits(-1)
            if key is not None:
                _lru_put(self._prompts, key, (engine.seq_state(prompt_seq), logits.copy()), self.prompt_cache_size)
        prefill_ms = (time.perf_counter() - t0) * 1000
        return unseen, seen, prompt, logits, prefill_ms, prefilled

    def _prior_terms(self, prior: CFPrior | None, items: list[int], seen: list[int], k: int, capacity: int):
        """(per-node prior mass for the search, candidate titles for a rerank, log P_CF, milliseconds).

        No prior: nothing. ``sum``/``max``: the mass of the unseen titles below each trie node.
        ``rerank``: the prior's top ``candidates`` unseen titles (at least k, at most ``capacity`` beams).
        """
        if prior is None:
            return None, None, None, 0.0
        import numpy as np

        t0 = time.perf_counter()
        mask = np.zeros(len(self.trie.titles), dtype=bool)
        mask[seen] = True
        log_p = prior.log_probs(items, mask)
        if prior.config.variant == "rerank":
            n = min(max(prior.config.candidates, k), capacity)
            order = np.argsort(-log_p, kind="stable")[:n]
            candidates = [int(j) for j in order if np.isfinite(log_p[j]) and self.trie.title_leaf[j] >= 0]
            return None, candidates, log_p, (time.perf_counter() - t0) * 1000
        mass = self.trie.prior_log_mass(log_p, prior.config.variant)
        return mass, None, log_p, (time.perf_counter() - t0) * 1000

    def _rank_group(self, group, k: int, beam: int | None, first_step: Sequence[bool] = (),
                    cancel: Callable[[], bool] | None = None) -> list[Ranking]:
        """Search several prepared requests together: ``(prompt titles, seen titles, items, prior)`` each.

        A request whose prior re-ranks is a search restricted to its candidates, as wide as them (exact
        LM scores), then ordered by the fused score; the others search the catalog, the prior inside.
        """
        from .engine import log_softmax
        from .search import Hit, SearchRequest, SearchStats, beam_search

        alone = len(group) == 1 and self.batch > 1  # every slot's beams (_group_size)
        capacity = self.lone_capacity if alone else self.capacity
        width = min(beam if beam is not None else default_beam(k), capacity)
        engine = self.engine
        engine.reset()
        requests, extra = [], []
        for slot, (titles, seen_titles, items, prior) in enumerate(group):
            stop_if_cancelled(cancel)
            unseen, seen, prompt, logits, prefill_ms, prefilled = self._prepare(slot, titles, seen_titles)
            mass, candidates, log_p, prior_ms = self._prior_terms(prior, items, seen, k, capacity)
            prompt_seq, beam_seqs = self._lone_seqs() if alone else self._slot_seqs(slot)
            if candidates is not None and candidates:
                wide = len(candidates)
                requests.append(SearchRequest(prompt_seq, len(prompt), logits, self.trie.counts_of(candidates), wide,
                                              wide, beam_seqs[:wide]))
            else:
                requests.append(SearchRequest(prompt_seq, len(prompt), logits, unseen, k, width, beam_seqs[:width],
                                              prior_log_mass=mass, prior_weight=prior.weight if prior else 0.0))
            first = None
            if slot < len(first_step) and first_step[slot]:
                tokens, nodes = self.trie.children(0)
                first = FirstStep(tokens.copy(), log_softmax(logits)[tokens], unseen[nodes] > 0)
            extra.append((prefill_ms, prefilled, prior_ms, seen, prior, first, candidates, log_p))
        stats = SearchStats()
        beam_search(engine, self.trie, requests, self.graveyard_seq, stats, jump=self.jump_forward, cancel=cancel)
        out = []
        for request, (prefill_ms, prefilled, prior_ms, seen, prior, first, candidates, log_p) in zip(requests, extra,
                                                                                                    strict=True):
            hits = list(request.hits)
            if candidates is not None:  # rerank: every candidate's exact LM score, ordered by the fused one
                fused = [Hit(h.title_index, h.lm_score + prior.weight * float(log_p[h.title_index]), h.lm_score)
                         for h in hits]
                hits = sorted(fused, key=lambda h: (-h.score, h.title_index))[:k]
            # A narrow beam can lose every path to the k-th title; search again without the titles found
            # (rare) so the answer has k items whenever the catalog has k unseen titles.
            while len(hits) < k and candidates is None:
                more_unseen = self.trie.unseen_counts(seen + [h.title_index for h in hits])
                if more_unseen[0] == 0:
                    break
                again = SearchRequest(request.prompt_seq, request.prompt_len, request.prompt_logits, more_unseen,
                                      k - len(hits), width, request.beam_seqs, request.prior_log_mass,
                                      request.prior_weight)
                more = beam_search(engine, self.trie, [again], self.graveyard_seq, stats, jump=self.jump_forward,
                                   cancel=cancel)[0]
                if not more:
                    break
                hits = sorted(hits + more, key=lambda h: (-h.score, h.title_index))
            timings = Timings(prefill_ms, stats.search_ms, 0.0, request.prompt_len, stats.decode_steps,
                              stats.decoded_tokens, prior_ms, prefilled)
            out.append(Ranking(
                tuple(self.trie.titles[h.title_index] for h in hits), tuple(float(h.score) for h in hits), timings,
                tuple(float(h.lm_score) for h in hits), prior.kind if prior else "none",
                prior.weight if prior else 0.0, stats, first,
            ))
        return out

    def _sample(self, titles, seen_titles, k, seed, temperature, max_tries, progress=None):
        from .engine import GrammarSampler
        from .grammar import grammar_for_titles

        self.engine.reset()
        unseen, _, prompt, _, prefill_ms, prefilled = self._prepare(0, titles, seen_titles)
        t0 = time.perf_counter()
        if self._grammar is None:
            self._grammar = grammar_for_titles(self.trie.titles)  # built and validated once
        sampler = GrammarSampler(self.engine, self._grammar, temperature, seed, validated=True)
        found: dict[str, float] = {}
        steps = tokens = 0
        # GBNF allows non-canonical (longer) token splits; the beams' cells bound what fits in the context.
        max_tokens = min(4 * self.trie.max_depth + 8, self.capacity * self.trie.max_depth)
        scratch = self._slot_seqs(0)[1][0]
        try:
            for tries in range(1, max_tries + 1):
                if len(found) >= k:
                    break
                out = sampler.sample_title(self.prompt_seq, prompt, scratch, max_tokens)
                if out is not None:
                    steps += len(out) + 1
                    tokens += len(out) + 1
                    title = self.engine.detokenize(out)
                    # Titles outside the catalog cannot happen (the grammar's language is the catalog); the
                    # check keeps that a guarantee rather than an assumption.
                    if title in self.title_index and title not in seen_titles and title not in found:
                        found[title] = float("nan")
                if progress is not None:
                    progress(tries, len(found))
        finally:
            sampler.close()
        search_ms = (time.perf_counter() - t0) * 1000
        timings = Timings(prefill_ms, search_ms, 0.0, len(prompt), steps, tokens, prefilled_tokens=prefilled)
        return [(t, s) for t, s in found.items()], timings

    def _describe(self, db, found) -> list[Recommendation]:
        out = []
        for rank, (title, score, lm_score) in enumerate(found, start=1):
            ids = self.catalog.title_to_items[title]
            item = db.item(ids[0])
            out.append(Recommendation(rank, tuple(ids), title, item.year, item.genres, float(score), float(lm_score)))
        return out


def _whole(value, name: str, low: int | None = None) -> int:
    """``value`` as an int (numpy integers too), >= ``low`` if given; UsageError for anything else (a bool, a
    float, a string): the HTTP API refuses those, and the library should not quietly coerce them."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        bound = "" if low is None else f" >= {low}"
        raise UsageError(f"{name} must be a whole number{bound} (got {value!r})")
    try:
        number = operator.index(value)
    except TypeError:  # a numpy array has __index__ but refuses it unless it is a 0-d integer array
        raise UsageError(f"{name} must be a whole number (got {type(value).__name__})") from None
    if low is not None and number < low:
        raise UsageError(f"{name} must be >= {low} (got {number})")
    return number


def _check_k(k: int) -> int:
    return _whole(k, "k", 1)


_WEIGHT_WITHOUT_PRIOR = "a prior weight needs a prior to weigh: choose pop or sasrec, or drop the weight"


def load_prior(prior, weight, model_dir: Path, catalog, db_path: Path):
    """Resolve :meth:`Recommender.open`'s ``prior`` argument to a loaded prior (or None): what a model in
    ``model_dir`` serving ``db_path`` fuses (a driver resolves it once for its workers, cluster.py)."""
    from .cf import CFPrior, has_sidecar

    if isinstance(prior, CFPrior):
        loaded = prior
    elif prior == "none":
        if weight:
            raise UsageError(_WEIGHT_WITHOUT_PRIOR)
        return None
    elif prior == "pop" and not (has_sidecar(model_dir) and _sidecar_kind(model_dir) == "pop"):
        return _popularity_from_db(db_path, catalog, weight)
    elif prior is None or prior in PRIOR_CHOICES:
        if not has_sidecar(model_dir):
            if prior is None:
                if weight:
                    raise UsageError(_WEIGHT_WITHOUT_PRIOR + " (this model has none of its own)")
                return None
            raise NotFoundError(f"no {prior} prior next to the model ({model_dir / 'cf-prior.json'} is missing)")
        loaded = CFPrior.load(model_dir, catalog)
        if prior is not None and loaded.kind != prior:
            raise NotFoundError(f"the model's prior is {loaded.kind}, not {prior} ({model_dir / 'cf-prior.json'})")
    else:
        loaded = CFPrior.load(Path(prior), catalog)
    if loaded.config.catalog_sha256 != catalog.sha256:
        raise CatalogMismatchError("the prior was built for another catalog than the database's")
    return loaded if weight is None else loaded.with_weight(weight)


def _sidecar_kind(model_dir: Path) -> str | None:
    import json

    from .cf import SIDECAR_JSON

    try:
        return json.loads((model_dir / SIDECAR_JSON).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _catalog_mark(db_path: Path, db) -> tuple:
    """What moves when the catalog may have: the file (replaced: another inode) and its stored catalog hash."""
    stat = os.stat(db_path)
    dataset = db.dataset()
    return stat.st_dev, stat.st_ino, dataset.catalog_sha256 if dataset else None


def _popularity_from_db(db_path: Path, catalog, weight: float | None):
    """``--prior pop`` without a pop sidecar: the prior `prior build --kind pop` makes (its variant too: max)."""
    from .cf import build_prior
    from .history import HistoryDB

    with HistoryDB.open(db_path, readonly=True) as db:
        return build_prior("pop", db.sequences(), catalog, 1.0 if weight is None else weight)


def _replace_total(result: Recommendations, total_ms: float) -> Recommendations:
    import dataclasses

    return dataclasses.replace(result, timings=_with_total(result.timings, total_ms))


def _free_model(model) -> None:
    import llama_cpp

    llama_cpp.llama_model_free(model)


def _with_total(timings: Timings, total_ms: float) -> Timings:
    import dataclasses

    return dataclasses.replace(timings, total_ms=total_ms)


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


def check_default_model_catalog(db_path: Path) -> None:
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
    close = difflib.get_close_matches(title, titles, n=3, cutoff=0.6) if len(title) <= 1000 else []
    if not close and title.strip():  # a few words of a title ("heat"): titles starting with, then containing them
        text = title.strip().casefold()
        starts = sorted((t for t in titles if t.casefold().startswith(text)), key=len)
        inside = sorted((t for t in titles if text in t.casefold() and t not in starts), key=len)
        close = (starts + inside)[:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if title.startswith("--"):  # `--history --k 3`: the option was taken as the title
        hint = f"; {title!r} looks like an option: give the titles right after --history"
    shown = repr(title) if len(title) <= 200 else repr(title[:200]) + f" (+{len(title) - 200} characters)"
    return f"unknown title {shown} (titles must match the catalog exactly){hint}"
