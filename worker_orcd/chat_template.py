"""A model's chat template (Jinja, from the GGUF or --chat-template) rendered safely.

The template comes from a model file, so it is untrusted code: it runs in
jinja2's ``ImmutableSandboxedEnvironment`` (no attribute escapes, no mutation
of the values we pass in) with the same globals and filters transformers'
``apply_chat_template`` provides (``raise_exception``, ``strftime_now``, a
``tojson`` that does not HTML-escape), so the text and hence the token ids
match transformers for the same template and messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidParams, ModelLoadError


class TemplateRaised(jinja2.TemplateError):
    """The template itself refused the conversation (``raise_exception``)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def for_tokenizer(cls, source: str, tokenizer: Any) -> ChatTemplate:
        """bos/eos token texts from the model's tokenizer (what the template's ``bos_token`` means)."""

        def text(token_id: int | None) -> str:
            if token_id is None:
                return ""
            return bytes(tokenizer.token_bytes(token_id)).decode("utf-8", errors="replace")

        return cls(source, bos_token=text(getattr(tokenizer, "bos_id", None)),
                   eos_token=text(getattr(tokenizer, "eos_id", None)))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text; a template error (or its own ``raise_exception``) is INVALID_PARAMS."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )
        except TemplateRaised as e:
            raise InvalidParams(f"messages: the model's chat template refused them: {e.message}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                RecursionError, OverflowError) as e:
            raise InvalidParams(f"messages: the model's chat template failed on them ({type(e).__name__})") from None
