"""The trainer's validation ranking is the runtime's: same tiny model (transformers vs its GGUF in llama.cpp),
same users, same catalog trie and seen-title exclusion, same beam search."""

from __future__ import annotations

import pytest
from conftest import TINY_HISTORIES, TINY_TITLES
from tinymodel import DEFAULT_TITLES, tiny_gguf

from genrec_edge.catalog import Catalog
from genrec_edge.prompts import PromptTemplate, leave_one_out
from genrec_edge.train import Validator, search_titles
from genrec_edge.trie import CatalogTrie

CATALOG = Catalog.from_pairs(list(TINY_TITLES.items()))
VALID = [ex for ex in leave_one_out(sorted(TINY_HISTORIES.items()), train=False).valid]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, HF tokenize, eos id, pad id, GGUF path) of one tiny random LLaMA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("parity")
    gguf = tiny_gguf(folder, corpus=DEFAULT_TITLES, seed=11)
    tokenizer = AutoTokenizer.from_pretrained(folder / "hf")
    model = AutoModelForCausalLM.from_pretrained(folder / "hf").eval()

    def tokenize(text, special):
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    return model, tokenize, tokenizer.eos_token_id, tokenizer.pad_token_id, gguf


@pytest.fixture
def recommender(pair, tiny_db, tmp_path):
    from genrec_edge.recommend import Recommender

    warnings: list[str] = []
    with Recommender.open(pair[4], tiny_db, threads=2, cache_dir=tmp_path / "cache", warn=warnings.append) as rec:
        yield rec


def test_the_validation_users_exist():
    assert len(VALID) >= 5 and all(ex.history for ex in VALID)


@pytest.mark.parametrize("beam", [2, 3, 10, 40])
def test_validator_ranking_equals_the_runtime_ranking(pair, recommender, beam):
    model, tokenize, eos, pad, _ = pair
    validator = Validator(VALID, CATALOG, tokenize, eos, pad, PromptTemplate(), beam=beam, batch_users=3)
    # the trainer's trie is the runtime's: same class, same arrays
    assert isinstance(validator.trie, CatalogTrie) and validator.trie.titles == recommender.trie.titles
    assert (validator.trie.child_token == recommender.trie.child_token).all()
    trained = validator.rankings(model)
    for ex, got in zip(VALID, trained, strict=True):
        history = [CATALOG.title_of(i) for i in ex.history]
        runtime = recommender.rank_titles(history, set(history), k=10, beam=beam)
        assert got == list(runtime.titles), f"user {ex.user}"
        assert not set(got) & set(history)


def test_scores_agree_with_the_runtime(pair, recommender):
    model, tokenize, eos, pad, _ = pair
    trie = recommender.trie
    histories = [[CATALOG.title_of(i) for i in ex.history] for ex in VALID]
    from genrec_edge.prompts import build_prompt_ids

    prompts = [build_prompt_ids(tokenize, eos, h, PromptTemplate()) for h in histories]
    found = search_titles(model, prompts, [set(h) for h in histories], trie, beam=40, k=5, pad_id=pad)
    for history, pairs in zip(histories, found, strict=True):
        runtime = recommender.rank_titles(history, set(history), k=5, beam=40)
        assert [t for t, _ in pairs] == list(runtime.titles)
        # llama.cpp keeps its KV cache in F16: ~1e-2 off transformers' fp32 on this tiny random model
        assert max(abs(s - r) for (_, s), r in zip(pairs, runtime.scores, strict=True)) < 0.05
