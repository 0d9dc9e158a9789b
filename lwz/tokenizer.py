"""HF tokenizer from a local folder, offline, plus the few helpers the trainer needs.

    tok = load_tokenizer("assets/tokenizer")   # the small bundled tokenizer of the tiny default
    ids = encode(tok, text)                     # no BOS/EOS added
    text = decode(tok, ids)                     # special tokens kept unless asked otherwise
    eos_id(tok), pad_id(tok)

The bundled tokenizer (scripts/make_tokenizer.py) is a 1024-id byte-level BPE whose ids 0..7 are
<|endoftext|> (eos), <|pad|>, <think>, </think>, <answer>, </answer>, <|user|>, <|assistant|>;
each encodes to one id. Any HF-format tokenizer folder (e.g. a Qwen2.5 checkpoint's) works too.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

DEFAULT_PATH = "assets/tokenizer"
_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TokenizerError(ValueError):
    """The tokenizer folder is missing or unusable; the message is one line."""


def load_tokenizer(path: str = DEFAULT_PATH, require_eos: bool = True, pad_from_eos: bool = True):
    """The HF tokenizer saved in folder `path`, loaded with no network access.

    Raises TokenizerError with one line when the folder or its tokenizer files are missing,
    when transformers cannot load it, or when it has no EOS token (require_eos; generation stops
    on it, a reward model's tokenizer may lack one). A missing pad token falls back to EOS when
    pad_from_eos (as Qwen base tokenizers do); reward models keep their own pad rule.
    """
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer folder '{path}' not found (set tokenizer.path to a local HF tokenizer folder)")
    present = [f for f in _FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise TokenizerError(
            f"tokenizer folder '{path}' has no tokenizer files (expected tokenizer.json and tokenizer_config.json)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A generic tokenizer.json is loaded as such: AutoTokenizer in transformers 5 would otherwise
    # build the class of config.json's model_type (e.g. Qwen2Tokenizer) when the folder also holds
    # a model, and lose the vocabulary.
    cls = AutoTokenizer
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            with open(tc) as f:
                if json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                    cls = PreTrainedTokenizerFast
        except (OSError, ValueError):
            pass
    try:
        tok = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - one line instead of a deep traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer from '{path}': {msg}") from None
    if tok.eos_token_id is None and require_eos:  # generation needs it; a reward model's tokenizer may not
        raise TokenizerError(f"tokenizer in '{path}' has no eos_token (set it in tokenizer_config.json)")
    if tok.pad_token_id is None and tok.eos_token is not None and pad_from_eos:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str) -> bool:
    """True when folder `path` holds tokenizer files."""
    return any(os.path.isfile(os.path.join(path, f)) for f in _FILES)


def encode(tok, text: str) -> list[int]:
    """Token ids of text, with no special tokens added (special-token text still maps to its id)."""
    return list(tok.encode(text, add_special_tokens=False))


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """encode() of every text in one call (a fast tokenizer encodes the batch in parallel)."""
    if not texts:
        return []
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def decode(tok, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of ids. With skip_special_tokens=True the bundled tokenizer drops eos/pad only; the
    <think>/<answer> tags are ordinary added tokens and stay."""
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def eos_id(tok) -> int:
    return int(tok.eos_token_id)


def pad_id(tok) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def single_token_id(tok, text: str) -> Optional[int]:
    """The id when text encodes to exactly one token (e.g. '</answer>' in the bundled tokenizer), else None."""
    ids = encode(tok, text)
    return ids[0] if len(ids) == 1 else None


def vocab_size(tok) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tok)


def check_fits_model(tok, tok_path: str, model_vocab: int, model_path: str) -> None:
    """TokenizerError (one line) when the tokenizer can produce an id the model has no embedding
    row for (its largest id >= the model's vocab_size); a model vocabulary larger than the tokenizer's
    (padded, as Qwen's) is fine."""
    top = max(max(tok.get_vocab().values(), default=-1), len(tok) - 1)
    if top >= model_vocab:
        raise TokenizerError(f"tokenizer '{tok_path}' has ids up to {top}, but the model in '{model_path}' has "
                             f"vocab_size {model_vocab}: use the model's own tokenizer (tokenizer.path)")


__all__ = ["DEFAULT_PATH", "TokenizerError", "check_fits_model", "decode", "encode", "encode_batch", "eos_id",
           "load_tokenizer", "pad_id", "single_token_id", "vocab_size"]
