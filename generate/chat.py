"""Chat with any checkpoint directory (base, fully fine-tuned or LoRA): several turns in the checkpoint's own turn
format, streamed, with the KV cache kept across turns so each turn computes only its new tokens.

Each turn renders the whole conversation so far (system prompt, user, assistant, ..., the new user message and the
generation prompt) with the prompt style (`PromptStyle.prompt_ids`) and hands its ids to a `KVSession`, which feeds
the model only what follows the longest prefix it already holds, and recomputes from the first differing position
when the rendering of earlier turns changed (so every answer is the one a fresh generation on that conversation
gives). When the conversation no longer fits `max_seq_length` with room for `max_new_tokens`, the oldest turns are
dropped (the system prompt stays) and a note says how many; a message that does not fit even alone is refused with
advice, and the session goes on.

Input: one message per line, typed at `>> ` (a terminal), read from stdin (a pipe or file), or given as `--prompts`.
`/reset` starts a new conversation, `/exit` (or end of input, Ctrl-D) ends the session; Ctrl-C while an answer is
being written stops that answer (what was written stays in the conversation) and Ctrl-C at the prompt ends the
session. Answers go to stdout, timing and cache statistics to stderr.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from base import load_for_generation  # generate/base.py: this script's directory is first on sys.path

from lit_model.checkpoint_io import DEMO_CHECKPOINT
from lit_model.cli import script_main
from lit_model.model import GPT
from lit_model.precision import autocast
from lit_model.prompts import PromptStyle
from lit_model.sampling import KVSession
from lit_model.tokenizer import Tokenizer

COMMANDS = {"/reset": "start a new conversation", "/exit": "end the session"}
_COMMAND = re.compile(r"^/\w+$")  # one word after a slash: a command, not a message


class ContextOverflow(ValueError):
    """A message that does not fit the session's context even as the conversation's only turn."""


@dataclass
class Reply:
    """One answer and what it cost."""

    text: str
    tokens: list[int]
    prompt_tokens: int  # the rendered conversation's length
    reused: int  # prompt tokens whose keys and values came from the cache
    seconds: float
    dropped_turns: int  # user turns (each with its answer) dropped to fit the context before this one
    interrupted: bool  # stopped by Ctrl-C


class Chat:
    """One conversation with a model: its messages and the KV cache that holds their tokens.

    `turns` alternate user and assistant messages; the system prompt (when given) comes before them and survives
    `reset` and dropped turns.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        style: PromptStyle,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        system: Optional[str] = None,
        max_seq_length: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.generator = generator
        self.session = KVSession(model, max_seq_length, device)
        self.system: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, Any]] = []
        self.stops = style.stop_tokens(tokenizer)
        if max_new_tokens >= self.session.max_seq_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the session's max_seq_length "
                             f"({self.session.max_seq_length}) to leave room for a message")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation as the prompt style renders it."""
        return [*self.system, *self.turns]

    def reset(self) -> None:
        """Start a new conversation. The cache is kept: the next prompt reuses what it shares with it (the system
        prompt), and the rest is recomputed as any differing prompt is."""
        self.turns = []

    def fit(self, message: str) -> tuple[list[dict[str, Any]], list[int], int]:
        """(the turns with `message` appended, their prompt ids, turns dropped): the oldest user turns and their
        answers are dropped until the prompt and `max_new_tokens` fit in the session's max_seq_length.

        Dropping whole turns keeps every message the model sees intact (cutting into one would hand it text that
        begins mid-sentence), and the system prompt stays, since it says how to answer at all.
        """
        limit = self.session.max_seq_length - self.max_new_tokens
        turns = [*self.turns, {"role": "user", "content": message}]
        dropped = 0
        while True:
            ids = self.style.prompt_ids([*self.system, *turns], self.tokenizer)
            if len(ids) <= limit:
                return turns, ids, dropped
            if len(turns) == 1:
                raise ContextOverflow(
                    f"This message makes a prompt of {len(ids)} tokens, and with --max_new_tokens "
                    f"{self.max_new_tokens} that exceeds the context of {self.session.max_seq_length} tokens even "
                    "without earlier turns. Shorten the message (or the --system prompt), lower --max_new_tokens, "
                    f"or raise --max_seq_length (at most the model's block_size {self.model.config.block_size})."
                )
            turns = turns[2:]  # the oldest user message and its answer
            dropped += 1

    def ask(self, message: str, write: Callable[[str], None] = lambda piece: None) -> Reply:
        """Answer `message`, passing the answer's text to `write` as it is generated; the answer joins the
        conversation. Raises ContextOverflow (and changes nothing) for a message that cannot fit."""
        turns, ids, dropped = self.fit(message)
        self.turns = turns
        tokens: list[int] = []
        shown: list[str] = []
        t0 = time.perf_counter()
        stream = self.session.generate(ids, self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                                       self.stops, self.generator)
        interrupted = False
        try:
            for piece in self.tokenizer.decode_stream(_collect(stream, tokens)):
                if piece:
                    shown.append(piece)
                    write(piece)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the session and its cache stay valid
            interrupted = True
        finally:
            stream.close()
        seconds = time.perf_counter() - t0
        # The conversation keeps what was shown: the whole answer (the pieces add up to its decoded text), or up to
        # an interrupt, without the fragment of a multi-byte character that was still held back.
        text = "".join(shown)
        if interrupted and not text:
            self.turns.pop()  # nothing was answered: as if the message had not been sent
        else:
            self.turns.append({"role": "assistant", "content": text})
        return Reply(text, tokens, len(ids), self.session.reused, seconds, dropped, interrupted)


def _collect(stream: Iterator[int], into: list[int]) -> Iterator[int]:
    """`stream`, keeping each id in `into`: the ids generated before an interrupt are known too."""
    for token in stream:
        into.append(token)
        yield token


def read_messages(prompts: Optional[list[str]]) -> Iterator[str]:
    """The user's lines: `prompts` when given, else stdin, with a `>> ` prompt when it is a terminal."""
    if prompts is not None:
        yield from prompts
        return
    if sys.stdin.isatty():
        print(f"Chat: type a message; {', '.join(f'{c} to {what}' for c, what in COMMANDS.items())}; Ctrl-C stops an "
              "answer.", file=sys.stderr)
        while True:
            try:
                yield input(">> ")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the session
                print(file=sys.stderr)
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def run(chat: Chat, messages: Iterable[str]) -> list[str]:
    """The session's loop: commands, answers streamed to stdout, statistics to stderr. Returns the answers."""
    answers = []
    for line in messages:
        message = line.strip()
        if not message:
            continue
        if _COMMAND.match(message):
            if message == "/exit":
                break
            if message == "/reset":
                chat.reset()
                print("(new conversation)", file=sys.stderr)
            else:
                print(f"Unknown command {message}; the commands are " +
                      ", ".join(f"{c} ({what})" for c, what in COMMANDS.items()), file=sys.stderr)
            continue
        try:
            reply = chat.ask(message, lambda piece: print(piece, end="", flush=True))
        except ContextOverflow as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        print(flush=True)
        if reply.dropped_turns:
            print(f"(the conversation outgrew the context of {chat.session.max_seq_length} tokens: dropped the "
                  f"{reply.dropped_turns} oldest turn(s))", file=sys.stderr)
        rate = len(reply.tokens) / max(reply.seconds, 1e-9)
        print(f"{'[stopped] ' if reply.interrupted else ''}{len(reply.tokens)} tokens in {reply.seconds:.2f} s: "
              f"{rate:.1f} tokens/s; prompt {reply.prompt_tokens} tokens, {reply.reused} from the cache",
              file=sys.stderr)
        answers.append(reply.text)
    return answers


def main(
    checkpoint_dir: Path = DEMO_CHECKPOINT,
    prompts: Optional[list[str]] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    prompt_style: Optional[str] = None,
    max_seq_length: Optional[int] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    seed: int = 1234,
) -> list[str]:
    """Chat with a model: several turns, streamed to stdout; timing and tokens/s go to stderr.

    Args:
        checkpoint_dir: a model directory: base (lit_model.pth), fully fine-tuned, or LoRA (lit_model.lora.pth).
        prompts: the user's messages, in order, instead of reading them from the terminal or stdin, e.g.
            '["Hi", "/reset", "And then?"]'; commands work in it too. Without it, one message per line of stdin.
        system: a system prompt for the conversation; default the prompt style's own (or the chat template's).
        max_new_tokens: the most tokens per answer.
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample among the k most likely tokens (None: all).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p.
        prompt_style: how turns are written (alpaca, plain, llama3, chatml, ..., chat_template); default: the
            checkpoint's prompt_style.yaml, else its own chat template, else the family's chat style for an
            instruct model and plain text for a base model.
        max_seq_length: the most tokens the conversation and an answer may hold (the KV cache's limit; it grows to
            it as needed); default the model's block_size. Beyond it the oldest turns are dropped.
        precision: 32-true, bf16-true, 16-true or bf16-mixed / 16-mixed; default bf16-true on a GPU with bf16,
            else 32-true.
        device: cpu, cuda, cuda:N or auto.
        seed: random seed for sampling.
    """
    model, tokenizer, style, device, precision = load_for_generation(checkpoint_dir, prompt_style, precision, device)
    chat = Chat(model, tokenizer, style, max_new_tokens, temperature, top_k, top_p, system, max_seq_length,
                torch.Generator(device=device).manual_seed(seed), torch.device(device))
    try:
        with autocast(precision, device):  # a no-op for *-true
            return run(chat, read_messages(prompts))
    finally:
        chat.session.close()


if __name__ == "__main__":
    script_main(main)
