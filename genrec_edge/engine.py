"""The llama.cpp runtime: model + context on the low-level API (the beam search is in ``search.py``).

Why the low-level API: llama.cpp removed its beam search in 2024 and the high-level ``Llama`` class
decodes one sequence at a time. Here every live beam is its own KV-cache sequence (``seq_id``); beams
share the prompt's cells (``llama_memory_seq_cp`` on a unified KV cache copies no data), and each search
step decodes all live beams in one ``llama_decode`` call.

Sequence ids (laid out by ``recommend.Recommender``): 0 holds the instruction prefix, evaluated once per
process and never modified; each request slot has a prompt sequence (prefix copied from 0 + the history)
followed by its beams' sequences; the last id is the graveyard, the cells of beams that died during the
current search.

Why the graveyard: in this llama.cpp build, a token written into a KV cell that was freed *below* cells
its own sequence already holds gets wrong attention (logits off by ~1 nat; measured, not documented
upstream). ``llama_memory_seq_rm`` frees cells and moves the cache's head back to the hole, so freeing a
dead beam mid-search corrupts the next step. Dead beams are therefore moved to the graveyard sequence
(their cells stay occupied) and all freed at once when the search ends; every sequence then always
grows into cells after its existing ones.

Pitfalls handled here (FINDINGS.md): OpenMP's environment must be set before llama_cpp is imported
(passive waiting, plus a short spin where the thread count adapts to other programs' load: cpu_share.py),
or two threads spin to a halt under CPU contention; ``llama_decode`` returns non-zero without
raising, so every return code is checked; a sequence's positions must stay consecutive; logits are read
with ``llama_get_logits_ith``; llama.cpp's logging goes through a callback we keep alive. Numerics: CPU
flash attention switches to a tiled F16 kernel for micro-batches of 64 rows or more (log-probs move by
~1e-2), so whoever needs batch-independent logits keeps decode calls under 64 tokens (search.py).

Batch-independent numerics (measured on SmolLM2-135M Q8_0, docs/FINDINGS.md): llama.cpp's CPU flash
attention has three kernels - a tiled one for micro-batches of 64+ rows, a KV-split one for a single row
over 512+ cells on several threads, and a row-by-row one otherwise. Only the row-by-row one computes a
token's attention from its own sequence's cells alone, in cell order, whatever else the cache and the
batch hold; the other two group cells into tiles or per-thread chunks whose boundaries depend on other
sequences' cells, and this model turns that rounding into title scores that move by up to ~0.1 nats.
So every call here uses the row-by-row kernel: micro-batches of at most ``EXACT_BATCH`` (63) tokens,
and a call of one token gets a second, padding token in a sequence of its own (``pad_seq``). A token's
logits then depend only on its sequence: a request scores the same alone or batched with others,
whichever order its tokens were decoded in.
"""

from __future__ import annotations

import os
import sys
import weakref

# Threads and OpenMP (cpu_share.py, docs/FINDINGS.md). OMP_WAIT_POLICY=passive stays in the environment for
# every OpenMP runtime of the process (torch's too): spinning collapses under contention. Where the engine
# adapts its thread count to the cores other programs leave free (Linux, unless GENREC_EDGE_ADAPT_THREADS=0),
# llama.cpp's own OpenMP runtime - and only it: the variable is gone again once llama_cpp has loaded - also
# spins ``SPIN_COUNT`` times at a barrier before it sleeps. A GOMP_SPINCOUNT of the user's own is kept.
ADAPT_THREADS = sys.platform.startswith("linux") and os.environ.get("GENREC_EDGE_ADAPT_THREADS", "1") != "0"
SPIN_COUNT = 3000
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
_spin_added = ADAPT_THREADS and "GOMP_SPINCOUNT" not in os.environ and "llama_cpp" not in sys.modules
if _spin_added:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)

import ctypes  # noqa: E402
import hashlib  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

if _spin_added:
    del os.environ["GOMP_SPINCOUNT"]
# What llama.cpp's OpenMP runtime does at a barrier, for `doctor`: spin count, or None = sleep at once
# (unknown if llama_cpp was loaded before this module).
OPENMP_SPIN: int | None = SPIN_COUNT if _spin_added else (
    int(os.environ["GOMP_SPINCOUNT"]) if os.environ.get("GOMP_SPINCOUNT", "").isdigit() else None)

from .cpu_share import CoreShare, ThreadGovernor  # noqa: E402
from .errors import CorruptModelError, EngineError, GrammarError, UsageError  # noqa: E402
from .models import require_model_file  # noqa: E402

EXACT_BATCH = 63  # tokens per llama_decode: below the tiled attention kernel's 64 rows (module docstring)


def build_identity() -> str:
    """Which llama.cpp computes here: the package version and the instruction sets compiled in. Builds for
    other instruction sets round differently, so their scores (and top-10 orders) differ (docs/FINDINGS.md)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {info}"


# ---------------------------------------------------------------------------------------- logging
_log_lock = threading.Lock()
_log_callback = None  # module-level: llama.cpp keeps the pointer, so the ctypes object must stay alive
_backend_ready = False


def _quiet_llama() -> None:
    global _log_callback, _backend_ready
    with _log_lock:
        if _log_callback is None:
            if os.environ.get("GENREC_EDGE_LLAMA_LOG"):
                _log_callback = llama_cpp.llama_log_callback(lambda level, text, data: print(
                    text.decode("utf-8", "replace"), end="", flush=True))
            else:
                _log_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p())
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def default_threads() -> int:
    """All physical-ish cores: llama-cpp-python's own default (cpu_count // 2) leaves half idle."""
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------- engine
# OpenMP's thread team does not survive os.fork(): a child of a process that ran llama.cpp on several
# threads hangs in GOMP_parallel at its first multi-threaded decode (a fresh Engine too). Refused instead.
_ran_threads = False  # this process has decoded on more than one thread
_forked_after_threads = False  # ... and this is a forked child of it


def _after_fork_in_child() -> None:
    global _forked_after_threads
    _forked_after_threads = _ran_threads


os.register_at_fork(after_in_child=_after_fork_in_child)
FORK_MESSAGE = ("llama.cpp's threads (OpenMP) do not survive os.fork(), and this process was forked from one that "
                "ran them: use threads=1 here, or start processes with multiprocessing's 'spawn' method "
                "(RecommenderPool does)")


def _check_threads_usable() -> None:
    """Before a decode on several threads: UsageError in a forked child of a process that ran them."""
    global _ran_threads
    if _forked_after_threads:
        raise UsageError(FORK_MESSAGE)
    _ran_threads = True


def _free_llama(batch, ctx, model) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


class Engine:
    """One model and one context. Not thread-safe by itself: callers hold :attr:`lock`."""

    def __init__(self, path: Path, model, vocab, ctx, n_ctx: int, n_seq_max: int, n_batch: int, threads: int):
        self.path = path
        self.model = model
        self.vocab = vocab
        self.ctx = ctx
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self.threads = threads  # the configured count; ``governor.current`` is the one in use
        self.governor: ThreadGovernor | None = None
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.eos_id = int(llama_cpp.llama_vocab_eos(vocab))
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.pad_seq = n_seq_max  # one more than callers use: the padding token's sequence
        self.batch = llama_cpp.llama_batch_init(n_batch + 1, 0, n_seq_max + 1)
        self._closed = False
        # An engine dropped without close() (a Recommender left to the garbage collector) frees llama.cpp's
        # memory then: ~300 MB of the default model stayed allocated per forgotten Recommender.
        self._free = weakref.finalize(self, _free_llama, self.batch, ctx, model)

    # ---------------------------------------------------------------- life cycle
    @classmethod
    def load_model(cls, path: Path, vocab_only: bool = False):
        """Load a GGUF (mmap) and return the raw model pointer; CorruptModelError if llama.cpp refuses."""
        path = require_model_file(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise CorruptModelError(f"not a GGUF file (magic {magic!r}): {path}")
        _quiet_llama()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        params.vocab_only = vocab_only
        model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            raise CorruptModelError(f"llama.cpp could not load the model (truncated or unsupported?): {path}")
        return model

    @classmethod
    def open(
        cls, path: Path, n_ctx: int = 2048, n_seq_max: int = 4, threads: int | None = None, model=None,
        kv_f32: bool = False, adapt_threads: bool | None = None, flash_attn: bool | None = None,
    ) -> Engine:
        """Load ``path`` and create a context of ``n_ctx`` cells shared by ``n_seq_max`` sequences.

        ``adapt_threads``: run on at most ``threads`` threads, fewer while other programs keep cores busy
        (cpu_share.py; default: ``ADAPT_THREADS``); False keeps ``threads`` fixed.

        ``kv_f32``: keep the KV cache in F32 instead of llama.cpp's F16. F16 rounding makes a logit depend
        on how tokens were grouped into decode calls (~1e-2 on a tiny random model); exactness tests that
        compare two decode orders need F32.

        ``flash_attn``: None leaves llama.cpp's choice (flash attention on this CPU: the row-by-row kernel
        the module docstring relies on); False is llama.cpp's other attention, for ``bench.attention_cost``
        only - it changes scores and rankings (docs/FINDINGS.md).
        """
        path = Path(path)
        owns_model = model is None  # a model passed in stays the caller's to free if this fails
        if owns_model:
            model = cls.load_model(path)
        threads = threads or default_threads()
        n_ctx = int(-(-n_ctx // 256) * 256)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        # A call holds at most EXACT_BATCH tokens, or one + its padding token: one micro-batch. llama.cpp
        # sizes its output buffer max(outputs, sequences) and asserts it fits n_batch: n_batch >= sequences.
        cparams.n_batch = max(EXACT_BATCH + 1, n_seq_max + 1)
        cparams.n_ubatch = EXACT_BATCH + 1
        cparams.n_seq_max = n_seq_max + 1  # + the padding sequence
        cparams.kv_unified = True  # beams share the prompt's KV cells instead of copying them
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if flash_attn is not None:
            cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if kv_f32:
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            if owns_model:
                llama_cpp.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context (n_ctx={n_ctx}, seqs={n_seq_max})")
        vocab = llama_cpp.llama_model_get_vocab(model)
        engine = cls(path, model, vocab, ctx, n_ctx, n_seq_max, EXACT_BATCH, threads)
        share = CoreShare.for_this_machine() if (ADAPT_THREADS if adapt_threads is None else adapt_threads) else None
        if share is not None:
            engine.governor = ThreadGovernor(share, threads, engine._set_threads)
        return engine

    def _set_threads(self, n: int) -> None:
        llama_cpp.llama_set_n_threads(self.ctx, n, n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._free()  # once: the finalizer is then dead

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- vocabulary
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return tokenize(self.vocab, text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return detokenize(self.vocab, tokens)

    def meta(self, key: str) -> str | None:
        return model_meta(self.model, key)

    def tokenizer_fingerprint(self) -> str:
        return tokenizer_fingerprint(self.model, self.vocab)

    # ---------------------------------------------------------------- KV cache
    def seq_clear(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def seq_copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_len(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def seq_state(self, seq: int):
        """A copy of ``seq``'s KV cells (positions and K/V rows, shared cells included): ``seq_restore``'s input."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, seq) != size:
            raise EngineError(f"llama.cpp could not copy the KV cells of sequence {seq}")
        return buffer

    def seq_restore(self, seq: int, state) -> bool:
        """Put a ``seq_state`` copy back as ``seq`` (its cells replaced, in new cells in position order).
        False, with ``seq`` empty, where llama.cpp finds no room for it."""
        if llama_cpp.llama_state_seq_set_data(self.ctx, state, len(state), seq) == len(state):
            return True
        self.seq_clear(seq)
        return False

    def reset(self) -> None:
        """Free every sequence but the instruction prefix's (0), the padding sequence included."""
        for seq in range(1, self.n_seq_max + 1):
            self.seq_clear(seq)

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], want: Sequence[bool]):
        """One ``llama_decode`` of ``tokens`` (token i at ``positions[i]`` in sequence ``seqs[i]``).

        At most ``EXACT_BATCH`` tokens; a single token is decoded together with a padding token in
        ``pad_seq`` (see the module docstring), which asks for no logits: output indices are unchanged.
        """
        n = len(tokens)
        if n > self.n_batch:
            raise EngineError(f"{n} tokens exceed the batch size {self.n_batch}: split the call (decode_sequence)")
        batch = self.batch
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = tokens[i]
            batch.pos[i] = positions[i]
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seqs[i]
            batch.logits[i] = 1 if want[i] else 0
        if n == 1:
            batch.n_tokens = 2
            batch.token[1] = tokens[0]
            batch.pos[1] = self.seq_len(self.pad_seq)
            batch.n_seq_id[1] = 1
            batch.seq_id[1][0] = self.pad_seq
            batch.logits[1] = 0
        threads = self.governor.before_call() if self.governor is not None else self.threads
        if threads > 1:
            _check_threads_usable()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise EngineError(
                f"llama_decode failed (code {rc}) for {n} tokens; the context has {self.n_ctx} cells"
            )

    def decode_sequence(self, tokens: Sequence[int], seq: int, start: int, last_logits: bool = True) -> None:
        """Decode a run of tokens into one sequence, in calls of at most ``EXACT_BATCH`` tokens."""
        tokens = list(tokens)
        begin = 0
        while begin < len(tokens):
            size = min(self.n_batch, len(tokens) - begin)
            if len(tokens) - begin - size == 1:  # keep a lone last token out of its own call
                size -= 1
            chunk = tokens[begin : begin + size]
            last = begin + len(chunk) == len(tokens)
            want = [False] * len(chunk)
            if last and last_logits:
                want[-1] = True
            self.decode(chunk, range(start + begin, start + begin + len(chunk)), [seq] * len(chunk), want)
            begin += size

    def logits(self, i: int) -> np.ndarray:
        """A copy of the logits row of output ``i`` of the last decode (``-1``: the last one)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise EngineError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """A read-only view (``n_outputs`` x vocab) of every output row of the last decode, in batch order.

        No copy: valid until the next decode. llama.cpp restores batch order after splitting a batch
        into micro-batches by sequence, so row i is the i-th token that asked for logits.
        """
        ptr = llama_cpp.llama_get_logits(self.ctx)
        if not ptr:
            raise EngineError("no logits from the last decode")
        view = np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))
        view.flags.writeable = False
        return view

    def log_probs(self, i: int) -> np.ndarray:
        return log_softmax(self.logits(i))


def log_normalizers(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, float64. One float32 pass over the vocabulary: the search then
    needs only ``logits[b, token] - lse[b]`` for the few tokens a trie node allows."""
    x = np.asarray(logits, dtype=np.float32)
    peak = x.max(axis=-1, keepdims=True)
    shifted = np.subtract(x, peak)
    np.exp(shifted, out=shifted)
    total = shifted.sum(axis=-1, dtype=np.float64)
    return peak[..., 0].astype(np.float64) + np.log(total)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis. The exp-sum runs in float32 (the vocabulary pass is the cost);
    the normaliser is float64 and so are the returned log-probs, which the search sums."""
    x = np.asarray(logits, dtype=np.float32)
    peak = x.max(axis=-1, keepdims=True)
    total = np.exp(x - peak).sum(axis=-1, keepdims=True, dtype=np.float64)
    return x.astype(np.float64) - (peak.astype(np.float64) + np.log(total))


# ---------------------------------------------------------------------------------------- vocab helpers
def tokenize(vocab, text: str, add_special: bool) -> list[int]:
    data = text.encode("utf-8")
    capacity = len(data) + 8
    buffer = (llama_cpp.llama_token * capacity)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, add_special, False)
    if n < 0:  # buffer too small: llama.cpp returns minus the size it needs
        capacity = -n
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, add_special, False)
        if n < 0:
            raise EngineError(f"llama_tokenize failed for {text[:40]!r}")
    return list(buffer[:n])


def token_bytes(vocab, token: int) -> bytes:
    buffer = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 64, 0, False)
    if n < 0:
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, -n, 0, False)
    return buffer.raw[:n]


def detokenize(vocab, tokens: Sequence[int]) -> str:
    return b"".join(token_bytes(vocab, t) for t in tokens).decode("utf-8", "replace")


def model_meta(model, key: str) -> str | None:
    size = 256
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buffer, size)
        if n < 0:
            return None
        if n < size:
            return buffer.value.decode("utf-8", "replace")
        size = n + 1


def tokenizer_fingerprint(model, vocab) -> str:
    """Hash of what decides tokenization: tokenizer kind, pre-tokenizer, every token's text, EOS, and
    the token ids of a probe text (which BPE merges affect). Keys the trie cache, so a different
    model with the same tokenizer reuses the trie and any tokenizer change rebuilds it."""
    digest = hashlib.sha256()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        digest.update(f"{key}={model_meta(model, key)}\0".encode())
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    digest.update(f"n={n_vocab} eos={llama_cpp.llama_vocab_eos(vocab)}\0".encode())
    for token in range(n_vocab):
        digest.update(llama_cpp.llama_vocab_get_text(vocab, token) or b"")
        digest.update(b"\0")
    probe = "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001) Star Wars: Episode IV - A New Hope 1977 ß東京"
    digest.update(np.asarray(tokenize(vocab, probe, False), dtype=np.int32).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- sampling
class GrammarSampler:
    """llama.cpp's grammar sampler + temperature + seeded distribution, one title per sample.

    The grammar sampler is reset for every sample; the temperature/dist chain is not, so successive
    samples draw from one seeded random stream.
    """

    def __init__(self, engine: Engine, grammar: str, temperature: float, seed: int, validated: bool = False):
        from .grammar import validate_grammar

        if not validated:
            validate_grammar(grammar)  # llama.cpp would segfault or abort on a bad grammar
        self.engine = engine
        self.grammar = llama_cpp.llama_sampler_init_grammar(engine.vocab, grammar.encode("utf-8"), b"root")
        if not self.grammar:
            raise GrammarError("llama.cpp rejected the catalog grammar")
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        n = engine.n_vocab
        self._data = (llama_cpp.llama_token_data * n)()
        self._ids = np.arange(n, dtype=np.int32)
        self._view = np.ctypeslib.as_array(self._data).view(
            np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )

    def close(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            llama_cpp.llama_sampler_free(self.chain)
            self.grammar = None

    def sample_title(self, prompt_seq: int, prompt_tokens: Sequence[int], scratch: int, max_tokens: int):
        """One sampled continuation's tokens (EOG excluded) or None if it ran past ``max_tokens``."""
        engine = self.engine
        llama_cpp.llama_sampler_reset(self.grammar)
        engine.seq_clear(scratch)
        # Every lone-token decode leaves a padding cell (Engine.decode): cleared with each try, or a long
        # sampling run filled the context ("llama_decode failed" after ~140 tries of the tiny model).
        engine.seq_clear(engine.pad_seq)
        n = len(prompt_tokens)
        # The scratch sequence gets the prompt's cells but the last token is decoded again, because
        # the logits of an earlier decode are gone by now.
        engine.seq_copy(prompt_seq, scratch, 0, n - 1)
        engine.decode([prompt_tokens[-1]], [n - 1], [scratch], [True])
        out: list[int] = []
        for step in range(max_tokens):
            token = self._pick(engine.logits(0))
            if llama_cpp.llama_vocab_is_eog(engine.vocab, token):
                engine.seq_clear(scratch)
                return out
            out.append(token)
            engine.decode([token], [n + step], [scratch], [True])
        engine.seq_clear(scratch)
        return None

    def _pick(self, logits: np.ndarray) -> int:
        view = self._view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=self._data, size=len(logits), selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        # With every candidate masked the distribution sampler still "selects" one; accepting it would
        # make llama.cpp throw across the C boundary and abort the process.
        if array.selected < 0 or array.selected >= array.size or array.data[array.selected].logit == -np.inf:
            raise GrammarError("the catalog grammar allows no next token for this model's vocabulary")
        token = int(array.data[array.selected].id)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token
