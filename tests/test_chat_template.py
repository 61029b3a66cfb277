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
