"""The transformers peer: constrained beam search with ``generate`` over the same catalog trie.

One helper for every bench that compares with transformers (``bench.measure --mode hf`` and
``bench.runtime_bench``): the model dequantized from the same GGUF in fp32, the same prompt ids, the
same trie and seen-title mask, summed log-probabilities (``length_penalty=0``), no early stopping (the
beams run until every one is finished, as our search's bound-based stop is exact), ``min(k, beam)``
sequences returned and mapped back to distinct titles.
"""

from __future__ import annotations

import time
from pathlib import Path


def load_hf(model_path: Path, threads: int):
    """The GGUF dequantized by transformers (fp32, eval mode); ``threads`` torch threads."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    return model


def constrained_beam(model, trie, prompt: list[int], unseen, eos: int, beam: int, k: int) -> tuple[float, list[str]]:
    """(milliseconds, distinct titles best first) of ``generate`` constrained to the unseen titles of ``trie``."""
    import torch

    n = len(prompt)

    def allowed(batch_id, input_ids):
        node = trie.walk(input_ids[n:].tolist())
        if node < 0 or trie.leaf_title[node] >= 0:
            return [eos]  # finished: padding after EOS
        tokens, nodes = trie.children(node)
        keep = tokens[unseen[nodes] > 0].tolist()
        return keep or [eos]

    ids = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=beam,
            num_return_sequences=min(k, beam),
            max_new_tokens=trie.max_depth,
            prefix_allowed_tokens_fn=allowed,
            eos_token_id=eos,
            pad_token_id=eos,
            length_penalty=0.0,
            early_stopping=False,
            do_sample=False,
        )
    elapsed = (time.perf_counter() - started) * 1000
    titles: list[str] = []
    for row in out[:, n:].tolist():
        tokens = row[: row.index(eos) + 1] if eos in row else row
        node = trie.walk(tokens)
        title = int(trie.leaf_title[node]) if node >= 0 else -1
        if title >= 0 and trie.titles[title] not in titles:
            titles.append(trie.titles[title])
    return elapsed, titles
