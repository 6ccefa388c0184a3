"""Chat templates rendered in a sandbox, as transformers' ``apply_chat_template`` renders them.

Templates come from model repositories and are untrusted code. They run in Jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the
``raise_exception``/``strftime_now`` globals, a ``tojson`` filter that keeps non-ASCII text,
``{% generation %}`` blocks and loop controls (transformers' ``utils/chat_template_utils.py``).
Every way out of the sandbox, and every failure while rendering, is an ``LlmrunError``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmrun.errors import LlmrunError


class ChatTemplate:
    """One chat template's source, compiled on first use; ``origin`` (a file's path) is named in its errors."""

    def __init__(self, source: str, origin: str | None = None) -> None:
        self.source = source
        self._name = f"The chat template {origin}" if origin else "The chat template"
        self._compiled: jinja2.Template | None = None

    def check(self) -> ChatTemplate:
        """This template, compiled now (``LlmrunError`` on a syntax error) rather than at the first message."""
        self._compile()
        return self

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, special_tokens: dict[str, str]
    ) -> str:
        """The conversation as text; ``special_tokens`` are the named tokens (``bos_token``, ...) templates see.

        Raises:
            LlmrunError: the template has a syntax error, tries an unsafe operation, or fails on these messages.
        """
        template = self._compile()
        try:
            return template.render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **special_tokens,
            )
        except jinja2.exceptions.SecurityError as exc:
            raise LlmrunError(
                f"{self._name} tried an unsafe operation and was stopped ({exc}): use a trusted template or --no-chat."
            ) from exc
        except jinja2.exceptions.UndefinedError as exc:
            raise LlmrunError(
                f"{self._name} used an undefined value ({exc}): fix the template or use --no-chat."
            ) from exc
        except jinja2.exceptions.TemplateError as exc:
            raise LlmrunError(
                f"{self._name} refused these messages ({exc}): change the messages or use --no-chat."
            ) from exc
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            raise LlmrunError(
                f"{self._name} failed while rendering ({type(exc).__name__}: {exc}): fix the template or use --no-chat."
            ) from exc

    def _compile(self) -> jinja2.Template:
        if self._compiled is None:
            try:
                self._compiled = _template_env().from_string(self.source)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise LlmrunError(
                    f"{self._name} has a syntax error on line {exc.lineno} ({exc.message}): "
                    "fix the template or use --no-chat."
                ) from exc
        return self._compiled


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers marks assistant spans)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes, as in transformers."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """``dict()`` for templates without the builtin type's attributes, as in transformers."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env
