"""Chat messages -> the prompt text a checkpoint was trained on, by rendering its `chat_template` (Jinja2).

Rendered as transformers' `apply_chat_template` renders it (transformers.utils.chat_template_utils): an
`ImmutableSandboxedEnvironment` (templates come from the Hub and are untrusted code) with trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now` and a `tojson` filter that does
not escape HTML; the variables are `messages`, `add_generation_prompt` and the special tokens by their
transformers names (`bos_token`, `eos_token`, ...).

A system message on a template that refuses one (Mixtral-8x7B-Instruct-v0.1's original template raises
"Conversation roles must alternate" / "Only user and assistant roles are supported!") is folded into the
first user turn as "SYSTEM\\n\\nUSER", which is what the Mistral v1 instruct format does with a system prompt
(mistral-common, and the Hub template's later revision). Anything else the template refuses is one line
naming the template's own reason.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moetrt.errors import MoetrtError

ROLES = ("system", "user", "assistant")


def render_chat(
    template: str | None,
    messages: list[dict[str, str]],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The rendered prompt text. `messages` are {"role": "system"|"user"|"assistant", "content": str}.
    Raises MoetrtError (one line) for a missing or malformed template, malformed messages, or messages the
    template refuses."""
    if template is None:
        raise MoetrtError("the tokenizer has no chat_template (tokenizer_config.json); give a plain prompt instead")
    check_messages(messages)
    compiled = _compile(template)
    try:
        return _render(compiled, messages, special_tokens, add_generation_prompt)
    except jinja2.exceptions.TemplateError as err:
        folded = fold_system(messages)
        if folded is None:
            raise MoetrtError(f"the chat template refused the messages: {_one_line(err)}") from None
    try:
        return _render(compiled, folded, special_tokens, add_generation_prompt)
    except jinja2.exceptions.TemplateError as err:
        raise MoetrtError(f"the chat template refused the messages: {_one_line(err)}") from None


def check_messages(messages: Any) -> None:
    """A non-empty list of {"role", "content"} objects with a known role and string content, or MoetrtError."""
    if not isinstance(messages, list) or not messages:
        raise MoetrtError("messages: expected a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise MoetrtError(f"messages[{i}]: expected an object whose 'role' is one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise MoetrtError(f"messages[{i}]: expected a string 'content'")


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The messages with a leading system message folded into the first user turn ("SYSTEM\\n\\nUSER"), or
    None when there is nothing to fold (no leading system message, or no user turn right after it)."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None
    first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first, *messages[2:]]


def _render(
    compiled: jinja2.Template,
    messages: list[dict[str, str]],
    special_tokens: dict[str, str],
    add_generation_prompt: bool,
) -> str:
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise MoetrtError(f"chat_template: not a valid Jinja2 template (line {err.lineno}: {err.message})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
