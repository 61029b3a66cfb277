"""Chat mode (generate/chat.py): with the KV cache kept across turns, every answer equals a fresh greedy generation
on the whole rendered conversation; a turn computes only the tokens after what the cache holds, and recomputes from
the first differing position when the rendering changed; overflow drops the oldest turns or refuses with advice;
Ctrl-C stops one answer; the CLI runs end to end from --prompts and from stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.finetune_utils import ROOT, load_script
from tests.test_prompts import CHATML
from tests.tokenizer_utils import make_bpe_tokenizer

from lit_model import GPT, Config
from lit_model.cli import script_main
from lit_model.prompts import PromptStyle
from lit_model.sampling import KVSession, generate
from lit_model.tokenizer import Tokenizer

chat_script = load_script("generate/chat.py")
TEXTS = ["Hello there, how are you today?", "I am fine, thanks. And you?", "Tell me a story about a fox.",
         "Once upon a time a fox met a dog.", "What happened next?", "They became friends."] * 10
QUESTIONS = ["Hello there!", "Tell me a story about a fox.", "What happened next?"]
# ChatML with the number of messages in the system line: every turn re-renders the conversation's first tokens.
COUNTING = ("{{ '<|im_start|>system\\n' + (messages | length | string) + ' messages<|im_end|>\\n' }}"
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_chat_checkpoint(dir: Path, template: str = CHATML, block_size: int = 512) -> Path:
    """A 2-layer model with a ChatML tokenizer (<|im_start|>, <|im_end|> special; EOS <|im_end|>) and template."""
    from tokenizers import Tokenizer as HFTokenizer

    make_bpe_tokenizer(dir, texts=TEXTS, add_bos_token=False)
    tok = HFTokenizer.from_file(str(dir / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(dir / "tokenizer.json"))
    config = json.loads((dir / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", chat_template=template)
    (dir / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = Config(name="tiny-chat", n_layer=2, n_head=4, n_embd=32, n_query_groups=2, intermediate_size=64,
                 vocab_size=Tokenizer(dir).vocab_size, block_size=block_size)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(0.2)  # large enough that greedy answers vary from token to token
    torch.save(model.state_dict(), dir / "lit_model.pth")
    cfg.save(dir / "model_config.yaml")
    return dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def load(ckpt: Path) -> tuple[GPT, Tokenizer, PromptStyle]:
    model = GPT(Config.from_file(ckpt / "model_config.yaml"))
    model.load_state_dict(torch.load(ckpt / "lit_model.pth", weights_only=True))
    return model.eval(), Tokenizer(ckpt), PromptStyle.from_checkpoint(ckpt)


class Feeds:
    """Records (positions, ids) of every forward the model runs with the KV cache."""

    def __init__(self, model: GPT) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        if kwargs.get("input_pos") is not None:
            self.calls.append((kwargs["input_pos"].tolist(), args[0][0].tolist()))

    def positions(self, since: int = 0) -> list[int]:
        return [p for pos, _ in self.calls[since:] for p in pos]


def fresh(model: GPT, tokenizer: Tokenizer, style: PromptStyle, messages: list[dict], max_new_tokens: int) -> list[int]:
    """The reference: a fresh greedy generation (its own cache) on the whole rendered conversation."""
    ids = torch.tensor(style.prompt_ids(messages, tokenizer))
    return generate(model, ids, max_new_tokens, temperature=0.0, stop_tokens=style.stop_tokens(tokenizer))


def test_prompt_ids_equal_transformers_for_a_conversation(ckpt: Path) -> None:
    from transformers import AutoTokenizer

    _, tokenizer, style = load(ckpt)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                    {"role": "user", "content": "Tell me a story."}]
    expected = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(conversation, tokenize=True,
                                                                       add_generation_prompt=True)["input_ids"]
    assert style.prompt_ids(conversation, tokenizer) == expected
    with pytest.raises(ValueError, match="ends with a user message"):
        style.prompt_ids(conversation[:2], tokenizer)


def test_prompt_ids_of_a_named_style_are_the_training_encoding(ckpt: Path) -> None:
    from lit_model.data import SFTDataset

    _, tokenizer, _ = load(ckpt)
    style = PromptStyle.from_name("alpaca")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                    {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once."}]
    sample = SFTDataset([conversation], tokenizer, style, 512)[0]["input_ids"].tolist()
    prompt = style.prompt_ids(conversation[:3], tokenizer)
    # The training sample is the prompt (EOS after the first answer included) followed by the last answer and EOS.
    assert sample[: len(prompt)] == prompt
    assert sample[len(prompt):] == tokenizer.encode("Once.", bos=False, eos=True).tolist()


def test_three_turns_with_cache_reuse_equal_fresh_generations(ckpt: Path) -> None:
    model, tokenizer, style = load(ckpt)
    chat = chat_script.Chat(model, tokenizer, style, max_new_tokens=12)
    feeds = Feeds(model)
    for i, question in enumerate(QUESTIONS):
        before, cached = len(feeds.calls), list(chat.session.tokens)
        reference = fresh(model, tokenizer, style, [*chat.messages, {"role": "user", "content": question}], 12)
        feeds.calls = feeds.calls[:before]  # the reference ran with its own cache: not the chat's feeds
        reply = chat.ask(question)
        assert reply.tokens == reference, f"turn {i + 1}"
        assert reply.text == tokenizer.decode(reference)
        prompt = style.prompt_ids(chat.messages[:-1], tokenizer)
        shared = next((n for n, (a, b) in enumerate(zip(cached, prompt)) if a != b), min(len(cached), len(prompt)))
        # The prompt is fed from the end of what the cache shares with it, then one position per fed answer token.
        fed = feeds.positions(before)
        assert fed[: len(prompt) - shared] == list(range(shared, len(prompt)))
        assert fed == list(range(shared, len(prompt) + len(fed) - (len(prompt) - shared)))
        assert reply.reused == shared and reply.prompt_tokens == len(prompt)
        if i > 0:  # later turns really reuse: at least the whole previous prompt came from the cache
            assert shared >= len(style.prompt_ids(chat.messages[:-3], tokenizer))
    assert len(chat.turns) == 6


def test_the_second_turn_feeds_only_the_new_tokens(ckpt: Path) -> None:
    model, tokenizer, style = load(ckpt)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # all logits 0: greedy answers "!!!..." (id 0), which re-encodes as is
    chat = chat_script.Chat(model, tokenizer, style, max_new_tokens=5)
    feeds = Feeds(model)
    first = chat.ask("Hi")
    assert first.tokens == [0] * 5 and tokenizer.encode(first.text, bos=False).tolist() == first.tokens
    prompt1 = style.prompt_ids([{"role": "user", "content": "Hi"}], tokenizer)
    assert feeds.positions() == list(range(len(prompt1) + 4))
    before = len(feeds.calls)
    second = chat.ask("And then?")
    prompt2 = style.prompt_ids(chat.messages[:-1], tokenizer)
    assert prompt2[: len(prompt1) + 4] == prompt1 + first.tokens[:-1]
    # The prompt's new tokens in one forward, from the position after the last one the cache holds.
    assert feeds.calls[before] == (list(range(len(prompt1) + 4, len(prompt2))), prompt2[len(prompt1) + 4:])
    assert second.reused == len(prompt1) + 4 and len(feeds.calls) - before == 5


def test_a_turn_feeds_only_the_tokens_after_the_cache() -> None:
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=64))
    model.init_weights(0.2)
    session = KVSession(model)
    first = [1, 2, 3, 4, 5]
    reference = generate(model, torch.tensor(first), 6)
    feeds = Feeds(model)
    answer = list(session.generate(first, 6))
    assert answer == reference
    assert session.tokens == first + answer[:-1]  # the last sampled token was never fed
    assert feeds.positions() == list(range(len(first) + 5))
    # The next turn: everything so far, the last answer token, and a new message.
    second = first + answer + [7, 8, 9]
    before = len(feeds.calls)
    assert list(session.generate(second, 6)) == generate(model, torch.tensor(second), 6)
    new = feeds.calls[before]  # the session's first forward of this turn (the reference's come after it)
    assert new == (list(range(len(first) + 5, len(second))), second[len(first) + 5:])
    assert session.reused == len(first) + 5
    # The same prompt again: only its last token is fed (its logits are not cached).
    before = len(feeds.calls)
    assert list(session.generate(second, 3)) == generate(model, torch.tensor(second), 3)
    assert feeds.calls[before] == ([len(second) - 1], second[-1:])


def test_a_prompt_that_differs_rolls_the_cache_back() -> None:
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=64))
    model.init_weights(0.2)
    feeds = Feeds(model)
    session = KVSession(model, max_seq_length=48)
    long = list(range(1, 21))
    list(session.generate(long, 8))
    # A prompt sharing only 6 ids, shorter than what is cached: positions 6.. are recomputed, stale entries beyond
    # its end are never attended to, and the answer is that of a fresh cache.
    other = long[:6] + [30, 31, 32]
    before = len(feeds.calls)
    assert list(session.generate(other, 8)) == generate(model, torch.tensor(other), 8)
    assert feeds.calls[before] == ([6, 7, 8], [30, 31, 32])
    assert session.tokens[:9] == other
    with pytest.raises(ValueError, match="exceeds the session's max_seq_length 48"):
        list(session.generate(long * 2, 9))
    with pytest.raises(ValueError, match="at least one token id"):
        list(session.generate([], 2))
    with pytest.raises(ValueError, match="between 1 and the model's block_size 64"):
        KVSession(model, max_seq_length=65)


def test_the_cache_grows_with_the_conversation() -> None:
    model = GPT(Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, block_size=64))
    model.init_weights(0.2)
    session = KVSession(model)
    prompt = [1, 2, 3]
    first = list(session.generate(prompt, 5))
    assert session.capacity == 8
    # The session takes its cache out of the model between generations: another generation in between (which sets
    # and clears the model's own cache) leaves it intact.
    assert model.transformer.h[0].attn.kv_cache is None
    prompt = prompt + first + [4, 5, 6, 7, 8, 9]
    reference = generate(model, torch.tensor(prompt), 5)
    feeds = Feeds(model)
    assert list(session.generate(prompt, 5)) == reference  # the kept keys and values survived the growth
    assert session.capacity == 19 and feeds.calls[0][0][0] == 7 and session.reused == 7
    session.close()
    assert model.transformer.h[0].attn.kv_cache is None and session.tokens == []


def test_a_template_that_rerenders_earlier_turns_is_recomputed_from_the_change(tmp_path: Path) -> None:
    ckpt = make_chat_checkpoint(tmp_path / "counting", template=COUNTING)
    model, tokenizer, style = load(ckpt)
    chat = chat_script.Chat(model, tokenizer, style, max_new_tokens=8)
    feeds = Feeds(model)
    # "1 messages", "3 messages", ...: the count, right after the system header, changes every turn, so everything
    # from it on is recomputed.
    count_at = len(tokenizer.encode("<|im_start|>system\n", bos=False, special=True))
    for i, question in enumerate(QUESTIONS):
        reference = fresh(model, tokenizer, style, [*chat.messages, {"role": "user", "content": question}], 8)
        before = len(feeds.calls)
        reply = chat.ask(question)
        assert reply.tokens == reference
        first_fed = feeds.calls[before][0][0]
        assert first_fed == reply.reused == (0 if i == 0 else count_at) and count_at > 0


def test_overflow_drops_the_oldest_turns_and_refuses_a_message_that_cannot_fit(ckpt: Path, capsys) -> None:
    model, tokenizer, style = load(ckpt)
    first = len(style.prompt_ids([{"role": "user", "content": QUESTIONS[0]}], tokenizer))
    limit = 2 * first + 16 + 10  # two short turns fit with room for an answer of 10; three do not
    chat = chat_script.Chat(model, tokenizer, style, max_new_tokens=10, max_seq_length=limit)
    replies = chat_script.run(chat, ["Hi", "Hi again", "And once more"])
    err = capsys.readouterr().err
    assert len(replies) == 3
    assert "outgrew the context of" in err and "dropped the 1 oldest turn(s)" in err
    assert [m["content"] for m in chat.turns[0::2]] == ["Hi again", "And once more"]  # the first turn is gone
    kept = chat.messages[:-1]
    assert len(style.prompt_ids(kept, tokenizer)) + 10 <= limit
    assert chat.turns[-1]["content"] == tokenizer.decode(fresh(model, tokenizer, style, kept, 10))
    # A message too long for the context even alone: refused with advice, and the session goes on.
    turns = list(chat.turns)
    with pytest.raises(chat_script.ContextOverflow, match="Shorten the message .* raise --max_seq_length"):
        chat.ask("fox " * limit)
    assert chat.turns == turns
    assert chat_script.run(chat, ["fox " * limit, "Hi"]) and "error: This message makes a prompt of" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="must be below the session's max_seq_length"):
        chat_script.Chat(model, tokenizer, style, max_new_tokens=limit, max_seq_length=limit)


def test_ctrl_c_stops_the_answer_not_the_session(ckpt: Path) -> None:
    model, tokenizer, style = load(ckpt)
    chat = chat_script.Chat(model, tokenizer, style, max_new_tokens=20)
    shown: list[str] = []

    def write(piece: str) -> None:
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt

    reply = chat.ask(QUESTIONS[0], write)
    assert reply.interrupted and reply.text == "".join(shown) and chat.turns[-1]["content"] == reply.text
    # The cache holds the prompt and what was generated before the interrupt, and the next turn builds on it.
    reference = fresh(model, tokenizer, style, [*chat.messages, {"role": "user", "content": QUESTIONS[1]}], 20)
    again = chat.ask(QUESTIONS[1])
    assert again.tokens == reference and not again.interrupted and again.reused > reply.prompt_tokens


def test_cli_runs_prompts_with_commands(ckpt: Path, monkeypatch, capsys) -> None:
    model, tokenizer, style = load(ckpt)
    hi = [{"role": "user", "content": "Hi"}]
    first = tokenizer.decode(fresh(model, tokenizer, style, hi, 8))
    second = tokenizer.decode(fresh(model, tokenizer, style, [{"role": "user", "content": "And then?"}], 8))
    monkeypatch.setattr(sys, "argv", ["chat.py", "--checkpoint_dir", str(ckpt), "--prompts",
                                      '["Hi", "/reset", "/nope", "And then?", "/exit", "never"]',
                                      "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"])
    capsys.readouterr()
    assert script_main(chat_script.main) == [first, second]  # /reset: the second answer starts a new conversation
    out, err = capsys.readouterr()
    assert out == f"{first}\n{second}\n"
    assert "Unknown command /nope" in err and "(new conversation)" in err and "tokens/s" in err
    assert "from the cache" in err


def test_cli_reads_turns_from_stdin_end_to_end(ckpt: Path) -> None:
    model, tokenizer, style = load(ckpt)
    conversation: list[dict] = []
    expected = []
    for question in ["Hi", "Tell me more"]:
        conversation.append({"role": "user", "content": question})
        expected.append(tokenizer.decode(fresh(model, tokenizer, style, conversation, 6)))
        conversation.append({"role": "assistant", "content": expected[-1]})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "generate" / "chat.py"), "--checkpoint_dir", str(ckpt), "--temperature", "0",
         "--max_new_tokens", "6", "--device", "cpu", "--system", ""],
        input="Hi\n\nTell me more\n", capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(f"{e}\n" for e in expected)
    assert done.stderr.count("tokens/s") == 2
