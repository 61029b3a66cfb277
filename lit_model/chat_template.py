"""A checkpoint's own Jinja chat template, found where transformers looks and rendered the way it renders it.

Instruct checkpoints ship the exact text format they were tuned with as a Jinja template: `chat_template` in
tokenizer_config.json (a string, or a list of named templates of which "default" is used), or a separate
`chat_template.jinja` file (transformers >= 4.43 writes it; it wins over the JSON entry, as in transformers). A GGUF
import writes the file's `tokenizer.chat_template` into tokenizer_config.json.

Templates come from the Hub and are untrusted code: they are compiled in Jinja's immutable sandbox, with the same
environment transformers uses (`trim_blocks`, `lstrip_blocks`, the loop-control extension, a `tojson` filter that does
not escape HTML, `raise_exception`, `strftime_now`, and a namespace that refuses underscore attributes), so a template
renders the same text here as `tokenizer.apply_chat_template(messages, tokenize=False)` does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The names of tokenizer_config.json's special tokens a template may use, as transformers passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant" | ..., "content": str, ...}


class ChatTemplateError(ValueError):
    """A template that cannot render a conversation: its own `raise_exception`, or a Jinja error."""


def find_chat_template(checkpoint_dir: str | Path) -> Optional[tuple[str, str]]:
    """(template source, where it was found) for a checkpoint directory, or None when it has no chat template."""
    directory = Path(checkpoint_dir)
    jinja_file = directory / TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config_path = directory / TOKENIZER_CONFIG
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    return template, f"{config_path} (chat_template)"


def special_tokens(checkpoint_dir: str | Path) -> dict[str, str]:
    """The special-token strings tokenizer_config.json names (bos_token, eos_token, ...), for the template."""
    path = Path(checkpoint_dir) / TOKENIZER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = config.get(name) if isinstance(config, dict) else None
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
            token = token.get("content")
        if isinstance(token, str):
            out[name] = token
    return out


def render(
    source: str, messages: Sequence[Message], add_generation_prompt: bool = False, **variables: Any
) -> str:
    """The text of `messages` under the template `source` (what transformers' `apply_chat_template` renders).

    variables: what the template may read besides `messages` and `add_generation_prompt`: the special tokens
        (`bos_token`, `eos_token`, ...) and template options such as a system prompt switch.
    """
    import jinja2

    template = compile_template(source)
    plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        return template.render(messages=plain, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"The chat template refused the conversation: {err}") from err


def compile_template(source: str) -> Any:
    """The template compiled in the sandbox; syntax errors raise a ChatTemplateError."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        # Older releases have known sandbox escapes, and templates from the Hub are untrusted.
        raise ImportError(f"Chat templates need jinja2 >= 3.1.6 (found {jinja2.__version__}): pip install -U jinja2")

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not contain.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` without underscore attributes: they lead to CPython internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _check_attribute(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_attribute(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks an assistant answer in templates that support
        transformers' assistant-token masks; the marked text renders unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"The chat template is not valid Jinja (line {err.lineno}): {err.message}") from err


def _check_attribute(name: Any) -> None:
    from jinja2.exceptions import SecurityError

    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"Chat templates cannot set underscore attributes on a namespace (got {name!r})")
