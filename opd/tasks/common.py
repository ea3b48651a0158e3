"""Shared task types and batch encoders (pure Python / NumPy)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from opd.tasks.tokenizer import PAD_ID, Tokenizer


class Problem(NamedTuple):
    prompt: str  # text before the response (encode_prompts prepends BOS)
    answer: str  # canonical final answer
    solution: str  # full target text the student must generate: "<think>...</think>ANSWER<eos>"


@runtime_checkable
class Task(Protocol):
    name: str
    tokenizer: Tokenizer
    max_prompt_len: int
    max_response_len: int

    def problems(self, split: str, n: int, seed: int) -> list[Problem]: ...
    def demonstration(self, p: Problem) -> str: ...
    def score(self, p: Problem, response_text: str) -> float: ...


SPLITS = ("train", "eval")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def hash_bucket(key: str, buckets: int) -> int:
    """A stable (process- and platform-independent) bucket of a string."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % buckets


def split_of_key(key: str, eval_fraction: float) -> str:
    """Hash partition of a problem space: the same key is always in the same split."""
    return "eval" if hash_bucket(key, 1_000_000) < round(eval_fraction * 1_000_000) else "train"


def draw_distinct(n: int, draw, key, keep, *, error: str) -> list:
    """`n` items of `draw()` with distinct `key(item)`, each satisfying `keep(item, key(item))`, in draw order.

    Rejection sampling shared by the task generators (a split is a hash partition of the keys, so items are
    drawn until enough land in the requested split); ValueError(`error`) after 100 n + 10 000 draws."""
    out: list = []
    seen: set = set()
    for _ in range(100 * n + 10_000):
        if len(out) >= n:
            break
        item = draw()
        k = key(item)
        if k in seen or not keep(item, k):
            continue
        seen.add(k)
        out.append(item)
    if len(out) < n:
        raise ValueError(error)
    return out


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS + prompt, left-padded with PAD to `length`: (prompt_BxP, prompt_mask_BxP), int32.

    ValueError if an encoded prompt (BOS included) is longer than `length`.
    """
    out = np.full((len(prompts), length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for b, p in enumerate(prompts):
        ids = [tokenizer.bos_id] + tokenizer.encode(p)
        if len(ids) > length:
            raise ValueError(f"encode_prompts: prompt {b} has {len(ids)} tokens (BOS included) > length={length}")
        out[b, length - len(ids) :] = ids
        mask[b, length - len(ids) :] = 1
    return out, mask


def encode_demonstrations(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    demonstrations: Sequence[str],
    prompt_len: int,
    response_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SFT batch in the sampler's layout: prompt left-padded to `prompt_len`, demonstration right-padded to
    `response_len`, L = prompt_len + response_len.

    Returns (tokens_BxL, loss_mask_BxL, attention_mask_BxL), int32. The loss mask is target-aligned
    (docs/interfaces.md): 1 exactly at positions holding demonstration tokens (which are predicted from the
    tokens before them), 0 on prompt and padding and at position 0. ValueError if a demonstration is longer
    than `response_len`.
    """
    if len(prompts) != len(demonstrations):
        raise ValueError(f"encode_demonstrations: {len(prompts)} prompts but {len(demonstrations)} demonstrations")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, prompt_len)
    b_size = len(prompts)
    resp = np.full((b_size, response_len), PAD_ID, np.int32)
    resp_mask = np.zeros((b_size, response_len), np.int32)
    for b, d in enumerate(demonstrations):
        ids = tokenizer.encode(d)
        if len(ids) > response_len:
            raise ValueError(
                f"encode_demonstrations: demonstration {b} has {len(ids)} tokens > response_len={response_len}"
            )
        resp[b, : len(ids)] = ids
        resp_mask[b, : len(ids)] = 1
    tokens = np.concatenate([prompt_ids, resp], axis=1)
    attn = np.concatenate([prompt_mask, resp_mask], axis=1)
    loss = np.concatenate([np.zeros_like(prompt_mask), resp_mask], axis=1)
    loss[:, 0] = 0
    return tokens, loss, attn


def pad_sequences(
    sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad full token sequences (e.g. multi-turn conversations) with their per-token loss masks.

    Returns (tokens_BxL, loss_mask_BxL, attention_mask_BxL), int32; the loss mask is zeroed at position 0.
    ValueError if a sequence is longer than `length`.
    """
    b_size = len(sequences)
    tokens = np.full((b_size, length), PAD_ID, np.int32)
    loss = np.zeros((b_size, length), np.int32)
    attn = np.zeros((b_size, length), np.int32)
    for b, (seq, m) in enumerate(zip(sequences, masks, strict=True)):
        if len(seq) != len(m):
            raise ValueError(f"pad_sequences: sequence {b} has {len(seq)} tokens but {len(m)} mask entries")
        if len(seq) > length:
            raise ValueError(f"pad_sequences: sequence {b} has {len(seq)} tokens > length={length}")
        tokens[b, : len(seq)] = seq
        loss[b, : len(seq)] = m
        attn[b, : len(seq)] = 1
    loss[:, 0] = 0
    return tokens, loss, attn
