"""Tiny random LLaMA models and tokenizers, built offline in seconds, for the whole test suite.

``make_tiny_tokenizer(dir)`` trains a byte-level BPE (vocab ~600) on titles and the instruction and saves
it as a HF fast tokenizer with BOS ``<|im_start|>`` added by its post-processor and EOS ``<|im_end|>``.
``make_tiny_llama(dir)`` saves a random ``LlamaConfig(hidden_size=64, 2 layers, GQA 4/2 heads)`` model
with that tokenizer: a complete HF LLaMA directory, like any real base.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TITLES = [
    "Toy Story (1995)",
    "Jumanji (1995)",
    "Heat (1995)",
    "GoldenEye (1995)",
    "American President, The (1995)",
    "Dracula: Dead and Loving It (1995)",
    "Balto (1995)",
    "Nixon (1995)",
    "Sabrina (1995)",
    "Sudden Death (1995)",
    'Quote "Me" (2001)',
    "Back\\slash (2002)",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)",
    "Matrix, The (1999)",
    "Matrix Reloaded, The (2003)",
    "Alien (1979)",
    "Aliens (1986)",
    "Star Wars: Episode IV - A New Hope (1977)",
    "Pulp Fiction (1994)",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(out_dir: Path, corpus: list[str] | None = None, vocab_size: int = 600):
    """Train and save a byte-level BPE tokenizer; returns the loaded ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from genrec_edge.prompts import DEFAULT_INSTRUCTION

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = list(corpus or DEFAULT_TITLES) + [DEFAULT_INSTRUCTION, "The quick brown fox jumps over 0123456789."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 4, trainer=trainer)
    bos_id = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(out_dir: Path, corpus: list[str] | None = None, seed: int = 0, tie: bool = True):
    """Save a random tiny LLaMA + tokenizer to ``out_dir`` (a plain HF directory); returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out_dir, corpus)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
