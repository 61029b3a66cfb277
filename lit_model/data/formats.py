"""The record formats people's data comes in, each turned into the one internal form: a conversation.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; a user message
converted from an Alpaca record also carries that record's `input`. The formats, told apart by a record's keys:

    alpaca     {"instruction", "input" (optional), "output"}          -> [user(instruction, input), assistant(output)]
    messages   {"messages": [{"role", "content"}, ...]}  (OpenAI's)   -> the messages as they are
    sharegpt   {"conversations": [{"from", "value"}, ...]}            -> "from" mapped by SHAREGPT_ROLES

This module knows records only, not files: its errors (`RecordError`) say what is wrong and which field of the
record, and the reader (lit_model.data.records) puts the file and line in front.
"""

from __future__ import annotations

import re
from typing import Any, Optional

Message = dict[str, Any]
Conversation = list[Message]

FORMATS = ("alpaca", "messages", "sharegpt")
FORMAT_CHOICES = ("auto", *FORMATS)
ALPACA_FIELDS = ("instruction", "output")  # required; "input" is optional
ROLES = ("system", "user", "assistant")
# ShareGPT dumps name the speakers after the product they came from; every name seen in the common dumps is here.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
# (the record's list of messages, a message's role key, its text key) per conversation format.
_KEYS = {"messages": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}


class RecordError(ValueError):
    """What is wrong with one record (naming the field); the reader adds the file and line."""


def detect_format(record: Any) -> str:
    """The format of a record, from its keys (the reader asks this of a file's first record only)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected an object (a record), got {type(record).__name__}")
    found = [name for name, keys in (("alpaca", ALPACA_FIELDS), ("messages", ("messages",)),
                                     ("sharegpt", ("conversations",))) if all(k in record for k in keys)]
    if len(found) == 1:
        return found[0]
    if found:
        return _raise(f"holds the fields of several formats ({', '.join(found)}; fields present: {sorted(record)}): "
                      f"pass --data.format {' or '.join(found)}")
    return _raise(f"is of no format we know (fields present: {sorted(record)}): expected 'instruction' and 'output' "
                  "(alpaca), 'messages' of role/content (OpenAI) or 'conversations' of from/value (ShareGPT); rename "
                  "the fields, or pass --data.format")


def to_conversation(record: Any, fmt: str) -> Conversation:
    """A record of format `fmt` as a conversation, checked: a malformed record raises a RecordError naming its field.

    Conversations of the messages and sharegpt formats must make sense as training data: an optional system message
    first, then user and assistant in turn starting with the user, ending with an answer, and at least one answer
    with text (an Alpaca record has that shape by construction, and keeps today's rules: an empty output is allowed).
    """
    if fmt == "alpaca":
        return alpaca_to_messages(alpaca_record(record))
    if fmt not in _KEYS:
        raise ValueError(f"Unknown data format {fmt!r}: expected one of {', '.join(FORMATS)}")
    list_key, role_key, text_key = _KEYS[fmt]
    if not isinstance(record, dict):
        _raise(f"expected an object with {list_key!r}, got {type(record).__name__}")
    if list_key not in record:
        _raise(f"missing field {list_key!r} (fields present: {sorted(record)}): every record of a file must be of "
               f"its format, {fmt}{_other_format_hint(record)}")
    items = record[list_key]
    if not isinstance(items, list) or not items:
        _raise(f"field {list_key!r} must be a non-empty list of messages, got {_show(items)}")
    conversation = []
    for i, item in enumerate(items):
        field = f"{list_key}[{i}]"
        if not isinstance(item, dict):
            _raise(f"field {field!r} must be an object with {role_key!r} and {text_key!r}, got {_show(item)}")
        for key in (role_key, text_key):
            if key not in item:
                _raise(f"field {field!r} has no {key!r} (fields present: {sorted(item)}){_message_hint(fmt, item)}")
        role = _role(item[role_key], fmt, f"{field}.{role_key}")
        text = item[text_key]
        if not isinstance(text, str):
            _raise(f"field '{field}.{text_key}' must be a string, got {_show(text)}")
        problem = text_problem(text)
        if problem is not None:
            _raise(f"field '{field}.{text_key}' {problem}")
        conversation.append({"role": role, "content": text})
    order = order_problem(conversation)
    if order is not None:
        index, problem = order
        _raise(f"field '{list_key}[{index}].{role_key}': {problem}" if index is not None else
               f"field {list_key!r}: {problem}")
    return conversation


def order_problem(conversation: Conversation) -> Optional[tuple[Optional[int], str]]:
    """(the message at fault or None, what is wrong) when the roles do not make a training conversation; else None.

    Why these rules: named prompt styles render a user turn then its answer, so the roles must alternate; a
    conversation that ends with the user's message has an unanswered turn that teaches nothing (and evaluation reads
    the last message as the reference answer); one without an answer with text has nothing to train on.
    """
    start = 1 if conversation and conversation[0]["role"] == "system" else 0
    for i, message in enumerate(conversation[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] == "system":
            return i, "a system message may only come first"
        if message["role"] != expected:
            first = i == start
            return i, (f"the conversation must start with the user (after an optional system message), got "
                       f"{message['role']}" if first else
                       f"two {message['role']} messages in a row: roles must alternate (merge them into one)")
    if len(conversation) == start:
        return None, "the conversation has only a system message, no user or assistant turn"
    if conversation[-1]["role"] != "assistant":
        return len(conversation) - 1, "the conversation ends with a user message that has no answer: drop it"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in conversation):
        return None, "the conversation has no assistant message with text: nothing to train on"
    return None


def _role(value: Any, fmt: str, field: str) -> str:
    if fmt == "sharegpt":
        role = SHAREGPT_ROLES.get(value.lower()) if isinstance(value, str) else None
        if role is None:
            _raise(f"field {field!r} is {value!r}, which is not a speaker we know: expected one of "
                   f"{', '.join(SHAREGPT_ROLES)}")
        return role
    if value not in ROLES:
        _raise(f"field {field!r} is {value!r}: expected one of {', '.join(ROLES)} (tool messages and tool calls are "
               "not supported)")
    return value


def _other_format_hint(record: dict) -> str:
    try:
        other = detect_format(record)
    except RecordError:
        return ""
    return f" (this record looks like {other}: fix it, or split the file by format)"


def _message_hint(fmt: str, item: dict) -> str:
    # The one mix-up seen in practice: ShareGPT's from/value under "messages", or role/content under "conversations".
    other = "sharegpt" if fmt == "messages" else "messages"
    _, role_key, text_key = _KEYS[other]
    if role_key in item and text_key in item:
        _, own_role, own_text = _KEYS[fmt]
        return f"; its {role_key}/{text_key} are the {other} format's names: rename them to {own_role}/{own_text}"
    return ""


def _show(value: Any) -> str:
    return f"{type(value).__name__}: {str(value)[:60]!r}"


def _raise(problem: str) -> Any:
    raise RecordError(problem)


# ---- Alpaca ----------------------------------------------------------------------------------------------------------


def alpaca_record(record: Any) -> dict[str, str]:
    """An Alpaca record checked and normalised to instruction, input ("" when missing or null) and output."""
    problem = alpaca_problem(record)
    if problem is not None:
        raise RecordError(problem)
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def alpaca_problem(record: Any) -> Optional[str]:
    """What is wrong with an Alpaca record (naming the field), or None."""
    if not isinstance(record, dict):
        return f"expected an object with 'instruction', 'input' and 'output', got {type(record).__name__}"
    for field in ALPACA_FIELDS:
        if field not in record:
            return f"missing required field {field!r} (fields present: {sorted(record)})"
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        if field == "input" and value is None:
            continue
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {_show(value)}"
        problem = text_problem(value)
        if problem is not None:
            return f"field {field!r} {problem}"
    return None


def alpaca_to_messages(record: dict[str, str]) -> Conversation:
    """An Alpaca record as a conversation: the instruction (with the record's input) asks, the output answers."""
    user: Message = {"role": "user", "content": record["instruction"]}
    if record.get("input"):
        user["input"] = record["input"]
    return [user, {"role": "assistant", "content": record["output"]}]


# ---- text ------------------------------------------------------------------------------------------------------------

# Half of a UTF-16 surrogate pair: JSON may spell one ("\\ud83d" without its partner), Python keeps it in a str, but
# it is not a character, cannot be encoded as UTF-8, and tokenizers fail on it without saying where it is.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> Optional[str]:
    """What makes `text` impossible to tokenize (a lone surrogate, with its position), or None when it is fine."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    i = match.start()
    return (
        f"holds invalid text: a lone UTF-16 surrogate U+{ord(text[i]):04X} at character {i} (after "
        f"{text[max(0, i - 20):i]!r}), which is not a character. JSON escapes \\ud800-\\udfff must come in valid pairs "
        "(e.g. \\ud83d\\ude00): fix or drop this record."
    )
