"""A checkpoint's own chat template: rendered text and ids equal transformers' apply_chat_template, training masks
all but the answer, stop tokens come from the template, the style is chosen, printed and saved as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.finetune_utils import load_script, short_train, tiny_checkpoint  # noqa: F401 (fixture)
from tests.test_prompts import CASES, _tokenizer_dir, chat_tokenizer_json  # noqa: F401 (fixture)
from tests.tokenizer_utils import BPE_BOS, make_sentencepiece_tokenizer

from lit_model.chat_template import ChatTemplateError, find_chat_template, render
from lit_model.data import IGNORE_INDEX, SFTDataset
from lit_model.prompts import (
    CHAT_TEMPLATE_STYLE,
    PROMPT_STYLES,
    PromptStyle,
    load_prompt_style,
    resolve_prompt_style,
    save_prompt_style,
)
from lit_model.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's template, as its GGUF file and tokenizer_config.json carry it (Apache-2.0).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {f"{c[0]}-{i}": (c[1], c[3]) for i, c in enumerate(CASES) if c[4] is None}  # (template, eos)
TEMPLATES["smollm2"] = (SMOLLM2, "<|im_end|>")
QUESTION, INPUT, ANSWER = "Name the capital of France.", "Paris, Lyon or Nice?", "Paris"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_text_and_ids_equal_transformers(chat_tokenizer_json, tmp_path, name) -> None:
    from transformers import AutoTokenizer

    template, eos = TEMPLATES[name]
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos=eos, template=template)
    hf, ours, style = AutoTokenizer.from_pretrained(d), Tokenizer(d), PromptStyle.from_checkpoint(d)
    assert style.name == CHAT_TEMPLATE_STYLE and style.bos_token == BPE_BOS and style.eos_token == eos
    user = [{"role": "user", "content": f"{QUESTION}\n\n{INPUT}"}]
    conversation = [*user, {"role": "assistant", "content": ANSWER}]

    prompt_text = hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert style.apply(QUESTION, INPUT) == prompt_text  # BOS included, where the template writes it
    prompt_ids = ours.encode(style.apply(QUESTION, INPUT), bos=style.adds_bos, special=style.special_in_text)
    assert prompt_ids.tolist() == hf.apply_chat_template(user, tokenize=True, add_generation_prompt=True)["input_ids"]

    full_text = hf.apply_chat_template(conversation, tokenize=False)
    assert style.apply(QUESTION, INPUT) + style.response(QUESTION, INPUT, ANSWER) == full_text
    # A training sample: the ids of the whole rendered conversation, labels only on what follows the prompt.
    sample = SFTDataset([{"instruction": QUESTION, "input": INPUT, "output": ANSWER}], ours, style, 512)[0]
    assert sample["input_ids"].tolist() == hf.apply_chat_template(conversation, tokenize=True)["input_ids"]
    n_prompt = prompt_ids.numel()
    assert (sample["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(sample["labels"][n_prompt:], sample["input_ids"][n_prompt:])
    answer_text = ours.decode(sample["input_ids"][n_prompt:])
    assert answer_text.strip().startswith(ANSWER)


@pytest.mark.parametrize(
    ("name", "stops"),
    [("llama3-0", ("<|eot_id|>",)), ("llama2-chat-2", ("</s>",)), ("chatml-7", ("<|im_end|>",)),
     ("gemma-11", ("<end_of_turn>",)), ("phi3-12", ("<|end|>", "<|endoftext|>")), ("smollm2", ("<|im_end|>",))],
)
def test_stop_strings_come_from_the_template(chat_tokenizer_json, tmp_path, name, stops) -> None:
    template, eos = TEMPLATES[name]
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos=eos, template=template)
    style = PromptStyle.from_checkpoint(d)
    assert style.stop_strings == stops
    tok = Tokenizer(d)
    assert [tok.token_to_id(stops[0])] in style.stop_tokens(tok)


def test_chat_template_file_wins_and_named_templates(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 'D' }}"}]}))
    assert find_chat_template(tmp_path)[0] == "{{ 'D' }}"
    (tmp_path / "chat_template.jinja").write_text("{{ 'J' }}")
    source, where = find_chat_template(tmp_path)
    assert source == "{{ 'J' }}" and where.endswith("chat_template.jinja")
    assert find_chat_template(tmp_path / "nowhere") is None


def test_the_sandbox_holds_and_errors_are_clear() -> None:
    with pytest.raises(ChatTemplateError, match="refused the conversation: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ChatTemplateError, match="refused the conversation"):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])  # the classic escape: blocked by the sandbox
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja \(line 1\)"):
        render("{% for m in messages %}", [])
    with pytest.raises(Exception, match="underscore"):
        render("{% set ns = namespace(_x=1) %}", [])
    assert render("{{ messages | tojson }}", [{"role": "user", "content": "<b>"}]) == '[{"role": "user", "content": "<b>"}]'
    assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}", [{"role": "user", "content": "x"}]) == "x"


def test_resolution_order(chat_tokenizer_json, tmp_path) -> None:
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path / "with", eos="<|im_end|>", template=SMOLLM2)
    bare = _tokenizer_dir(chat_tokenizer_json, tmp_path / "bare")
    style, source = resolve_prompt_style(None, d, "SmolLM2-135M-Instruct")
    assert style.chat_template == SMOLLM2 and "chat template" in source
    assert resolve_prompt_style("alpaca", d, "x")[0] is PROMPT_STYLES["alpaca"]
    assert resolve_prompt_style(CHAT_TEMPLATE_STYLE, d, "x")[0].chat_template == SMOLLM2
    # A base model without a template: Alpaca to train (it teaches the format), plain text to generate.
    assert resolve_prompt_style(None, bare, "Llama-2-7b-hf")[0].name == "alpaca"
    assert resolve_prompt_style(None, bare, "Llama-2-7b-hf", for_generation=True)[0].name == "plain"
    assert resolve_prompt_style(None, bare, "Llama-2-7b-chat-hf", for_generation=True)[0].name == "llama2-chat"
    # A fine-tuned checkpoint's prompt_style.yaml comes first.
    save_prompt_style(PROMPT_STYLES["chatml"], d)
    assert resolve_prompt_style(None, d, "x")[0] is PROMPT_STYLES["chatml"]
    with pytest.raises(ValueError, match=r"asks for the checkpoint's chat template, but .*bare has none"):
        resolve_prompt_style(CHAT_TEMPLATE_STYLE, bare, "x")


def test_saved_and_loaded_with_the_template(chat_tokenizer_json, tmp_path) -> None:
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path / "ckpt", eos="<|im_end|>", template=SMOLLM2)
    style = PromptStyle.from_checkpoint(d)
    save_prompt_style(style, tmp_path)
    assert load_prompt_style(tmp_path) == style
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        PromptStyle(name="broken", chat_template="{% if %}")


def test_sentencepiece_parses_control_tokens_of_a_rendered_template(tmp_path) -> None:
    tok = Tokenizer(make_sentencepiece_tokenizer(tmp_path))
    text = "<s>[INST] hello [/INST] world </s>"
    ids = tok.encode(text, bos=False, special=True).tolist()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids[1:-1]).strip() == "[INST] hello [/INST] world"
    assert tok.bos_id not in tok.encode(text, bos=False).tolist()  # without special: literal text, as SentencePiece


def test_training_uses_saves_and_prints_the_checkpoints_template(tiny_checkpoint, chat_tokenizer_json, tmp_path,
                                                                  capsys) -> None:
    """A checkpoint with a chat template trains on it by default: printed, saved in prompt_style.yaml, and used by
    generate on the fine-tuned checkpoint."""
    import shutil

    from lit_model.train.args import DataArgs, EvalArgs

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    _tokenizer_dir(chat_tokenizer_json, d, eos="<|im_end|>", template=SMOLLM2)
    vocab = Tokenizer(d).vocab_size
    from lit_model import GPT, Config

    config = Config(name="tiny-chat", n_layer=2, n_head=4, n_embd=32, n_query_groups=2, intermediate_size=64,
                    vocab_size=vocab, block_size=512)
    model = GPT(config)  # the vocabulary grew with the chat tokens: fresh weights of the right shape
    model.init_weights()
    torch.save(model.state_dict(), d / "lit_model.pth")
    config.save(d / "model_config.yaml")
    lora = load_script("finetune/lora.py")
    from lit_model.peft.lora import LoRAConfig

    lora.setup(checkpoint_dir=d, out_dir=tmp_path / "out",
               data=DataArgs(train_file=tiny_checkpoint.parent / "train.json",
                             val_file=tiny_checkpoint.parent / "val.json"),
               train=short_train(max_steps=1), lora=LoRAConfig(r=2, alpha=4),
               eval=EvalArgs(interval=100, exact_match=0, max_new_tokens=2))
    assert f"Prompts: the chat template of {d}" in capsys.readouterr().out
    saved = load_prompt_style(tmp_path / "out" / "final")
    assert saved.chat_template == SMOLLM2 and saved.stop_strings == ("<|im_end|>",)


# ---- multi-turn conversations: every answer trained, everything else masked ------------------------------------

CONVERSATION = [
    {"role": "user", "content": "Say Paris."},
    {"role": "assistant", "content": "Paris"},
    # The answer's text also stands in the user's turns: a mask found by searching the text would go wrong here.
    {"role": "user", "content": "Paris again, then Rome, of course."},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "Now Italy's?"},
    {"role": "assistant", "content": "Rome, of course."},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer in one word."}, *CONVERSATION]
# ChatML with transformers' generation markers around each answer and its end of turn, as templates that support
# `return_assistant_tokens_mask` write them.
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _trained(sample: dict) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in sample["labels"]]


@pytest.mark.parametrize("conversation", [CONVERSATION, WITH_SYSTEM], ids=["no-system", "system"])
def test_multi_turn_masks_equal_transformers_assistant_masks(chat_tokenizer_json, tmp_path, conversation) -> None:
    from transformers import AutoTokenizer

    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos="<|im_end|>", template=CHATML_GENERATION)
    hf = AutoTokenizer.from_pretrained(d)
    expected = hf.apply_chat_template(conversation, tokenize=True, return_assistant_tokens_mask=True,
                                      return_dict=True)
    assert sum(expected["assistant_masks"]) > 0  # the oracle does mark the answers
    sample = SFTDataset([conversation], Tokenizer(d), PromptStyle.from_checkpoint(d), 512)[0]
    assert sample["input_ids"].tolist() == list(expected["input_ids"])
    assert _trained(sample) == list(expected["assistant_masks"])
    assert torch.equal(sample["labels"][sample["labels"] != IGNORE_INDEX],
                       sample["input_ids"][torch.tensor(expected["assistant_masks"], dtype=torch.bool)])


def test_text_the_template_writes_after_the_generation_marker_is_trained_too(chat_tokenizer_json, tmp_path) -> None:
    """A template whose marker ends before the newline after the end of turn: transformers' mask leaves that newline
    out, ours trains it (an answer's piece runs to where the template's next turn begins): the masks differ by
    exactly that token after every answer."""
    from transformers import AutoTokenizer

    template = CHATML_GENERATION.replace("'<|im_end|>\\n' }}{% endgeneration %}",
                                         "'<|im_end|>' }}{% endgeneration %}{{ '\\n' }}")
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos="<|im_end|>", template=template)
    hf = AutoTokenizer.from_pretrained(d)
    expected = hf.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True,
                                      return_dict=True)
    ours = _trained(SFTDataset([CONVERSATION], Tokenizer(d), PromptStyle.from_checkpoint(d), 512)[0])
    ids, end = expected["input_ids"], hf.convert_tokens_to_ids("<|im_end|>")
    newline = hf.encode("\n", add_special_tokens=False)
    extra = [i for i, (a, b) in enumerate(zip(ours, expected["assistant_masks"])) if a != b]
    assert len(newline) == 1 and len(extra) == 3
    assert all(ours[i] == 1 and ids[i] == newline[0] and ids[i - 1] == end and expected["assistant_masks"][i - 1]
               for i in extra)


def test_truncation_keeps_whole_turns(chat_tokenizer_json, tmp_path) -> None:
    """A conversation longer than max_seq_length ends after the last answer that fits: the sample is transformers'
    sample of the shorter conversation, and the answers cut are counted."""
    from transformers import AutoTokenizer

    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos="<|im_end|>", template=CHATML_GENERATION)
    hf, tok, style = AutoTokenizer.from_pretrained(d), Tokenizer(d), PromptStyle.from_checkpoint(d)
    two = hf.apply_chat_template(WITH_SYSTEM[:5], tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    full = hf.apply_chat_template(WITH_SYSTEM, tokenize=True)["input_ids"]
    for max_seq_length in (len(two["input_ids"]), len(full) - 1):
        data = SFTDataset([WITH_SYSTEM], tok, style, max_seq_length)
        assert data[0]["input_ids"].tolist() == list(two["input_ids"])
        assert _trained(data[0]) == list(two["assistant_masks"])
        assert data.num_turns_cut == 1 and data.num_truncated == 1
    data = SFTDataset([WITH_SYSTEM], tok, style, len(full))
    assert data[0]["input_ids"].tolist() == list(full) and data.num_turns_cut == data.num_truncated == 0


# What each official template writes around an answer (before its text, after it up to the next turn), by hand.
ANSWER_FRAMES = {"llama3-0": ("", "<|eot_id|>"), "llama2-chat-2": (" ", " </s>"), "mistral-4": ("", "</s>"),
                 "mistral-v0.3-5": (" ", "</s>"), "chatml-7": ("", "<|im_end|>\n"), "qwen2.5-9": ("", "<|im_end|>\n"),
                 "gemma-11": ("", "<end_of_turn>\n"), "tinyllama-14": ("", "</s>\n"), "smollm2": ("", "<|im_end|>\n")}


@pytest.mark.parametrize("name", list(ANSWER_FRAMES))
def test_multi_turn_masks_of_official_templates_by_hand(chat_tokenizer_json, tmp_path, name) -> None:
    """Templates without generation markers: the ids are transformers', and the labels are exactly each answer's text
    in its frame, starting where transformers' prompt for that answer ends."""
    from transformers import AutoTokenizer

    template, eos = TEMPLATES[name]
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos=eos, template=template)
    hf = AutoTokenizer.from_pretrained(d)
    sample = SFTDataset([CONVERSATION], Tokenizer(d), PromptStyle.from_checkpoint(d), 512)[0]
    assert sample["input_ids"].tolist() == hf.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    before, after = ANSWER_FRAMES[name]
    expected = torch.full_like(sample["labels"], IGNORE_INDEX)
    for j, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        start = len(hf.apply_chat_template(CONVERSATION[:j], tokenize=True, add_generation_prompt=True)["input_ids"])
        answer = hf.encode(before + message["content"] + after, add_special_tokens=False)
        expected[start:start + len(answer)] = torch.tensor(answer)
    assert torch.equal(sample["labels"], expected)


def test_a_template_that_ends_differently_when_done_is_refused_for_several_turns(chat_tokenizer_json, tmp_path) -> None:
    """Phi-3's template writes EOS after the last message unless it prompts for an answer, so the text up to a later
    answer does not extend the text through an earlier one: its answers cannot be told apart by rendering, and the
    error says what to do (one turn still works, test_text_and_ids_equal_transformers)."""
    template, eos = TEMPLATES["phi3-12"]
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos=eos, template=template)
    with pytest.raises(ValueError, match=r"renders a conversation inconsistently: the text up to answer 2 .* Pass a "
                                         r"named --data\.prompt_style instead"):
        SFTDataset([CONVERSATION], Tokenizer(d), PromptStyle.from_checkpoint(d), 512)


def test_smollm2_template_masks_equal_its_generation_marked_twin(chat_tokenizer_json, tmp_path) -> None:
    """SmolLM2's own template has no generation markers; the same template with markers around each answer and its
    end of turn renders the same text, and transformers' mask of that twin is ours of the original."""
    from transformers import AutoTokenizer

    turn = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    assert turn in SMOLLM2
    marked = SMOLLM2.replace(turn, "{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['role'] == 'assistant' %}"
                                   "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
                                   "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}")
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path / "smollm2", eos="<|im_end|>", template=SMOLLM2)
    twin = _tokenizer_dir(chat_tokenizer_json, tmp_path / "twin", eos="<|im_end|>", template=marked)
    hf, hf_twin = AutoTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(twin)
    for conversation in (CONVERSATION, WITH_SYSTEM):
        assert hf.apply_chat_template(conversation, tokenize=False) == hf_twin.apply_chat_template(
            conversation, tokenize=False)
        expected = hf_twin.apply_chat_template(conversation, tokenize=True, return_assistant_tokens_mask=True,
                                               return_dict=True)
        sample = SFTDataset([conversation], Tokenizer(d), PromptStyle.from_checkpoint(d), 512)[0]
        assert sample["input_ids"].tolist() == list(expected["input_ids"])
        assert _trained(sample) == list(expected["assistant_masks"])


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca"])
def test_multi_turn_masks_of_named_styles_by_hand(chat_tokenizer_json, tmp_path, name) -> None:
    """A named style renders turn after turn: each user turn through the style's template (the conversation's system
    prompt in the first), each answer trained and followed by EOS; the pieces are written out here by hand."""
    tok = Tokenizer(_tokenizer_dir(chat_tokenizer_json, tmp_path))
    style = PROMPT_STYLES[name]
    conversation = CONVERSATION if name == "alpaca" else WITH_SYSTEM  # Alpaca has no place for a system prompt
    q1, a1, q2, a2, q3, a3 = (m["content"] for m in CONVERSATION)
    if name == "chatml":
        turns = ["<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n" + q1 + "<|im_end|>\n"
                 "<|im_start|>assistant\n"] + [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                                               for q in (q2, q3)]
    elif name == "llama3":
        head = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
        turns = [head.format("system", "Answer in one word.") + head.format("user", q) if i == 0 else
                 head.format("user", q) for i, q in enumerate((q1, q2, q3))]
        turns = [t + "<|start_header_id|>assistant<|end_header_id|>\n\n" for t in turns]
    else:
        turns = ["Below is an instruction that describes a task. Write a response that appropriately completes the "
                 f"request.\n\n### Instruction:\n{q}\n\n### Response:\n" for q in (q1, q2, q3)]
    ids, labels = [], []
    for i, (prompt, answer) in enumerate(zip(turns, (a1, a2, a3))):
        prompt_ids = tok.encode(prompt, bos=None if i == 0 else False).tolist()
        answer_ids = tok.encode(answer, bos=False, eos=True).tolist()
        assert answer_ids[-1] == tok.eos_id
        ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    sample = SFTDataset([conversation], tok, style, 512)[0]
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
