"""Tiny random LLaMA models and tokenizers, built offline in seconds, for the whole test suite.

``make_tiny_tokenizer(dir)`` trains a byte-level BPE (vocab ~600) on titles and the instruction and saves
it as a HF fast tokenizer with BOS ``<|im_start|>`` added by its post-processor and EOS ``<|im_end|>``.
``make_tiny_llama(dir)`` saves a random ``LlamaConfig(hidden_size=64, 2 layers, GQA 4/2 heads)`` model
with that tokenizer: a complete HF LLaMA directory, like any real base.
``make_tiny_spm_tokenizer(dir)`` trains a SentencePiece BPE (byte fallback, Llama-style ``<unk>/<s>/</s>``,
BOS added) and saves it as a HF ``LlamaTokenizer`` dir; ``make_tiny_llama(dir, tokenizer="spm")`` uses it.
``tiny_gguf(dir)`` builds the tiny LLaMA and converts it to a GGUF with our converter.
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


def _tiny_texts(corpus: list[str] | None) -> list[str]:
    from genrec_edge.prompts import DEFAULT_INSTRUCTION

    return list(corpus or DEFAULT_TITLES) + [DEFAULT_INSTRUCTION, "The quick brown fox jumps over 0123456789."]


def make_tiny_spm_tokenizer(out_dir: Path, corpus: list[str] | None = None, vocab_size: int = 400):
    """Train a SentencePiece BPE (Llama-style) and save it as a HF ``LlamaTokenizer`` dir; returns it loaded.

    Trained offline in memory; byte fallback covers any character the tiny corpus lacks, like Llama 2's.
    """
    import io

    import sentencepiece as spm
    from tokenizers import processors
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_texts(corpus) * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a tiny corpus may not support the full vocab_size
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out_dir)  # converts tokenizer.model to a fast tokenizer
    # Llama adds BOS: make the post-processor say so, as Llama 2's tokenizer.json does.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


def make_tiny_llama(
    out_dir: Path,
    corpus: list[str] | None = None,
    seed: int = 0,
    tie: bool = True,
    tokenizer: str = "bpe",
    hidden_size: int = 64,
    intermediate_size: int = 128,
):
    """Save a random tiny LLaMA + tokenizer to ``out_dir`` (a plain HF directory); returns the path.

    ``tokenizer``: "bpe" (byte-level, SmolLM-like) or "spm" (SentencePiece, Llama-like).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if tokenizer == "bpe":
        tokenizer = make_tiny_tokenizer(out_dir, corpus)
    elif tokenizer == "spm":
        tokenizer = make_tiny_spm_tokenizer(out_dir, corpus)
    else:
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
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


def tiny_gguf(
    out_dir: Path,
    outtype: str = "f32",
    tokenizer: str = "bpe",
    corpus: list[str] | None = None,
    provenance: dict | None = None,
    **llama_kwargs,
) -> Path:
    """Build the tiny LLaMA in ``out_dir/hf`` and convert it to ``out_dir/model-<OUTTYPE>.gguf``; returns it.

    The HF directory stays next to it for parity checks (``out_dir / "hf"``). Extra keyword arguments go
    to :func:`make_tiny_llama` (e.g. ``seed``, ``tie``, ``hidden_size``).
    """
    from genrec_edge.convert import convert

    out_dir = Path(out_dir)
    hf_dir = make_tiny_llama(out_dir / "hf", corpus=corpus, tokenizer=tokenizer, **llama_kwargs)
    return convert(hf_dir, out_dir / f"model-{outtype.upper()}.gguf", outtype=outtype, provenance=provenance, progress=False)
