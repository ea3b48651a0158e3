"""Shared task types and batch encoders (pure Python / NumPy)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from opd.tasks.tokenizer import PAD_ID, Tokenizer


class Problem(NamedTuple):
    prompt: str  # text before the response (encode_prompts prepends BOS)
    answer: str  # canonical final answer
    solution: str  # full target text the student must generate: "<think>...</think>ANSWER<eos>"


@dataclass
class Rollouts:
    """One task's batch of finished rollouts as host arrays [B, L], target-aligned (`x[b, t]` is about token t).

    Whatever the number of turns, `logprobs` holds the student sampler's own log-prob of each student token
    (the π_old of the update, under the unmodified softmax) and 0 elsewhere; `response_mask` is 1 exactly on
    student tokens, so prompts, environment turns and padding never enter an objective or a diagnostic."""

    tokens: np.ndarray  # int32
    attention_mask: np.ndarray  # int32: 1 on real tokens (left- or right-padded; positions come from it)
    response_mask: np.ndarray  # int32: 1 on student-generated tokens
    logprobs: np.ndarray  # float32: log π_old(y_t) on student tokens, 0 elsewhere
    response_len: np.ndarray  # [B] int: student tokens per row
    truncated: np.ndarray  # [B] bool: the rollout ended on a length limit
    score: np.ndarray  # [B] float32: the task's verifier (1 = solved)


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task, single-turn and multi-turn alike (a single-turn task is a one-turn
    episode). The trainer never asks which task it holds: everything that differs lives behind this."""

    name: str
    tokenizer: Tokenizer
    metric: str  # the name of the verifier's mean: "accuracy", "success", ...
    max_prompt_len: int
    max_response_len: int  # student tokens per rollout (all turns)

    def items(self, split: str, n: int, seed: int) -> list: ...
    def rollout(self, model, items: Sequence, rng, *, temperature: float, top_p: float, top_k: int = 0,
                sample_fn=None) -> Rollouts: ...
    def sequence_length(self) -> int: ...
    def demonstrations(self, items: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def special_ids(self) -> dict[str, int]: ...


def teacher_cache_section(task, section: dict) -> dict:
    """A task's config section as the teacher's (and the capacity check's) SFT cache key sees it: without
    the keys only the student's side reads (`task.student_only_keys`), so that changing the student's style
    reuses a cached teacher."""
    drop = set(getattr(task, "student_only_keys", ()))
    return {k: v for k, v in section.items() if k not in drop}


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokens the paper masks at their first occurrence (think markers, EOS), by name."""
    names = {"think_open": "think_open_id", "think_close": "think_close_id", "eos": "eos_id"}
    return {k: int(getattr(tokenizer, a)) for k, a in names.items() if getattr(tokenizer, a, None) is not None}


class SingleTurnTask:
    """The Task protocol for a single-turn task built on `Problem`s: a subclass provides `problems(split, n,
    seed)`, `demonstration(problem) -> text`, `score(problem, response_text)`, `tokenizer` and the length
    limits; the protocol methods follow from them."""

    def items(self, split: str, n: int, seed: int) -> list[Problem]:
        return self.problems(split, n, seed)

    def prompt_of(self, p: Problem) -> str:
        return p.prompt

    def rollout(self, model, items, rng, *, temperature: float, top_p: float, top_k: int = 0,
                sample_fn=None) -> Rollouts:
        return single_turn_rollout(self, model, items, rng, temperature=temperature, top_p=top_p, top_k=top_k,
                                   sample_fn=sample_fn)

    def sequence_length(self) -> int:
        return int(self.max_prompt_len + self.max_response_len)

    def demonstration_length(self) -> int:
        """Width the SFT demonstrations are padded to (the response budget unless a task knows better)."""
        return int(self.max_response_len)

    def demonstrations(self, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens_BxL, attention_mask_BxL, target_mask_BxL): left-padded prompt, then the demonstration
        (ending in EOS) right-padded to `demonstration_length()`; target_mask is 1 on the demonstration."""
        tokens, target, attn = encode_demonstrations(
            self.tokenizer, [p.prompt for p in items], [self.demonstration(p) for p in items],
            self.max_prompt_len, self.demonstration_length())
        return tokens, attn, target

    def special_ids(self) -> dict[str, int]:
        return special_token_ids(self.tokenizer)


def single_turn_rollout(task, model, items: Sequence, rng, *, temperature: float, top_p: float, top_k: int = 0,
                        sample_fn=None) -> Rollouts:
    """One sampled response per item after its left-padded prompt, scored by `task.score(item, text)`."""
    from opd import sampling

    sample_fn = sample_fn or sampling.sample
    tok = task.tokenizer
    cfg = sampling.SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                  max_new_tokens=int(task.max_response_len))
    prompt_BxP, mask_BxP = encode_prompts(tok, [task.prompt_of(it) for it in items], task.max_prompt_len)
    out = sample_fn(model, prompt_BxP, mask_BxP, rng, cfg, eos_id=tok.eos_id)
    tokens, resp = np.asarray(out.tokens_BxL), np.asarray(out.response_mask_BxL)
    # Ids past the tokenizer (a checkpoint's padded embedding rows) decode to nothing, as HF's do.
    texts = [tok.decode([int(t) for t in tokens[b][resp[b] > 0] if t < tok.vocab_size]) for b in range(len(items))]
    return Rollouts(tokens=tokens, attention_mask=np.asarray(out.attention_mask_BxL), response_mask=resp,
                    logprobs=np.asarray(out.logprobs_BxL, np.float32) * (resp > 0),
                    response_len=np.asarray(out.response_len_B), truncated=np.asarray(out.truncated_B),
                    score=np.asarray([task.score(it, t) for it, t in zip(items, texts)], np.float32))


SPLITS = ("train", "validation", "eval")
"""Disjoint splits of every task: train (SFT demonstrations and OPD prompts), validation (every choice a
study makes: learning rates, steps, K) and eval, the test split, evaluated once per reported run."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def split_index(split: str) -> int:
    """A per-split integer for seeding draws (train 0, eval 1, validation 2: train/eval draws predate
    the validation split and keep their seeds)."""
    check_split(split)
    return {"train": 0, "eval": 1, "validation": 2}[split]


def hash_bucket(key: str, buckets: int) -> int:
    """A stable (process- and platform-independent) bucket of a string."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % buckets


def split_of_key(key: str, eval_fraction: float) -> str:
    """Hash partition of a problem space: the same key is always in the same split. A share `eval_fraction`
    of keys is eval (test), the next share of the same size validation, the rest train."""
    if not 0.0 <= eval_fraction < 0.5:
        raise ValueError(f"eval_fraction: expected a number in [0, 0.5) (validation takes as much again), "
                         f"got {eval_fraction}")
    bucket, cut = hash_bucket(key, 1_000_000), round(eval_fraction * 1_000_000)
    return "eval" if bucket < cut else "validation" if bucket < 2 * cut else "train"


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
