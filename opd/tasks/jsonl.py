"""Bring your own prompts: a task read from a JSONL file, rendered through a checkpoint's chat template.

One JSON object per line:

    {"prompt": "What is 17 * 3?", "answer": "51"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
     "answer": "Lima"}
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}

`prompt` is one user turn; `messages` is a conversation (roles system/user/assistant). A conversation that
ends with an assistant turn is a demonstration: that turn is the SFT target and the turns before it are the
prompt. `answer` (optional) is what the verifier checks; other keys are ignored.

    tok = opd.model.hf.load_tokenizer("ckpt/student")
    task = JsonlTask("data/train.jsonl", tok, max_prompt_len=256, max_response_len=256)   # exact match
    task = JsonlTask("data/chat.jsonl", tok, verifier="none", ...)                           # reward-free OPD

Verifiers (`VERIFIERS`, or any callable `(response_text, answer) -> float`, or "package.module:function"):
"exact_match" (default) compares the response's final answer (`final_answer`) with `answer` after light
normalization; "none" scores nothing (reward-free distillation: the objective needs only the teacher).

The whole file is checked when the task is built: a bad line (invalid JSON, neither/both of prompt and
messages, an unknown role, a missing answer the verifier needs, a prompt longer than max_prompt_len tokens)
is one ValueError naming the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opd.model.chat import check_messages
from opd.tasks.common import Rollouts, check_split, split_of_key

Verifier = Callable[[str, str], float]

# ---------------------------------------------------------------------------------------------------------
# Verifiers
# ---------------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_MARKERS = re.compile(r"(?:####|final answer\s*(?:is)?\s*:?|answer\s*(?:is\s*:?|:))", re.IGNORECASE)
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")


def final_answer(text: str) -> str:
    """The final answer of a response: the last \\boxed{...}, else what follows the last "####",
    "final answer:", "answer:" or "answer is" (to the end of that line), else the last non-empty line."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    marks = list(_MARKERS.finditer(text))
    if marks:
        rest = text[marks[-1].end():].strip()
        return rest.splitlines()[0] if rest else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace/markup ($, **, quotes), a trailing period and thousands separators in
    numbers do not count."""
    s = " ".join(text.strip().split())
    for _ in range(3):
        s = s.strip().strip("*").strip("$").strip("`\"'").rstrip(".").strip()
    if _NUMBER.match(s):
        s = s.replace(",", "").lstrip("+")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s.casefold()


def exact_match(response_text: str, answer: str) -> float:
    """1.0 iff the response's final answer equals `answer` after normalization."""
    return float(normalize_answer(final_answer(response_text)) == normalize_answer(answer))


VERIFIERS: dict[str, Verifier | None] = {"exact_match": exact_match, "none": None}


def resolve_verifier(verifier: str | Verifier | None) -> Verifier | None:
    """A registered name, "package.module:function", a callable, or None (no verifier)."""
    if verifier is None or callable(verifier):
        return verifier
    if not isinstance(verifier, str):
        raise ValueError(f"verifier: expected a name, 'module:function' or a callable, got {verifier!r}")
    if verifier in VERIFIERS:
        return VERIFIERS[verifier]
    if ":" in verifier:
        module, _, attr = verifier.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"verifier: cannot import {verifier!r} ({type(err).__name__}: {err})") from None
        if not callable(fn):
            raise ValueError(f"verifier: {verifier!r} is not callable")
        return fn
    raise ValueError(f"verifier: expected one of {sorted(VERIFIERS)} or 'module:function', got {verifier!r}")


# ---------------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonlItem:
    """One line: the conversation the prompt is rendered from, the SFT target if the line ends with an
    assistant turn, and the answer the verifier checks."""

    source: str  # "file:line"
    messages: tuple[Mapping[str, str], ...]  # prompt turns (no trailing assistant turn)
    target: str | None  # content of a trailing assistant turn
    answer: str | None
    prompt_ids: tuple[int, ...]  # chat-rendered prompt, generation header included


def _parse_line(raw: str, where: str) -> tuple[list[dict[str, str]], str | None, str | None]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError(f"{where}: expected exactly one of 'prompt' or 'messages'"
                         + (" (both given)" if has_prompt else f", got keys {sorted(obj)}"))
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError(f"{where}: prompt: expected a non-empty string, got {obj['prompt']!r:.60}")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = check_messages(obj["messages"], where=f"{where}: messages")
    target = None
    if messages[-1]["role"] == "assistant":
        target = messages.pop()["content"]
        if not messages:
            raise ValueError(f"{where}: messages: an assistant turn needs a user turn before it")
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: answer: expected a string or a number, got {answer!r:.60}")
        answer = str(answer)
    return messages, target, answer


def read_jsonl(path: str | os.PathLike, tokenizer: Any, *, max_prompt_len: int, needs_answer: bool) -> list[JsonlItem]:
    """Every item of a JSONL file, validated and encoded (see the module docstring); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    items = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        messages, target, answer = _parse_line(raw, where)
        if needs_answer and answer is None:
            raise ValueError(f"{where}: missing 'answer' (the verifier needs one on every line; "
                             "verifier='none' distils without answers)")
        try:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if len(ids) > max_prompt_len:
            raise ValueError(f"{where}: prompt has {len(ids)} tokens after the chat template > "
                             f"max_prompt_len={max_prompt_len}")
        items.append(JsonlItem(where, tuple(messages), target, answer, tuple(int(i) for i in ids)))
    if not items:
        raise ValueError(f"{path}: no items (the file is empty)")
    return items


# ---------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------


def _with_id_to_token(tokenizer: Any) -> Any:
    """The tokenizer with an `id_to_token` (the failure-mode records label loop tokens with it): an
    HFTokenizer lacks one, so a copy of it as a subclass that reads its `tokenizers` vocabulary."""
    if hasattr(tokenizer, "id_to_token") or not dataclasses.is_dataclass(tokenizer):
        return tokenizer

    @dataclasses.dataclass
    class _Labelled(type(tokenizer)):
        def id_to_token(self, i: int) -> str:
            return str(self.tokenizer.id_to_token(int(i)))

    return _Labelled(**{f.name: getattr(tokenizer, f.name) for f in dataclasses.fields(tokenizer)})


class JsonlTask:
    """Prompts from JSONL files through the tokenizer's chat template (an `opd.model.hf.HFTokenizer`).

    Splits: with `eval_path`, train is all of `path` and eval all of `eval_path`; otherwise a stable hash
    partition of `path`'s lines (`eval_fraction` of them in eval). `items(split, n, seed)` is a seeded
    permutation of the split, repeated when n exceeds it. `context_len` (the model's max_seq_len, when
    known) bounds max_prompt_len + max_response_len.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, *, max_prompt_len: int, max_response_len: int,
                 verifier: str | Verifier | None = "exact_match", eval_path: str | os.PathLike | None = None,
                 eval_fraction: float = 0.1, context_len: int | None = None, name: str = "jsonl") -> None:
        for key, value in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        if not 0.0 <= float(eval_fraction) < 0.5:
            raise ValueError(f"eval_fraction: expected a number in [0, 0.5) (validation takes as much again), "
                             f"got {eval_fraction!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer: has no chat template (JSONL prompts are rendered through one)")
        if tokenizer.eos_id is None:
            raise ValueError("tokenizer: has no EOS token (rollouts stop on it)")
        if context_len is not None and max_prompt_len + max_response_len > context_len:
            raise ValueError(f"max_prompt_len + max_response_len = {max_prompt_len + max_response_len} exceeds "
                             f"the model's context_len={context_len}")
        self.name = name
        self.tokenizer = _with_id_to_token(tokenizer)
        self.verifier = resolve_verifier(verifier)
        self.metric = "accuracy" if self.verifier is not None else "none"
        self.max_prompt_len = max_prompt_len
        self.max_response_len = max_response_len
        needs = self.verifier is not None
        main = read_jsonl(path, tokenizer, max_prompt_len=max_prompt_len, needs_answer=needs)
        self._splits = {"train": [], "validation": [], "eval": []}
        for it in main:
            key = json.dumps([it.messages, it.target, it.answer], sort_keys=True)
            self._splits[split_of_key(key, float(eval_fraction))].append(it)
        if eval_path is not None:  # the test split is that file; hash-eval lines of the main file train
            self._splits["train"] += self._splits["eval"]
            self._splits["eval"] = read_jsonl(eval_path, tokenizer, max_prompt_len=max_prompt_len, needs_answer=needs)

    def __len__(self) -> int:
        return sum(len(v) for v in self._splits.values())

    # -- items and scoring ----------------------------------------------------------------------------

    def items(self, split: str, n: int, seed: int) -> list[JsonlItem]:
        check_split(split)
        pool = self._splits[split]
        if not pool:
            raise ValueError(f"task {self.name!r}: the {split} split is empty (give eval_path or more lines)")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an integer >= 0, got {n!r}")
        rng = np.random.default_rng(seed)
        reps = math.ceil(n / len(pool)) if n else 0
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)]) if reps else np.zeros(0, int)
        return [pool[int(i)] for i in order[:n]]

    def score(self, item: JsonlItem, response_text: str) -> float:
        """The verifier's score of a response (EOS already stripped); 0.0 when there is no verifier."""
        if self.verifier is None:
            return 0.0
        return float(self.verifier(response_text, item.answer))

    def prompt_batch(self, items: Sequence[JsonlItem]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_BxP, prompt_mask_BxP) int32, left-padded with the tokenizer's pad id to max_prompt_len."""
        out = np.full((len(items), self.max_prompt_len), self.tokenizer.pad_id, np.int32)
        mask = np.zeros_like(out)
        for b, it in enumerate(items):
            out[b, self.max_prompt_len - len(it.prompt_ids):] = it.prompt_ids
            mask[b, self.max_prompt_len - len(it.prompt_ids):] = 1
        return out, mask

    # -- the trainer's task protocol ------------------------------------------------------------------

    def rollout(self, model: Any, items: Sequence[JsonlItem], rng: Any, *, temperature: float, top_p: float,
                top_k: int = 0, sample_fn: Any = None) -> Rollouts:
        """One sampled response per item after its chat-rendered prompt, scored by the verifier."""
        from opd import sampling

        sample_fn = sample_fn or sampling.sample
        cfg = sampling.SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                      max_new_tokens=int(self.max_response_len))
        prompt_BxP, mask_BxP = self.prompt_batch(items)
        out = sample_fn(model, prompt_BxP, mask_BxP, rng, cfg, eos_id=self.tokenizer.eos_id)
        tokens, resp = np.asarray(out.tokens_BxL), np.asarray(out.response_mask_BxL)
        vocab = self.tokenizer.vocab_size
        texts = [self.tokenizer.decode([int(t) for t in tokens[b][resp[b] > 0] if t < vocab], skip_special_tokens=True)
                 for b in range(len(items))]
        return Rollouts(tokens=tokens, attention_mask=np.asarray(out.attention_mask_BxL), response_mask=resp,
                        logprobs=np.asarray(out.logprobs_BxL, np.float32) * (resp > 0),
                        response_len=np.asarray(out.response_len_B), truncated=np.asarray(out.truncated_B),
                        score=np.asarray([self.score(it, t) for it, t in zip(items, texts)], np.float32))

    def sequence_length(self) -> int:
        return int(self.max_prompt_len + self.max_response_len)

    def demonstrations(self, items: Sequence[JsonlItem]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens_BxL, attention_mask_BxL, target_mask_BxL) for SFT on lines that end with an assistant turn:
        the left-padded prompt, then the turn's tokens and EOS right-padded to max_response_len; target_mask
        is 1 on those tokens. A line without an assistant turn is a ValueError naming it."""
        tok = self.tokenizer
        prompt, pmask = self.prompt_batch(items)
        resp = np.full((len(items), self.max_response_len), tok.pad_id, np.int32)
        rmask = np.zeros_like(resp)
        for b, it in enumerate(items):
            if it.target is None:
                raise ValueError(f"{it.source}: no demonstration (the conversation does not end with an "
                                 "assistant turn)")
            ids = [*tok.encode(it.target), tok.eos_id]
            if len(ids) > self.max_response_len:
                raise ValueError(f"{it.source}: demonstration has {len(ids)} tokens (EOS included) > "
                                 f"max_response_len={self.max_response_len}")
            resp[b, : len(ids)] = ids
            rmask[b, : len(ids)] = 1
        tokens = np.concatenate([prompt, resp], axis=1)
        attn = np.concatenate([pmask, rmask], axis=1)
        target = np.concatenate([np.zeros_like(pmask), rmask], axis=1)
        return tokens, attn, target

    def special_ids(self) -> dict[str, int]:
        """The special-token mask's ids by name: EOS, the chat template's specials, think markers."""
        tok = self.tokenizer
        out = {name: int(i) for name, i in tok.special_ids.items()
               if name in ("eos", "im_start", "im_end", "think_open", "think_close")}
        for s, i in tok.chat_template_ids.items():
            out.setdefault(s, int(i))
        return out

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self._splits.items()}
        verifier = getattr(self.verifier, "__name__", repr(self.verifier))
        return f"JsonlTask(name={self.name!r}, items={sizes}, verifier={verifier})"
