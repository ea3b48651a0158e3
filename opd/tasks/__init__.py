"""Generated tasks: a small tokenizer, an arithmetic reasoning task, an agentic text world.

`make_task(name, **kwargs)` builds a registered task; `encode_prompts` / `encode_demonstrations` turn text
into the left-padded int32 batches of docs/interfaces.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opd.tasks.common import (
    SPLITS,
    Problem,
    Task,
    encode_demonstrations,
    encode_prompts,
    pad_sequences,
)
from opd.tasks.tokenizer import PAD_ID, Tokenizer, TokenMapping, require_compatible


def _arithmetic(**kwargs):
    from opd.tasks.arithmetic import ArithmeticTask

    return ArithmeticTask(**kwargs)


def _textworld(**kwargs):
    from opd.tasks.textworld import TextWorldTask

    return TextWorldTask(**kwargs)


def _longsum(**kwargs):
    from opd.tasks.longsum import LongSumTask

    return LongSumTask(**kwargs)


def _jsonl(path=None, generate=None, data_dir=".cache/opd/data", **kwargs):
    """A JsonlTask (opd.tasks.jsonl) on `path`, or on the file `generate` (a opd.tasks.chat_data spec)
    writes under `data_dir`; exactly one of the two."""
    from opd.tasks.chat_data import write_jsonl_data
    from opd.tasks.jsonl import JsonlTask

    if (path is None) == (generate is None):
        raise ValueError("path: expected exactly one of path (a JSONL file) or generate (a data spec), got "
                         + ("both" if path is not None else "neither"))
    if generate is not None:
        path = write_jsonl_data(dict(generate), data_dir)
    return JsonlTask(path, **kwargs)


@dataclass(frozen=True)
class Registered:
    """A task's factory and what it needs from the run, read by the config check (which names no task).

    tokenizer: the student tokenizer the task requires (None: any); takes_context_len: the factory takes the
    student's max_seq_len as `context_len` and checks its length limits against it."""

    build: Callable
    tokenizer: str | None = None
    takes_context_len: bool = False


TASKS = {
    "arithmetic": Registered(_arithmetic),
    "textworld": Registered(_textworld),
    "longsum": Registered(_longsum),
    # prompts go through the student checkpoint's chat template
    "jsonl": Registered(_jsonl, tokenizer="hf", takes_context_len=True),
}


def make_task(name: str, **kwargs):
    """Build the task registered under `name`; ValueError listing the allowed names otherwise.

    Keyword arguments are the task's difficulty/limit fields (conf/task/<name>.yaml); a "name" key is ignored.
    """
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}, allowed: {sorted(TASKS)}")
    kwargs.pop("name", None)
    try:
        return TASKS[name].build(**kwargs)
    except TypeError as e:  # an unknown difficulty field
        raise ValueError(f"task {name!r}: {e}") from None


__all__ = [
    "PAD_ID",
    "SPLITS",
    "TASKS",
    "Problem",
    "Task",
    "TokenMapping",
    "Tokenizer",
    "encode_demonstrations",
    "encode_prompts",
    "make_task",
    "pad_sequences",
    "require_compatible",
]
