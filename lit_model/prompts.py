"""Prompt styles: the text a model sees before its response, and the tokens that end its turn.

A `PromptStyle` is data, not a class hierarchy: a template with `{system}`, `{prompt}` (and for Alpaca `{input}`)
slots, the default system prompt, how a system prompt is rendered, and the special tokens that end a turn. The chat
templates reproduce the official Hugging Face `chat_template`s for a single user turn with the generation prompt
(`apply_chat_template([{"role": "user", ...}], add_generation_prompt=True)`), minus the leading BOS text: the
tokenizer adds BOS as a token (`tokenizer.encode(..., bos=None)`), never as text.

A style may instead carry a checkpoint's own Jinja `chat_template` (`PromptStyle.from_checkpoint`): then the text is
what the template renders (lit_model.chat_template, as transformers' `apply_chat_template` renders it), BOS is whatever
the template writes, and the answer ends with the template's own end-of-turn text instead of an appended EOS.

A checkpoint directory keeps its style in `prompt_style.yaml` (`save_prompt_style` / `load_prompt_style`), so a model
fine-tuned with one style is prompted with the same style by generate, whatever its family's default. Which style a
run uses when none is named: `resolve_prompt_style`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
import yaml

from lit_model.chat_template import ChatTemplateError, find_chat_template, special_tokens
from lit_model.chat_template import compile_template
from lit_model.chat_template import render as render_template

PROMPT_STYLE_FILE = "prompt_style.yaml"
CHAT_TEMPLATE_STYLE = "chat_template"  # the name of a style built from a checkpoint's own chat template

_PLACEHOLDER = re.compile(r"\{(system|prompt|input)\}")


class _Tokenizer(Protocol):
    """What a prompt style needs from `lit_model.tokenizer.Tokenizer`."""

    eos_id: int | None

    def encode(
        self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1, special: bool = False
    ) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor) -> str: ...


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass over the template only: user text containing "{prompt}" or other braces is never re-expanded,
    # which str.format or chained str.replace would do (or choke on).
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class PromptStyle:
    """How an instruction (and optional input) becomes the text before the model's response.

    Args:
        name: the style's name (a key of `PROMPT_STYLES` for the built-in ones).
        template: the text before the response, with `{prompt}` for the user's message and `{system}` for the
            rendered system block ("" when there is no system prompt).
        template_with_input: used instead of `template` when the record has a non-empty `input`, with an extra
            `{input}` slot (Alpaca's second template). When empty, the input is appended to the instruction after
            a blank line ("instruction\\n\\ninput") and `template` is used, as chat datasets usually do.
        system: the system prompt; "" for none.
        system_block: how a non-empty system prompt is written into `{system}`, with a `{system}` slot.
        stop_strings: special tokens (as text) that end the model's turn besides EOS, looked up in the tokenizer.
        strip: strip surrounding whitespace from the user's message, as the official templates do with `| trim`.
        chat_template: a Jinja chat template (a checkpoint's own); when set, it renders the text and `template`,
            `template_with_input`, `system_block` and `strip` are unused.
        bos_token, eos_token: the special-token strings a chat template may write (tokenizer_config.json's).
    """

    name: str
    template: str = ""
    template_with_input: str = ""
    system: str = ""
    system_block: str = ""
    stop_strings: tuple[str, ...] = ()
    strip: bool = False
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        # A YAML file gives a list; keep the frozen dataclass hashable and comparable.
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.chat_template:
            compile_template(self.chat_template)  # a syntax error surfaces now, with the line, not at the first sample
            return
        problems = []
        if "{prompt}" not in self.template:
            problems.append(f"template must contain '{{prompt}}', got {self.template!r}")
        if self.template_with_input and not {"prompt", "input"} <= set(_PLACEHOLDER.findall(self.template_with_input)):
            problems.append(
                f"template_with_input must contain '{{prompt}}' and '{{input}}', got {self.template_with_input!r}"
            )
        if self.system and "{system}" not in self.system_block:
            problems.append(
                f"style {self.name!r} has a system prompt but its system_block {self.system_block!r} "
                "has no '{system}'"
            )
        if problems:
            raise ValueError(f"Invalid PromptStyle {self.name!r}: " + "; ".join(problems))

    # ---- text ------------------------------------------------------------------------------------------------------

    def apply(self, prompt: str, input: str = "") -> str:
        """The text the model sees before its response, for an instruction `prompt` and an optional `input`."""
        if self.chat_template:
            return self.render(self.messages(prompt, input), add_generation_prompt=True)
        system = _fill(self.system_block, {"system": self.system}) if self.system else ""
        if input and self.template_with_input:
            template = self.template_with_input
        else:
            template = self.template
            if input:
                prompt = f"{prompt}\n\n{input}"
        if self.strip:
            prompt = prompt.strip()
        return _fill(template, {"system": system, "prompt": prompt, "input": input})

    def messages(self, prompt: str, input: str = "") -> list[dict[str, str]]:
        """The conversation of one instruction: the system prompt (when set) and the user's message, the input
        after a blank line (as chat datasets join Alpaca's two fields)."""
        user = f"{prompt}\n\n{input}" if input else prompt
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": user}]

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text of a conversation (a style with a `chat_template` only)."""
        if not self.chat_template:
            raise ValueError(f"Prompt style {self.name!r} has no chat template to render a conversation with")
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        return render_template(self.chat_template, messages, add_generation_prompt, **specials)

    def response(self, prompt: str, input: str, output: str) -> str:
        """The text that follows `apply(prompt, input)` when the model answers `output`.

        A named style: the answer itself (the tokenizer appends EOS, `appends_eos`). A chat template: everything the
        template renders after the generation prompt, so the model also learns the template's end of turn. A template
        whose text with the answer does not begin with its text without it cannot be trained on; that raises.
        """
        if not self.chat_template:
            return output
        prefix = self.apply(prompt, input)
        full = self.render([*self.messages(prompt, input), {"role": "assistant", "content": output}])
        if not full.startswith(prefix):
            raise ValueError(
                f"The chat template of prompt style {self.name!r} renders a conversation with the answer that does not "
                f"begin with the prompt it renders for generation ({prefix[-40:]!r} is not a prefix of the full text), "
                "so the answer's tokens cannot be told apart. Pass a named --data.prompt_style instead."
            )
        return full[len(prefix):]

    # ---- conversations (lists of {"role", "content"} messages; see lit_model.data.records) ------------------------

    def prompt_text(self, conversation: Sequence[dict[str, Any]]) -> str:
        """The text before the model's next answer, for a conversation that ends with the user's turn."""
        if not conversation or conversation[-1].get("role") != "user":
            raise ValueError("A prompt needs a conversation that ends with a user message")
        return "".join(text for text, _ in self.segments([*conversation, {"role": "assistant", "content": ""}])[:-1])

    def prompt_ids(self, conversation: Sequence[dict[str, Any]], tokenizer: _Tokenizer) -> list[int]:
        """The token ids before the model's next answer, for a conversation that ends with the user's turn (a chat's
        next prompt: the conversation so far and the generation prompt).

        A chat template: the template's text of the whole conversation with the generation prompt, encoded at once,
        as `apply_chat_template(..., tokenize=True)` and single-turn generation encode it. It is not built from
        `segments`, so a template that renders earlier turns differently as the conversation grows (dropping old
        reasoning, numbering turns) is followed exactly. A named style: its turns encoded one by one as training
        encodes them (lit_model.data.sft): BOS as `adds_bos` says, EOS after every answer (`appends_eos`).
        """
        if not conversation or conversation[-1].get("role") != "user":
            raise ValueError("A prompt needs a conversation that ends with a user message")
        if self.chat_template:
            messages = [self._template_message(m) for m in self._with_system(conversation)]
            text = self.render(messages, add_generation_prompt=True)
            return [int(i) for i in tokenizer.encode(text, bos=self.adds_bos, special=True)]
        pieces = self.segments([*conversation, {"role": "assistant", "content": ""}])[:-1]
        ids: list[int] = []
        for i, (text, is_answer) in enumerate(pieces):
            ids += [int(t) for t in tokenizer.encode(text, bos=self.adds_bos if i == 0 else False,
                                                     eos=is_answer and self.appends_eos)]
        return ids

    def segments(self, conversation: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
        """The conversation's text in pieces, each with whether it is trained: the assistant's answers are, the rest
        (system prompt, user turns, the template's markup) is not.

        A chat template renders the conversation as transformers would; where each answer begins and ends is read off
        the template's own output, rendering the growing conversation (up to each answer with the generation prompt,
        then through the answer), never by searching the text. An answer's piece also holds the text the template
        writes right after it (its end of turn), so the model learns to stop. A named style renders one turn (the
        tokenizer appends EOS after the answer, `appends_eos`).
        """
        messages = self._with_system(conversation)
        if not self.chat_template:
            return self._named_segments(messages)
        rendered = [self._template_message(m) for m in messages]
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(rendered):
            if message["role"] != "assistant":
                continue
            before = self.render(rendered[:i], add_generation_prompt=True)
            through = self.render(rendered[: i + 1])
            if not before.startswith(done) or not through.startswith(before):
                raise ValueError(
                    f"The chat template of prompt style {self.name!r} renders a conversation inconsistently: the text "
                    f"up to answer {sum(1 for m in rendered[:i] if m['role'] == 'assistant') + 1} is not a prefix of "
                    "the text through it, so the answer's tokens cannot be told apart. Pass a named "
                    "--data.prompt_style instead."
                )
            pieces += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        full = self.render(rendered)
        if len(full) > len(done):
            pieces.append((full[len(done):], False))
        return [(text, trained) for text, trained in pieces if text or trained]

    def _with_system(self, conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation with the style's system prompt in front, unless it opens with its own."""
        messages = [dict(m) for m in conversation]
        if self.system and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    @staticmethod
    def _template_message(message: dict[str, Any]) -> dict[str, Any]:
        """A message as templates read it: an Alpaca input joins the instruction after a blank line."""
        out = {k: v for k, v in message.items() if k != "input"}
        if message.get("input"):
            out["content"] = f"{message['content']}\n\n{message['input']}"
        return out

    def _named_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """A named style's pieces: each user turn through the style's template (the system prompt in the first
        only), each answer after it. Named styles describe one turn; several are rendered turn after turn, each
        answer ended by EOS (the checkpoint's own chat template is the exact multi-turn format where there is one)."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        roles = [m["role"] for m in turns]
        if not turns or roles[0::2] != ["user"] * len(roles[0::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise ValueError(
                f"Prompt style {self.name!r} renders user turns each followed by an answer, after an optional system "
                f"message; got the roles {roles}. Merge consecutive messages of one role, or use the checkpoint's "
                "chat template (--data.prompt_style chat_template)."
            )
        # A style without a system slot (alpaca, plain) reads a system message as the start of the first request.
        slotless = system is not None and "{system}" not in self.system_block
        first = self if system is None or system == self.system or slotless else replace(self, system=system)
        later = replace(self, system="")
        pieces: list[tuple[str, bool]] = []
        for i, message in enumerate(turns):
            if message["role"] == "user":
                style = first if i == 0 else later
                content = f"{system}\n\n{message['content']}" if slotless and i == 0 else message["content"]
                pieces.append((style.apply(content, message.get("input") or ""), False))
            else:
                pieces.append((message["content"], True))
        return pieces

    @property
    def adds_bos(self) -> Optional[bool]:
        """`bos` for `Tokenizer.encode` of the prompt: None (the tokenizer's default) for a named style; False for a
        chat template, which writes BOS into its text itself when the model wants one (as transformers encodes a
        rendered chat with add_special_tokens=False)."""
        return False if self.chat_template else None

    @property
    def special_in_text(self) -> bool:
        """Whether the text holds special-token strings to encode as their ids (`Tokenizer.encode(special=...)`)."""
        return bool(self.chat_template)

    @property
    def appends_eos(self) -> bool:
        """Whether the tokenizer appends EOS after the answer (named styles); a chat template writes its own end."""
        return not self.chat_template

    def stop_tokens(self, tokenizer: _Tokenizer) -> tuple[list[int], ...]:
        """Token sequences that end a generation: EOS (and any other ids the tokenizer lists in `stop_ids`, e.g. the
        `eos_token_id`s of generation_config.json), then each of `stop_strings` the tokenizer knows as one token.

        A stop string the tokenizer splits into several ordinary tokens is skipped: the model was never trained to
        emit it, so it would only stop on a coincidence. (SentencePiece may put a bare "▁" before a user-defined
        piece; that prefix is ignored.)
        """
        stops: list[list[int]] = []
        if tokenizer.eos_id is not None:
            stops.append([int(tokenizer.eos_id)])
        for idx in getattr(tokenizer, "stop_ids", ()):  # optional: not every tokenizer has it
            if [int(idx)] not in stops:
                stops.append([int(idx)])
        for text in self.stop_strings:
            ids = [int(i) for i in tokenizer.encode(text, bos=False, eos=False)]
            if len(ids) > 1 and not tokenizer.decode(torch.tensor(ids[:-1])).strip():
                ids = ids[-1:]
            if len(ids) == 1 and ids not in stops:
                stops.append(ids)
        return tuple(stops)

    # ---- construction ----------------------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "PromptStyle":
        """A built-in style by name (see `PROMPT_STYLES`), with field overrides such as `system="..."`."""
        if name not in PROMPT_STYLES:
            close = difflib.get_close_matches(name, list(PROMPT_STYLES), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown prompt style {name!r}.{hint} Valid styles: {', '.join(PROMPT_STYLES)}.")
        return replace(PROMPT_STYLES[name], **overrides) if overrides else PROMPT_STYLES[name]

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> Optional["PromptStyle"]:
        """The style of a checkpoint's own chat template (see lit_model.chat_template), or None when it has none.

        Its stop strings are the special tokens the template writes after an answer (e.g. "<|im_end|>",
        "<|eot_id|>", "<end_of_turn>"), read off the template's own rendering of a probe conversation.
        """
        found = find_chat_template(checkpoint_dir)
        if found is None:
            return None
        tokens = special_tokens(checkpoint_dir)
        style = cls(name=CHAT_TEMPLATE_STYLE, chat_template=found[0], bos_token=tokens.get("bos_token", ""),
                    eos_token=tokens.get("eos_token", ""))
        return replace(style, stop_strings=_end_of_turn_tokens(style))

    @classmethod
    def for_model(cls, model_name: str) -> "PromptStyle":
        """The default style for a model, from its preset name or HF repo id (e.g. "Qwen/Qwen2.5-7B-Instruct").

        Instruction-tuned models get the chat format they were tuned with; a model counts as instruction-tuned when
        its name contains "instruct" or "chat" or an "-it" part (Gemma), case-insensitive. Phi-3 is always chat.

        | family                      | chat/instruct model | base model |
        |-----------------------------|---------------------|------------|
        | Llama 3, 3.1, 3.2           | llama3              | alpaca     |
        | Llama 2                     | llama2-chat         | alpaca     |
        | Mistral v0.1, v0.2          | mistral             | alpaca     |
        | Mistral v0.3                | mistral-v0.3        | alpaca     |
        | Qwen2.5                     | qwen2.5             | alpaca     |
        | other Qwen                  | chatml              | alpaca     |
        | Gemma                       | gemma               | alpaca     |
        | Phi-3                       | phi3                | -          |
        | TinyLlama                   | tinyllama           | alpaca     |
        | anything else               | alpaca              | alpaca     |

        Base models get Alpaca because fine-tuning teaches them the format, and Alpaca needs no special tokens that a
        base tokenizer may lack. A fine-tuned checkpoint's own `prompt_style.yaml` takes precedence over this mapping.
        """
        return cls.from_name(_style_name_for_model(model_name))


_PROBE = "PROBE-ANSWER-7319"
# Text that looks like a special token: <|im_end|>, </s>, <end_of_turn>, [/INST]; ordinary words never qualify.
_SPECIAL_LOOKING = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")


def _end_of_turn_tokens(style: PromptStyle) -> tuple[str, ...]:
    """The special-looking tokens a chat template writes right after an assistant's answer."""
    try:
        answer = style.response("Hi", "", _PROBE)
    except (ChatTemplateError, ValueError):  # a template that refuses the probe: EOS alone stops generation
        return ()
    tail = answer[answer.find(_PROBE) + len(_PROBE):] if _PROBE in answer else ""
    return tuple(dict.fromkeys(_SPECIAL_LOOKING.findall(tail)))


def resolve_prompt_style(
    name: Optional[str], checkpoint_dir: str | Path, model_name: str, for_generation: bool = False
) -> tuple[PromptStyle, str]:
    """The style a run uses, and where it came from (printed at start). First match wins:

    1. `name` (--data.prompt_style / --prompt_style): a built-in style, or "chat_template" for the checkpoint's own;
    2. the checkpoint's prompt_style.yaml (a fine-tuned checkpoint: the style it was trained with);
    3. the checkpoint's own chat template (tokenizer_config.json, chat_template.jinja, a GGUF's metadata);
    4. the model family's default (`PromptStyle.for_model`): for a base model that is Alpaca in training, which
       teaches the format, and `plain` in generation, since a base model continues text it was never taught to
       read as an instruction.
    """
    directory = Path(checkpoint_dir)
    if name == CHAT_TEMPLATE_STYLE:
        style = PromptStyle.from_checkpoint(directory)
        if style is None:
            raise ValueError(
                f"--prompt_style {CHAT_TEMPLATE_STYLE} asks for the checkpoint's chat template, but {directory} has "
                "none (no chat_template in tokenizer_config.json, no chat_template.jinja). Name a built-in style: "
                f"{', '.join(PROMPT_STYLES)}."
            )
        return style, f"the chat template of {directory}"
    if name is not None:
        return PromptStyle.from_name(name), f"prompt style {name!r} (asked for)"
    saved = load_prompt_style(directory)
    if saved is not None:
        return saved, f"prompt style {saved.name!r} from {directory / PROMPT_STYLE_FILE}"
    own = PromptStyle.from_checkpoint(directory)
    if own is not None:
        return own, f"the chat template of {directory}"
    style = PromptStyle.for_model(model_name)
    if for_generation and style.name == "alpaca":
        return PROMPT_STYLES["plain"], f"prompt style 'plain' ({model_name} is a base model without a chat template)"
    return style, f"prompt style {style.name!r} (the default for {model_name})"


def _style_name_for_model(model_name: str) -> str:
    base = model_name.rstrip("/").split("/")[-1].lower()
    if "phi-3" in base or "phi3" in base:
        return "phi3"
    if not re.search(r"instruct|chat|(?:^|[-_.])it(?:$|[-_.])", base):
        return "alpaca"
    if "tinyllama" in base:
        return "tinyllama"
    if re.search(r"llama-?3", base):
        return "llama3"
    if re.search(r"llama-?2", base):
        return "llama2-chat"
    if "mistral" in base:
        return "mistral-v0.3" if "v0.3" in base else "mistral"
    if "qwen2.5" in base:
        return "qwen2.5"
    if "qwen" in base:
        return "chatml"
    if "gemma" in base:
        return "gemma"
    return "alpaca"


# ---- the built-in styles. The link is the template each one reproduces. ---------------------------------------------

_ALPACA_PREAMBLE = "Below is an instruction that describes a task"
PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        # https://github.com/tatsu-lab/stanford_alpaca/blob/main/train.py (PROMPT_DICT)
        PromptStyle(
            name="alpaca",
            template=f"{_ALPACA_PREAMBLE}. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{prompt}\n\n### Response:\n",
            template_with_input=f"{_ALPACA_PREAMBLE}, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n",
        ),
        PromptStyle(name="plain", template="{prompt}"),
        # https://huggingface.co/meta-llama/Llama-2-7b-chat-hf/blob/main/tokenizer_config.json. The current template
        # has no default system prompt (the long "You are a helpful, respectful and honest assistant..." was dropped).
        PromptStyle(
            name="llama2-chat",
            template="[INST] {system}{prompt} [/INST]",
            system_block="<<SYS>>\n{system}\n<</SYS>>\n\n",
            strip=True,
        ),
        # https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json
        PromptStyle(
            name="llama3",
            template="{system}<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            system_block="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            stop_strings=("<|eot_id|>", "<|end_of_text|>"),
            strip=True,
        ),
        # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2/blob/main/tokenizer_config.json (and v0.1).
        # The official template rejects a system message; we prepend it to the instruction as v0.3 does.
        PromptStyle(name="mistral", template="[INST] {system}{prompt} [/INST]", system_block="{system}\n\n"),
        # https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/tokenizer_config.json: no space before
        # [/INST] ([INST] and [/INST] are control tokens of the v3 tokenizer); the system prompt joins the user turn.
        PromptStyle(name="mistral-v0.3", template="[INST] {system}{prompt}[/INST]", system_block="{system}\n\n"),
        # https://huggingface.co/Qwen/Qwen2-7B-Instruct/blob/main/tokenizer_config.json
        PromptStyle(
            name="chatml",
            template="{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            system="You are a helpful assistant.",
            system_block="<|im_start|>system\n{system}<|im_end|>\n",
            stop_strings=("<|im_end|>", "<|endoftext|>"),
        ),
        # https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/tokenizer_config.json
        PromptStyle(
            name="qwen2.5",
            template="{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
            system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            system_block="<|im_start|>system\n{system}<|im_end|>\n",
            stop_strings=("<|im_end|>", "<|endoftext|>"),
        ),
        # https://huggingface.co/google/gemma-7b-it/blob/main/tokenizer_config.json. Gemma has no system role; a
        # system prompt opens the user turn (as Gemma 2/3's templates do).
        PromptStyle(
            name="gemma",
            template="<start_of_turn>user\n{system}{prompt}<end_of_turn>\n<start_of_turn>model\n",
            system_block="{system}\n\n",
            stop_strings=("<end_of_turn>",),
            strip=True,
        ),
        # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/tokenizer_config.json
        PromptStyle(
            name="phi3",
            template="{system}<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
            system_block="<|system|>\n{system}<|end|>\n",
            stop_strings=("<|end|>", "<|endoftext|>"),
        ),
        # https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0/blob/main/tokenizer_config.json (Zephyr's format;
        # "</s>" is its EOS written as text, which a SentencePiece tokenizer does not turn into the EOS token).
        PromptStyle(
            name="tinyllama",
            template="{system}<|user|>\n{prompt}</s>\n<|assistant|>\n",
            system_block="<|system|>\n{system}</s>\n",
        ),
    )
}


# ---- prompt_style.yaml ----------------------------------------------------------------------------------------------


def save_prompt_style(style: PromptStyle, checkpoint_dir: str | Path) -> Path:
    """Write `prompt_style.yaml` into `checkpoint_dir` and return its path.

    A built-in style is stored by name plus only the fields that differ from it (e.g. a custom system prompt), so a
    later fix to a built-in template reaches old checkpoints; a custom style is stored in full.
    """
    data = asdict(style)
    data["stop_strings"] = list(style.stop_strings)
    if style.name in PROMPT_STYLES:
        builtin = asdict(PROMPT_STYLES[style.name])
        builtin["stop_strings"] = list(PROMPT_STYLES[style.name].stop_strings)
        data = {"name": style.name, **{k: v for k, v in data.items() if k != "name" and v != builtin[k]}}
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def load_prompt_style(checkpoint_dir: str | Path) -> PromptStyle | None:
    """The style saved in `checkpoint_dir/prompt_style.yaml`, or None when the directory has none."""
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILE
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        known = {f.name for f in fields(PromptStyle)}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = " It looks like a Lit-GPT file: replace it with `name: <style>`." if "class_path" in data else ""
            raise ValueError(f"{path} has unknown fields {unknown}; valid fields: {sorted(known)}.{hint}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(f"{path} must be a mapping with a 'name' (e.g. `name: alpaca`), got {data!r}")
    name = data.pop("name")
    if name in PROMPT_STYLES:
        return PromptStyle.from_name(name, **data)
    if "template" not in data and "chat_template" not in data:
        raise ValueError(
            f"{path} names the unknown style {name!r} without a 'template'. "
            f"Use one of {', '.join(PROMPT_STYLES)} or give the full style."
        )
    return PromptStyle(name=name, **data)
