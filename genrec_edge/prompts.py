"""GenRec prompts: one function builds the token sequence for training *and* inference.

The model reads an instruction, then the user's last N titles in time order, and generates the next
title. Each title is tokenized **on its own** (no leading space, no special tokens) and terminated by
the tokenizer's EOS token, so every title always has the same canonical token split - in a training
window, in an inference prompt and in the runtime's catalog trie (``title ids + [EOS]``). Building the
sequence from per-title token lists, rather than tokenizing one concatenated string, is what makes
that true for every tokenizer (BPE merges across separators, SentencePiece's dummy prefix).

Token layout (``build_prompt_ids``)::

    tokenize(instruction + "\\n", add_special=True)      # BOS if the tokenizer adds one
    tokenize(title_1) + [EOS]
    ...
    tokenize(title_N) + [EOS]
    -> the model now generates tokenize(next_title) + [EOS]

The JSONL export renders the same content as text (titles one per line) for other tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# tokenize(text, add_special) -> token ids. Both the HF tokenizer and llama.cpp's fit this shape.
Tokenize = Callable[[str, bool], list[int]]

TEMPLATE_NAME = "genrec-seq-v1"
DEFAULT_INSTRUCTION = (
    "Here are the movies a user watched, in the order they watched them. Recommend the next movie."
)
DEFAULT_HISTORY_LEN = 20
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """What a model was trained on; written into the adapter config and the GGUF (``genrec.*``)."""

    instruction: str = DEFAULT_INSTRUCTION
    history_len: int = DEFAULT_HISTORY_LEN
    name: str = TEMPLATE_NAME

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptTemplate:
        unknown = set(data) - {"instruction", "history_len", "name"}
        if unknown:
            raise ValueError(f"unknown prompt template keys: {sorted(unknown)}")
        return cls(**data)


def check_instruction(text: str) -> str:
    """``text`` if it can be a prompt's first line: non-empty, one line (the titles follow, one per line), no
    NUL byte; else UsageError."""
    from .errors import UsageError

    if not text.strip() or "\x00" in text or len(text.splitlines()) != 1:
        raise UsageError("--instruction must be one non-empty line of text (the prompt's first line; "
                         f"the titles follow, one per line), not {text[:60]!r}")
    return text


def prefix_ids(tokenize: Tokenize, template: PromptTemplate) -> list[int]:
    """The instruction part: identical for every user, so its KV cache can be evaluated once."""
    return list(tokenize(template.instruction + "\n", True))


def title_ids(tokenize: Tokenize, title: str) -> list[int]:
    """A title's canonical tokens, without its EOS terminator."""
    return list(tokenize(title, False))


def build_prompt_ids(
    tokenize: Tokenize, eos_id: int, titles: Sequence[str], template: PromptTemplate
) -> list[int]:
    """The inference prompt: prefix + the last ``history_len`` titles, each followed by EOS."""
    ids = prefix_ids(tokenize, template)
    for title in list(titles)[-template.history_len :] if template.history_len > 0 else []:
        ids.extend(title_ids(tokenize, title))
        ids.append(eos_id)
    return ids


def build_training_window(
    tokenize: Tokenize,
    eos_id: int,
    titles: Sequence[str],
    template: PromptTemplate,
    loss_from: int = 0,
) -> tuple[list[int], list[int]]:
    """One SASRec-style training sequence: input ids and labels with the loss on every title.

    ``titles`` holds up to ``history_len + 1`` titles. Title j is predicted from the prefix and titles
    ``< j``; the last one sees exactly the context an inference prompt gives (``build_prompt_ids`` of
    the titles before it), so training and serving agree token for token. Titles before ``loss_from``
    are context only (label ``IGNORE_INDEX``); the instruction never carries a loss.
    """
    ids = prefix_ids(tokenize, template)
    labels = [IGNORE_INDEX] * len(ids)
    for j, title in enumerate(titles):
        piece = title_ids(tokenize, title) + [eos_id]
        ids.extend(piece)
        labels.extend(piece if j >= loss_from else [IGNORE_INDEX] * len(piece))
    return ids, labels


def training_windows(sequence: Sequence, history_len: int) -> Iterator[tuple[list, int]]:
    """Split one chronological sequence into windows of ``history_len + 1`` items, newest first.

    Yields ``(window, loss_from)``. Windows do not overlap: every position of the sequence is a
    target exactly once. The newest window ends at the sequence's end, so the last item is predicted
    from a full ``history_len`` context - exactly the inference prompt's; each older window is
    ``history_len + 1`` items earlier, and the oldest may be shorter. ``loss_from`` is 0 (kept so a
    trainer can add context-only items in front of a window).
    """
    size = history_len + 1
    end = len(sequence)
    while end > 0:
        start = max(0, end - size)
        yield list(sequence[start:end]), 0
        end = start


def render_prompt_text(titles: Sequence[str], template: PromptTemplate) -> str:
    """Human-readable form of ``build_prompt_ids`` for the JSONL export (EOS shown as a newline)."""
    history = list(titles)[-template.history_len :] if template.history_len > 0 else []
    return template.instruction + "\n" + "".join(f"{t}\n" for t in history)


@dataclass(frozen=True)
class Example:
    """One leave-one-out example: the history before ``item`` and the target ``item``."""

    user: int
    history: tuple[int, ...]
    item: int


@dataclass(frozen=True)
class Split:
    """Chronological leave-one-out: last item = test, second-to-last = valid, every earlier = train."""

    train: tuple[Example, ...]
    valid: tuple[Example, ...]
    test: tuple[Example, ...]


def leave_one_out(
    sequences: Iterable[tuple[int, Sequence[int]]],
    min_history: int = 1,
    train: bool = True,
    train_history: int | None = None,
) -> Split:
    """Split chronological per-user item sequences (already ordered by timestamp, then item id).

    A user with ``n`` items gives one test example (target ``n-1``), one validation example (target
    ``n-2``) and train examples for targets ``min_history .. n-3``. Users with fewer than 3 items give
    only what they can: no test example without at least ``min_history`` items before it.

    Validation and test examples keep their whole history (it is the seen set the protocol excludes).
    Every train example's full prefix would make memory quadratic in a user's length (ML-25M has users
    with thousands of ratings): ``train=False`` skips them, and ``train_history=N`` keeps only the last
    N items of each train example's history (all a prompt of ``history_len`` N shows).
    """
    train_examples: list[Example] = []
    valid: list[Example] = []
    test: list[Example] = []
    for user, seq in sequences:
        seq = tuple(seq)
        n = len(seq)
        if n - 1 >= min_history:
            test.append(Example(user, seq[: n - 1], seq[n - 1]))
        if n - 2 >= min_history:
            valid.append(Example(user, seq[: n - 2], seq[n - 2]))
        if train:
            for t in range(min_history, n - 2):
                start = 0 if train_history is None else max(0, t - train_history)
                train_examples.append(Example(user, seq[start:t], seq[t]))
    return Split(tuple(train_examples), tuple(valid), tuple(test))


def export_jsonl(
    examples: Iterable[Example], title_of: Callable[[int], str], template: PromptTemplate, path: Path
) -> int:
    """Write ``{"prompt", "completion", "user", "item"}`` lines; returns the count written."""
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            record = {
                "prompt": render_prompt_text([title_of(i) for i in ex.history], template),
                "completion": title_of(ex.item),
                "user": ex.user,
                "item": ex.item,
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
