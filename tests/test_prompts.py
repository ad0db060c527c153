"""prompts.py: the leave-one-out split and the one token layout training and serving share.

The tokenizer here is one id per character (BOS = 1 when ``add_special``), so every expected id list
below can be written out by hand.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_HISTORIES, TINY_TITLES, interrupt_once, start_cli_as_a_shell_would
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_edge.cli import main
from genrec_edge.errors import UsageError
from genrec_edge.prompts import (
    IGNORE_INDEX,
    Example,
    PromptTemplate,
    build_prompt_ids,
    build_training_window,
    export_jsonl,
    leave_one_out,
    render_prompt_text,
    training_windows,
)

BOS, EOS = 1, 2


def char_tokenize(text: str, add_special: bool) -> list[int]:
    return ([BOS] if add_special else []) + [ord(c) for c in text]


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


TEMPLATE = PromptTemplate(instruction="Hi", history_len=2)


# ----------------------------------------------------------------------------- leave-one-out
def test_leave_one_out_exact_examples():
    split = leave_one_out([(7, [10, 20, 30, 40, 50]), (8, [1, 2]), (9, [5])])
    assert split.test == (Example(7, (10, 20, 30, 40), 50), Example(8, (1,), 2))
    assert split.valid == (Example(7, (10, 20, 30), 40),)
    assert split.train == (Example(7, (10,), 20), Example(7, (10, 20), 30))


def test_leave_one_out_min_history():
    split = leave_one_out([(1, [1, 2, 3, 4, 5])], min_history=3)
    assert split.test == (Example(1, (1, 2, 3, 4), 5),)
    assert split.valid == (Example(1, (1, 2, 3), 4),)
    assert split.train == ()
    assert leave_one_out([(1, [1, 2, 3])], min_history=3).test == ()


def test_leave_one_out_never_trains_on_a_valid_or_test_target():
    split = leave_one_out(TINY_HISTORIES.items())
    for user, seq in TINY_HISTORIES.items():
        train_targets = [len(e.history) for e in split.train if e.user == user]
        assert train_targets == list(range(1, max(1, len(seq) - 2)))
    assert len(split.test) == 7 and len(split.valid) == 6 and len(split.train) == 19


# ----------------------------------------------------------------------------- token layout
def test_build_prompt_ids_exact_layout_and_history_len():
    ids = build_prompt_ids(char_tokenize, EOS, ["ab", "c", "de"], TEMPLATE)
    # BOS + "Hi\n", then only the last 2 titles, each + EOS
    assert ids == [BOS, *chars("Hi\n"), *chars("c"), EOS, *chars("de"), EOS]
    none = build_prompt_ids(char_tokenize, EOS, ["ab"], PromptTemplate(instruction="Hi", history_len=0))
    assert none == [BOS, *chars("Hi\n")]
    assert build_prompt_ids(char_tokenize, EOS, [], TEMPLATE) == [BOS, *chars("Hi\n")]


def test_training_window_labels_and_exact_inference_context():
    titles = ["ab", "c", "de"]  # history_len + 1 titles: the last is predicted from a full context
    ids, labels = build_training_window(char_tokenize, EOS, titles, TEMPLATE)
    prefix = [BOS, *chars("Hi\n")]
    assert ids == prefix + chars("ab") + [EOS] + chars("c") + [EOS] + chars("de") + [EOS]
    assert labels == [IGNORE_INDEX] * len(prefix) + ids[len(prefix) :]
    # The last title's context is exactly the inference prompt built from the titles before it ...
    context = build_prompt_ids(char_tokenize, EOS, titles[:-1], TEMPLATE)
    assert ids[: len(context)] == context
    # ... and its target, EOS included, is whole (never truncated) and carries the loss.
    target = chars("de") + [EOS]
    assert ids[len(context) :] == target and labels[len(context) :] == target


def test_training_window_loss_from_masks_context_titles():
    ids, labels = build_training_window(char_tokenize, EOS, ["ab", "c"], TEMPLATE, loss_from=1)
    n_masked = len([BOS, *chars("Hi\n")]) + len(chars("ab")) + 1
    assert labels == [IGNORE_INDEX] * n_masked + chars("c") + [EOS]
    assert len(ids) == len(labels)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 40), history_len=st.integers(0, 8))
def test_training_windows_cover_every_position_once(length, history_len):
    sequence = list(range(100, 100 + length))
    windows = list(training_windows(sequence, history_len))
    covered = [item for window, _ in reversed(windows) for item in window]
    assert covered == sequence  # in order, no overlap, no gap
    assert all(1 <= len(w) <= history_len + 1 and loss_from == 0 for w, loss_from in windows)
    if windows:
        newest = windows[0][0]
        assert newest[-1] == sequence[-1] and len(newest) == min(length, history_len + 1)
        assert all(len(w) == history_len + 1 for w, _ in windows[:-1])  # only the oldest may be short


def test_every_training_window_target_sees_the_inference_context_of_its_window():
    template = PromptTemplate(instruction="Go", history_len=3)
    titles = [TINY_TITLES[i] for i in TINY_HISTORIES[7]]
    for window, _ in training_windows(titles, template.history_len):
        ids, labels = build_training_window(char_tokenize, EOS, window, template)
        context = build_prompt_ids(char_tokenize, EOS, window[:-1], template)
        assert ids[: len(context)] == context
        assert labels[len(context) :] == chars(window[-1]) + [EOS]


def test_prompt_template_round_trip_rejects_unknown_keys():
    assert PromptTemplate.from_dict(TEMPLATE.to_dict()) == TEMPLATE
    with pytest.raises(ValueError, match="unknown prompt template keys"):
        PromptTemplate.from_dict({"instruction": "x", "history_length": 3})


# ----------------------------------------------------------------------------- JSONL
def test_export_jsonl_fields(tmp_path):
    titles = {1: 'Quote "Me" (2001)', 2: "Back\\slash (2002)", 3: "Amélie (2001)"}
    examples = [Example(5, (1, 2), 3), Example(6, (), 1)]
    path = tmp_path / "deep" / "x.jsonl"
    assert export_jsonl(examples, titles.__getitem__, TEMPLATE, path) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert "Amélie" in lines[0]  # not \u-escaped
    first, second = (json.loads(line) for line in lines)
    assert first == {"prompt": 'Hi\nQuote "Me" (2001)\nBack\\slash (2002)\n', "completion": "Amélie (2001)", "user": 5, "item": 3}
    assert second == {"prompt": "Hi\n", "completion": 'Quote "Me" (2001)', "user": 6, "item": 1}
    assert render_prompt_text(["a", "b", "c"], TEMPLATE) == "Hi\nb\nc\n"


def test_cli_prompts_export(tiny_db, tmp_path, capsys):
    out = tmp_path / "prompts"
    assert main(["prompts", "export", "--db", str(tiny_db), "--out", str(out), "--history-len", "2"]) == 0
    assert "wrote 19 train, 6 valid, 7 test examples" in capsys.readouterr().out
    test_lines = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    by_user = {r["user"]: r for r in test_lines}
    assert by_user[7]["item"] == 30 and by_user[7]["completion"] == TINY_TITLES[30]
    assert by_user[7]["prompt"].splitlines()[1:] == [TINY_TITLES[50], TINY_TITLES[40]]
    assert 6 not in by_user  # one item: nothing to predict it from
    assert main(["prompts", "export", "--db", str(tiny_db), "--out", str(out)]) == UsageError.exit_code
    assert "refusing to overwrite" in capsys.readouterr().err
    assert by_user[7]["prompt"].splitlines()[0] == PromptTemplate().instruction
    books = "Here are the books a reader read. Recommend the next book."
    assert main(["prompts", "export", "--db", str(tiny_db), "--out", str(out), "--force", "--instruction", books]) == 0
    again = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"].splitlines() for r in again] == [[books, *r["prompt"].splitlines()[1:]] for r in again]
    assert {r["user"]: r["prompt"].splitlines()[0] for r in again}[7] == books


def test_cli_prompts_export_refusals_write_nothing(tiny_db, tmp_path, capsys):
    out = tmp_path / "prompts"
    export = ["prompts", "export", "--db", str(tiny_db), "--out", str(out)]
    assert main([*export, "--instruction", "Line one\nLine two"]) == UsageError.exit_code
    assert "--instruction must be one non-empty line" in capsys.readouterr().err
    assert main([*export, "--min-history", "50"]) == UsageError.exit_code  # nobody has 50 items: no empty files
    assert "nothing to export" in capsys.readouterr().err
    assert not out.exists()
    assert main(export) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "test.jsonl").unlink()
    (out / "test.jsonl").mkdir()
    assert main([*export, "--force", "--history-len", "1"]) == UsageError.exit_code
    assert "a folder where the export writes a file" in capsys.readouterr().err
    assert (out / "train.jsonl").read_bytes() == before["train.jsonl"]  # not one file of a second export


def test_an_interrupted_export_leaves_the_files_it_started_with(tmp_path):
    """Ctrl-C mid-export used to leave a train.jsonl of whole lines (it looked complete) and no valid/test;
    with --force, a new train.jsonl beside the old valid/test."""
    import subprocess

    from test_crash_safety import write_big_csv

    items, inter = write_big_csv(tmp_path)
    db = tmp_path / "big.db"
    assert main(["data", "ingest", "csv", "--items", str(items), "--interactions", str(inter), "--db", str(db)]) == 0
    out = tmp_path / "prompts"
    assert main(["prompts", "export", "--db", str(db), "--out", str(out), "--history-len", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start_cli_as_a_shell_would("prompts", "export", "--db", str(db), "--out", str(out), "--force",
                                      stderr=subprocess.PIPE, text=True)
    def well_into_the_first_file() -> bool:
        return any(p.stat().st_size > 1_000_000 for p in out.iterdir() if ".partial-" in p.name)

    err = interrupt_once(proc, well_into_the_first_file, "the export")
    assert proc.returncode == 130, err[-300:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole; no partial file


def test_leave_one_out_can_skip_or_bound_train_histories():
    sequences = [(1, list(range(10, 110, 10)))]  # 10 items
    full = leave_one_out(sequences)
    assert leave_one_out(sequences, train=False).train == ()
    assert leave_one_out(sequences, train=False).test == full.test
    bounded = leave_one_out(sequences, train_history=3)
    assert [ex.item for ex in bounded.train] == [ex.item for ex in full.train]
    for short, whole in zip(bounded.train, full.train, strict=True):
        assert short.history == whole.history[-3:]
    assert bounded.valid == full.valid and bounded.test == full.test  # the seen sets stay whole


def test_ctrl_c_between_the_renames_still_leaves_one_whole_export(tiny_db, tmp_path, monkeypatch, capsys):
    """The three finished files are renamed into place one by one; a Ctrl-C after the first rename left a
    new train.jsonl beside the old valid/test under --force. Now the signal waits for the last rename."""
    import os
    import signal

    out = tmp_path / "prompts"
    export = ["prompts", "export", "--db", str(tiny_db), "--out", str(out)]
    assert main([*export, "--history-len", "1"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*export, "--force", "--history-len", "2"]) == 0  # what the second export writes
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first != second
    assert main([*export, "--force", "--history-len", "1"]) == 0
    capsys.readouterr()

    replace, renamed = os.replace, []

    def replace_then_ctrl_c(src, dst):
        replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C right after the first rename

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest in the background ignores it
    try:
        assert main([*export, "--force", "--history-len", "2"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted" in capsys.readouterr().err
    assert len(renamed) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == second  # the new export, whole; no partial file
