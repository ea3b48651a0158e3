"""Chat templates: a conversation -> the prompt text a chat model was trained on.

    text = render_chat(tok.chat_template, [{"role": "user", "content": "What is 2 + 3?"}],
                       add_generation_prompt=True, special_tokens={"eos_token": "<|im_end|>"})

Templates are the Jinja2 strings that ship in tokenizer_config.json (or a GGUF file's
`tokenizer.chat_template`). They are rendered the way `transformers.apply_chat_template` renders them: a
sandboxed environment with trim_blocks/lstrip_blocks and the loop-controls extension, `messages`,
`add_generation_prompt`, the special-token strings and `raise_exception` in scope.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, *, where: str = "messages") -> list[dict[str, str]]:
    """A validated copy of a conversation: a non-empty list of {"role": one of ROLES, "content": str}.
    Anything else is a one-line ValueError naming `where`, the message index and the key."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}[{i}]: expected an object with 'role' and 'content', got {m!r:.80}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ValueError(f"{where}[{i}]: unknown key(s) {extra}; allowed: ['content', 'role']")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role: expected one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with transformers/torch
        raise ValueError("chat template: rendering needs the jinja2 package (pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ValueError(f"chat template: not a valid Jinja2 template ({err})") from None


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str | None] | None = None) -> str:
    """The text of `messages` under `template`; `add_generation_prompt` appends the assistant header so the
    model's next tokens are its answer. `special_tokens`: e.g. {"bos_token": ..., "eos_token": ...}, the
    names templates refer to."""
    if not isinstance(template, str) or not template:
        raise ValueError("chat template: the tokenizer has no chat template")
    msgs = check_messages(messages)
    compiled = _compiled(template)
    from jinja2 import TemplateError

    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               **dict(special_tokens or {}))
    except TemplateError as err:
        raise ValueError(f"chat template: rendering failed ({type(err).__name__}: {err})") from None
