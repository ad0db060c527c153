"""Read a HF tokenizer directory into the vocabulary llama.cpp needs (``tokenizer.ggml.*``).

Two kinds, like the bases we convert:

* byte-level BPE (``tokenizer.ggml.model = "gpt2"``: SmolLM, GPT-2, Llama 3): tokens, token types, merges
  and a pre-tokenizer *name*. llama.cpp does not read the HF pre-tokenizer; it picks a hard-coded regex by
  that name, so the name must be one whose regex matches the HF tokenizer or titles tokenize differently.
* SentencePiece (``"llama"``: Llama 2, TinyLlama): pieces, scores and types from ``tokenizer.model``.

The pre-tokenizer name is decided, in order: the explicit ``pre=`` override; llama.cpp's own fingerprint
(the sha256 of the token ids of a probe text, copied from its ``convert_hf_to_gguf.py`` for the bases we
support); the structure of ``tokenizer.json``'s ``pre_tokenizer``. The fingerprint matters for a SmolLM2
tokenizer that transformers rebuilt from a GGUF: its ``tokenizer.json`` says plain ``ByteLevel`` (GPT-2's
regex) although the vocabulary was trained with single digits; it tokenizes exactly like "smollm".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from gguf import TokenType

from genrec_edge.errors import CorruptModelError, UsageError

# The probe text of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre), byte for byte.
CHK_TXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(tokenizer.encode(CHK_TXT))) -> llama.cpp pre-tokenizer name (llama.cpp conversion/base.py).
KNOWN_FINGERPRINTS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
}
# llama.cpp's Llama 3 split regex (LLAMA_VOCAB_PRE_TYPE_LLAMA3), as HF writes it in a Split pre-tokenizer.
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Names we can write for a BPE vocabulary: each is a llama.cpp pre-tokenizer whose regex we have checked
# against the HF pre-tokenizer it is chosen for (llama.cpp src/llama-vocab.cpp).
SUPPORTED_PRE = ("gpt-2", "smollm", "llama-bpe")
PROBE = "Toy Story (1995)"


@dataclass(frozen=True)
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"{path}: cannot read ({exc})") from None


def _fingerprint(hf_tokenizer) -> str:
    # Same call as llama.cpp (special tokens included), so the hashes are comparable.
    return sha256(str(hf_tokenizer.encode(CHK_TXT)).encode()).hexdigest()


def _is_byte_level(pt: dict | None, use_regex: bool) -> bool:
    return bool(pt) and pt.get("type") == "ByteLevel" and bool(pt.get("use_regex", True)) == use_regex


def _structural_pre(pre_tokenizer: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer whose regex is the HF pre_tokenizer's, or None."""
    if _is_byte_level(pre_tokenizer, use_regex=True):
        return "gpt-2"  # ByteLevel(use_regex=True) splits with GPT-2's regex, exactly llama.cpp's "gpt-2"
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
        if (
            len(steps) == 2
            and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits")
            and _is_byte_level(steps[1], use_regex=True)
        ):
            return "smollm"  # llama.cpp "smollm": "\p{N}" first, then GPT-2's regex
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_REGEX
            and _is_byte_level(steps[1], use_regex=False)
        ):
            return "llama-bpe"
    return None


def choose_pre(tokenizer_json: dict, hf_tokenizer, pre: str | None, where: Path) -> str:
    """Decide ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer (see the module docstring)."""
    if pre is not None:
        if pre not in SUPPORTED_PRE:
            raise UsageError(f"unknown pre-tokenizer {pre!r}; choose one of {', '.join(SUPPORTED_PRE)}")
        return pre
    known = KNOWN_FINGERPRINTS.get(_fingerprint(hf_tokenizer))
    if known:
        return known
    if tokenizer_json.get("normalizer"):
        raise CorruptModelError(
            f"{where}: unsupported tokenizer normalizer {tokenizer_json['normalizer'].get('type')!r} for a BPE vocabulary"
        )
    found = _structural_pre(tokenizer_json.get("pre_tokenizer"))
    if found is None:
        shown = json.dumps(tokenizer_json.get("pre_tokenizer"))[:200]
        raise CorruptModelError(
            f"{where}: unknown pre-tokenizer {shown}; llama.cpp would split text differently "
            f"(pass pre= one of {', '.join(SUPPORTED_PRE)} only if you know it matches)"
        )
    return found


def _special_flags(hf_tokenizer, bos_id: int | None, eos_id: int | None, where: Path) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS, found by tokenizing a probe with and without specials."""
    plain = list(hf_tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    full = list(hf_tokenizer(PROBE, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            head, tail = full[:start], full[start + len(plain) :]
            break
    else:
        raise CorruptModelError(f"{where}: the tokenizer's special tokens change the text's tokens")
    if head not in ([], [bos_id]) or tail not in ([], [eos_id]):
        raise CorruptModelError(f"{where}: the tokenizer adds unexpected special tokens {head} ... {tail}")
    return head == [bos_id] and bos_id is not None, tail == [eos_id] and eos_id is not None


def _chat_template(hf_dir: Path, hf_tokenizer) -> str | None:
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    jinja = hf_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _pad(tokens: list[str], types: list[int], scores: list[float] | None, vocab_size: int, where: Path) -> None:
    """Pad the vocabulary to the embedding rows (llama.cpp requires n_tokens == rows), like llama.cpp."""
    if len(tokens) > vocab_size:
        raise CorruptModelError(
            f"{where}: the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows"
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _bpe_vocab(tokenizer_json: dict, where: Path) -> tuple[list[str], list[int], list[str]]:
    model = tokenizer_json["model"]
    by_id: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    types = {i: int(TokenType.NORMAL) for i in by_id}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    n = max(by_id) + 1 if by_id else 0
    tokens, token_types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # a hole in the id space
            tokens.append(f"[PAD{i}]")
            token_types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, token_types, merges


def _spm_vocab(hf_dir: Path, tokenizer_json: dict) -> tuple[list[str], list[int], list[float]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(hf_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as exc:
        raise CorruptModelError(f"{hf_dir / 'tokenizer.model'}: not a SentencePiece model ({exc})") from None
    tokens, types, scores = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(int(TokenType.UNKNOWN))
        elif sp.is_control(i):
            types.append(int(TokenType.CONTROL))
        elif sp.is_unused(i):
            types.append(int(TokenType.UNUSED))
        elif sp.is_byte(i):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))
    # Tokens added on top of the SentencePiece model (chat markers etc.) live only in tokenizer.json.
    for added in sorted(tokenizer_json.get("added_tokens", []), key=lambda a: a["id"]):
        i = added["id"]
        if i < len(tokens):
            continue
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(int(TokenType.UNUSED))
            scores.append(-1000.0)
        tokens.append(added["content"])
        types.append(int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED))
        scores.append(-1000.0)
    return tokens, types, scores


def _spm_space_prefix(tokenizer_json: dict) -> bool:
    pt = tokenizer_json.get("pre_tokenizer") or {}
    if pt.get("type") == "Metaspace":
        return pt.get("prepend_scheme", "always") != "never"
    norm = tokenizer_json.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    return any(s.get("type") == "Prepend" for s in steps)  # legacy Llama: Prepend("▁") + Replace(" ", "▁")


def is_sentencepiece(tokenizer_json: dict, hf_dir: Path) -> bool:
    pt = tokenizer_json.get("pre_tokenizer") or {}
    norm = json.dumps(tokenizer_json.get("normalizer"), ensure_ascii=False)  # keep "▁" searchable
    return pt.get("type") == "Metaspace" or "\u2581" in norm or (
        not tokenizer_json and (hf_dir / "tokenizer.model").is_file()
    )


def read_vocab(hf_dir: Path, vocab_size: int, pre: str | None = None) -> Vocab:
    """The GGUF vocabulary of the tokenizer in ``hf_dir``, padded to ``vocab_size`` embedding rows."""
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    tokenizer_json = _load_json(tj_path) if tj_path.is_file() else {}
    if not tokenizer_json and not (hf_dir / "tokenizer.model").is_file():
        raise CorruptModelError(f"{hf_dir}: no tokenizer.json or tokenizer.model")
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # transformers raises many types for a broken tokenizer directory
        raise CorruptModelError(f"{hf_dir}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None

    bos_id, eos_id = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    unk_id, pad_id = hf_tokenizer.unk_token_id, hf_tokenizer.pad_token_id
    add_bos, add_eos = _special_flags(hf_tokenizer, bos_id, eos_id, hf_dir)

    if is_sentencepiece(tokenizer_json, hf_dir):
        if not (hf_dir / "tokenizer.model").is_file():
            raise CorruptModelError(f"{hf_dir}: a SentencePiece tokenizer without tokenizer.model is not supported")
        if pre is not None and pre != "default":
            raise UsageError(f"pre={pre!r} applies to BPE vocabularies only; this one is SentencePiece")
        tokens, types, scores = _spm_vocab(hf_dir, tokenizer_json)
        merges, model, pre_name, space_prefix = None, "llama", "default", _spm_space_prefix(tokenizer_json)
    else:
        if (tokenizer_json.get("model") or {}).get("type") != "BPE":
            kind = (tokenizer_json.get("model") or {}).get("type")
            raise CorruptModelError(f"{tj_path}: unsupported tokenizer model {kind!r} (BPE or SentencePiece)")
        pre_name = choose_pre(tokenizer_json, hf_tokenizer, pre, tj_path)
        tokens, types, merges = _bpe_vocab(tokenizer_json, tj_path)
        scores, model, space_prefix = None, "gpt2", False
    _pad(tokens, types, scores, vocab_size, hf_dir)
    return Vocab(
        model=model,
        pre=pre_name,
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=merges,
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=unk_id,
        pad_id=pad_id,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=space_prefix,
        chat_template=_chat_template(hf_dir, hf_tokenizer),
    )
