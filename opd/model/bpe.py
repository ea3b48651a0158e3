"""Byte-level BPE tokenizers rebuilt from a GGUF file's vocabulary, merges and pre-tokenizer name.

A GGUF file (llama.cpp) stores a GPT-2-style tokenizer as `tokenizer.ggml.tokens` (id order), `.token_type`,
`.merges` and `.pre`, the name of the regex that llama.cpp splits text with before merging. This module turns
them into a `tokenizers.Tokenizer` that encodes text as llama.cpp does, so ids match the model's training:

    tok = tokenizer_from_gguf_metadata(meta)     # meta: "tokenizer.ggml.*" key -> value

The pre-tokenizer follows llama.cpp's table (llama-vocab.cpp): for example "smollm" splits every digit on its
own and then applies GPT-2's regex, as SmolLM2's own tokenizer.json does. Names not in `PRE_TOKENIZERS` are a
ValueError rather than a silent fallback: a wrong split changes the ids without any error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = "gpt2"  # GPT-2's own regex, as ByteLevel(use_regex=True) implements it
_DIGITS_GPT2 = "digits+gpt2"  # each digit alone, then GPT-2's regex
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> split rule (llama-vocab.cpp groups these names under one regex each).
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2, "command-r": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2, "exaone": _DIGITS_GPT2, "minerva-7b": _DIGITS_GPT2,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
    "falcon3": _LLAMA3,
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging for these (`ignore_merges`).
_IGNORE_MERGES = {_LLAMA3}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies are spelled in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _pre_tokenizer(rule: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if rule == _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if rule == _DIGITS_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _required(meta: Mapping[str, Any], key: str, where: Any) -> Any:
    value = meta.get(key)
    if value is None:
        raise ValueError(f"{where}: missing metadata {key!r} (needed for the tokenizer)")
    return value


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any], *, where: Any = "GGUF") -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF tokenizer metadata ("tokenizer.ggml.*" -> value).

    Control tokens (<|im_start|>, <|endoftext|>, ...) become special added tokens and user-defined ones
    (e.g. <think>) plain added tokens, at their GGUF ids, so neither is ever split. Raises a one-line
    ValueError naming `where` for a tokenizer model other than "gpt2", an unknown pre-tokenizer, or missing
    tokens/merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _required(meta, "tokenizer.ggml.model", where)
    if model != "gpt2":
        raise ValueError(f"{where}: unsupported tokenizer.ggml.model={model!r} (only byte-level BPE 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{where}: unsupported tokenizer.ggml.pre={pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    tokens: Sequence[str] = _required(meta, "tokenizer.ggml.tokens", where)
    merges: Sequence[str] = _required(meta, "tokenizer.ggml.merges", where)
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    # Vocabularies are spelled in GPT-2's byte alphabet; a token with other characters (a control token
    # written in plain UTF-8) is respelled byte by byte so that the BPE model can hold it.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        if key in vocab:
            raise ValueError(f"{where}: tokenizer.ggml.tokens repeats token {t!r} (ids {vocab[key]} and {i})")
        vocab[key] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: tokenizer.ggml.merges entry {m!r} is not two space-separated pieces")
        pairs.append((parts[0], parts[1]))

    rule = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                               ignore_merges=rule in _IGNORE_MERGES))
    tok.pre_tokenizer = _pre_tokenizer(rule)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{where}: rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, "
                         f"the file lists {len(tokens)}")
    return tok
