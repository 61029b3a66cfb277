"""Prompt styles against the official Hugging Face chat templates, rendered by transformers' apply_chat_template on a
tiny tokenizer: the same text, and the same token ids through our Tokenizer."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.tokenizer_utils import BPE_BOS, BPE_EOS, DEFAULT_TEXTS, make_bpe_tokenizer, make_sentencepiece_tokenizer

from lit_model.config import PRESETS
from lit_model.prompts import PROMPT_STYLES, PromptStyle, load_prompt_style, save_prompt_style
from lit_model.tokenizer import Tokenizer

CHAT_TOKENS = [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",  # ChatML / Qwen
    "<start_of_turn>", "<end_of_turn>",  # Gemma
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",  # Phi-3, Zephyr/TinyLlama
    "</s>",  # TinyLlama's EOS, written as text by its template
]

# ---- the official templates (single-turn parts; tool-calling branches left out) -----------------------------------
# https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json
LLAMA3 = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
# https://huggingface.co/meta-llama/Llama-2-7b-chat-hf/blob/main/tokenizer_config.json
LLAMA2 = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""
# https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2/blob/main/tokenizer_config.json
MISTRAL = r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""
# https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.3/blob/main/tokenizer_config.json
MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}{{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}{%- endif %}{%- endfor %}"""
# https://huggingface.co/Qwen/Qwen2-7B-Instruct/blob/main/tokenizer_config.json
CHATML = r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
# https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/tokenizer_config.json
QWEN25 = r"""{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""
# https://huggingface.co/google/gemma-7b-it/blob/main/tokenizer_config.json
GEMMA = r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""
# https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/tokenizer_config.json
PHI3 = r"""{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"""
# https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0/blob/main/tokenizer_config.json (multi-line: the newlines
# between tags are removed by transformers' trim_blocks, those after `}}` are kept)
TINYLLAMA = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

INSTRUCTION, INPUT = "  Name the capital of France.\nAnswer in one word. ", "Paris, Lyon or Nice?"
SYSTEM = "You answer like a pirate."

# (style, template, whether the template starts with BOS, EOS token, system prompt or None for the style's default)
CASES = [
    ("llama3", LLAMA3, True, BPE_EOS, None),
    ("llama3", LLAMA3, True, BPE_EOS, SYSTEM),
    ("llama2-chat", LLAMA2, True, "</s>", None),
    ("llama2-chat", LLAMA2, True, "</s>", SYSTEM),
    ("mistral", MISTRAL, True, "</s>", None),
    ("mistral-v0.3", MISTRAL_V3, True, "</s>", None),
    ("mistral-v0.3", MISTRAL_V3, True, "</s>", SYSTEM),
    ("chatml", CHATML, False, "<|im_end|>", None),
    ("chatml", CHATML, False, "<|im_end|>", SYSTEM),
    ("qwen2.5", QWEN25, False, "<|im_end|>", None),
    ("qwen2.5", QWEN25, False, "<|im_end|>", SYSTEM),
    ("gemma", GEMMA, True, "<end_of_turn>", None),
    ("phi3", PHI3, False, "<|endoftext|>", None),
    ("phi3", PHI3, False, "<|endoftext|>", SYSTEM),
    ("tinyllama", TINYLLAMA, False, "</s>", None),
    ("tinyllama", TINYLLAMA, False, "</s>", SYSTEM),
]


@pytest.fixture(scope="module")
def chat_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json that knows the chat special tokens of every family."""
    from tokenizers import Tokenizer as HFTokenizer

    d = make_bpe_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"))
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(CHAT_TOKENS)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def _tokenizer_dir(tokenizer_json: Path, dir: Path, eos: str | None = BPE_EOS, template: str | None = None) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, dir / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BPE_BOS, "add_bos_token": True}
    if eos is not None:
        config["eos_token"] = eos
    if template is not None:
        config["chat_template"] = template
    (dir / "tokenizer_config.json").write_text(json.dumps(config))
    return dir


@pytest.mark.parametrize(
    ("style_name", "template", "has_bos", "eos", "system"),
    CASES,
    ids=[f"{c[0]}-{'system' if c[4] else 'default'}" for c in CASES],
)
def test_chat_styles_match_official_templates(
    chat_tokenizer_json: Path,
    tmp_path: Path,
    style_name: str,
    template: str,
    has_bos: bool,
    eos: str,
    system: str | None,
) -> None:
    from transformers import AutoTokenizer

    d = _tokenizer_dir(chat_tokenizer_json, tmp_path, eos=eos, template=template)
    hf = AutoTokenizer.from_pretrained(d)
    # Llama 2 strips the whole "<<SYS>>...prompt" content, so leading spaces of the prompt survive a system block;
    # our style strips the prompt itself. Give that case a prompt without leading spaces.
    instruction = INSTRUCTION.lstrip() if style_name == "llama2-chat" and system else INSTRUCTION
    messages = [{"role": "user", "content": f"{instruction}\n\n{INPUT}"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if has_bos:
        assert expected.startswith(BPE_BOS)
        expected = expected[len(BPE_BOS) :]  # our text leaves BOS to the tokenizer

    style = PromptStyle.from_name(style_name, **({"system": system} if system is not None else {}))
    assert style.apply(instruction, INPUT) == expected

    # The same ids: our Tokenizer on our text vs transformers tokenizing its own rendering.
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    ours = Tokenizer(d).encode(style.apply(instruction, INPUT), bos=has_bos)
    assert ours.tolist() == list(expected_ids)
    # The chat tokens are single ids, not spelled out in bytes.
    assert len(expected_ids) < len(expected.encode())


def test_alpaca_is_the_stanford_template() -> None:
    # https://github.com/tatsu-lab/stanford_alpaca/blob/main/train.py, PROMPT_DICT, verbatim.
    prompt_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    prompt_no_input = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    alpaca = PromptStyle.from_name("alpaca")
    expected = prompt_input.format(instruction="Add the numbers.", input="2 and 3")
    assert alpaca.apply("Add the numbers.", "2 and 3") == expected
    assert alpaca.apply("Add 2 and 3.") == prompt_no_input.format(instruction="Add 2 and 3.")
    assert alpaca.apply("Add 2 and 3.", "") == prompt_no_input.format(instruction="Add 2 and 3.")


def test_plain_is_the_prompt_itself() -> None:
    plain = PromptStyle.from_name("plain")
    assert plain.apply("  The sky is ") == "  The sky is "
    assert plain.apply("Translate:", "chat") == "Translate:\n\nchat"


@pytest.mark.parametrize("name", list(PROMPT_STYLES))
def test_user_text_with_braces_is_not_expanded(name: str) -> None:
    style = PromptStyle.from_name(name)
    text, extra = "def f(): return {'a': 1} {prompt} {input} {system} {0}", "{input}{"
    out = style.apply(text, extra)
    assert text.strip() in out and extra in out
    assert out.count("{prompt}") == 1 and out.count("{system}") == 1


def test_from_name_errors_list_valid_styles() -> None:
    match = r"Unknown prompt style 'lama3'\. Did you mean: llama3.*Valid styles: alpaca, plain"
    with pytest.raises(ValueError, match=match):
        PromptStyle.from_name("lama3")


def test_from_name_overrides_and_builtins_are_shared() -> None:
    assert PromptStyle.from_name("chatml") is PROMPT_STYLES["chatml"]
    custom = PromptStyle.from_name("chatml", system="Be brief.")
    assert custom.apply("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert PROMPT_STYLES["chatml"].system == "You are a helpful assistant."  # the registry is untouched
    assert PromptStyle.from_name("llama3", system="").apply("Hi").startswith("<|start_header_id|>user")


def test_invalid_styles_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"Invalid PromptStyle 'x': template must contain '\{prompt\}'"):
        PromptStyle(name="x", template="no slot here")
    with pytest.raises(ValueError, match=r"template_with_input must contain '\{prompt\}' and '\{input\}'"):
        PromptStyle(name="x", template="{prompt}", template_with_input="{prompt} only")
    with pytest.raises(ValueError, match=r"has a system prompt but its system_block '' has no '\{system\}'"):
        PromptStyle(name="x", template="{system}{prompt}", system="Be nice.")


@pytest.mark.parametrize(
    ("model", "style"),
    [
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("Llama-3.1-8B-Instruct", "llama3"),
        ("Llama-3.2-1B-Instruct", "llama3"),
        ("checkpoints/meta-llama/Llama-3.2-3B-Instruct/", "llama3"),
        ("Meta-Llama-3-8B", "alpaca"),
        ("Llama-3.2-1B", "alpaca"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama2-chat"),
        ("Llama-2-70b-hf", "alpaca"),
        ("mistralai/Mistral-7B-Instruct-v0.1", "mistral"),
        ("Mistral-7B-Instruct-v0.2", "mistral"),
        ("Mistral-7B-Instruct-v0.3", "mistral-v0.3"),
        ("Mistral-7B-v0.3", "alpaca"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5"),
        ("Qwen2.5-0.5B", "alpaca"),
        ("Qwen/Qwen2-1.5B-Instruct", "chatml"),
        ("google/gemma-2b-it", "gemma"),
        ("gemma-7b", "alpaca"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "tinyllama"),
        ("TinyLlama-1.1B-intermediate-step-1431k-3T", "alpaca"),
        ("EleutherAI/pythia-160m", "alpaca"),
        ("my-org/italian-model", "alpaca"),  # "it" only counts as a whole part ("-it")
        ("my-org/unknown-chat-model", "alpaca"),
    ],
)
def test_for_model(model: str, style: str) -> None:
    assert PromptStyle.for_model(model).name == style


def test_every_chat_preset_gets_a_chat_style() -> None:
    for name, preset in PRESETS.items():
        chat = any(k in name.lower() for k in ("instruct", "chat", "-it"))
        got = PromptStyle.for_model(preset["hf_repo"]).name
        assert (got != "alpaca") == chat, (name, got)
        assert PromptStyle.for_model(name) == PromptStyle.for_model(preset["hf_repo"])


# ---- stop tokens -------------------------------------------------------------------------------------------------


def test_stop_tokens_include_eos_and_end_of_turn(chat_tokenizer_json: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_tokenizer_dir(chat_tokenizer_json, tmp_path))
    eos = tok.eos_id
    ids = {t: tok.encode(t, bos=False).tolist() for t in CHAT_TOKENS}
    assert all(len(v) == 1 for v in ids.values())
    assert PromptStyle.from_name("alpaca").stop_tokens(tok) == ([eos],)
    # "<|end_of_text|>" is both EOS and a Llama 3 stop string: listed once.
    assert PromptStyle.from_name("llama3").stop_tokens(tok) == ([eos], ids["<|eot_id|>"])
    assert PromptStyle.from_name("qwen2.5").stop_tokens(tok) == ([eos], ids["<|im_end|>"], ids["<|endoftext|>"])
    assert PromptStyle.from_name("gemma").stop_tokens(tok) == ([eos], ids["<end_of_turn>"])
    assert PromptStyle.from_name("phi3").stop_tokens(tok) == ([eos], ids["<|end|>"], ids["<|endoftext|>"])


def test_stop_tokens_include_generation_config_eos_ids(chat_tokenizer_json: Path, tmp_path: Path) -> None:
    """Llama 3 Instruct's generation_config.json lists <|end_of_text|> and <|eot_id|>: both stop, whatever the style."""
    d = _tokenizer_dir(chat_tokenizer_json, tmp_path)
    probe = Tokenizer(d)
    eot, im_end = probe.encode("<|eot_id|>", bos=False).item(), probe.encode("<|im_end|>", bos=False).item()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [probe.eos_id, eot]}))
    tok = Tokenizer(d)
    assert PromptStyle.from_name("alpaca").stop_tokens(tok) == ([tok.eos_id], [eot])
    assert PromptStyle.from_name("llama3").stop_tokens(tok) == ([tok.eos_id], [eot])
    endoftext = probe.encode("<|endoftext|>", bos=False).item()
    assert PromptStyle.from_name("chatml").stop_tokens(tok) == ([tok.eos_id], [eot], [im_end], [endoftext])


def test_stop_tokens_skip_strings_the_tokenizer_spells_out(tmp_path: Path) -> None:
    tok = Tokenizer(make_bpe_tokenizer(tmp_path))  # no chat tokens: "<|eot_id|>" becomes several byte tokens
    assert len(tok.encode("<|eot_id|>", bos=False)) > 1
    assert PromptStyle.from_name("llama3").stop_tokens(tok) == ([tok.eos_id],)
    assert PromptStyle.from_name("chatml").stop_tokens(tok) == ([tok.eos_id],)


def test_stop_tokens_without_eos(chat_tokenizer_json: Path, tmp_path: Path) -> None:
    tok = Tokenizer(_tokenizer_dir(chat_tokenizer_json, tmp_path, eos=None))
    assert tok.eos_id is None
    assert PromptStyle.from_name("alpaca").stop_tokens(tok) == ()
    assert PromptStyle.from_name("chatml").stop_tokens(tok) == (tok.encode("<|im_end|>", bos=False).tolist(),
                                                                tok.encode("<|endoftext|>", bos=False).tolist())


def test_stop_tokens_sentencepiece_user_symbol(tmp_path: Path) -> None:
    """SentencePiece puts its dummy-prefix "▁" before a user-defined symbol; the symbol's own id is the stop."""
    import sentencepiece as spm

    d = make_sentencepiece_tokenizer(tmp_path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEFAULT_TEXTS), model_writer=model, vocab_size=400, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, user_defined_symbols=["<end_of_turn>"], add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(model.getvalue())
    tok = Tokenizer(d)
    raw = tok.encode("<end_of_turn>", bos=False).tolist()
    assert len(raw) == 2 and tok.decode(raw[1:]) == "<end_of_turn>"  # ["▁", "<end_of_turn>"]
    assert PromptStyle.from_name("gemma").stop_tokens(tok) == ([2], raw[1:])
    # "</s>" written as text is spelled out by SentencePiece; TinyLlama stops on the EOS id only.
    assert PromptStyle.from_name("tinyllama").stop_tokens(tok) == ([2],)


def test_stop_tokens_end_a_generation(chat_tokenizer_json: Path, tmp_path: Path) -> None:
    """The stops plug into lit_model.sampling: a model that always emits <|im_end|> stops at once."""
    from lit_model.sampling import generate

    tok = Tokenizer(_tokenizer_dir(chat_tokenizer_json, tmp_path))
    im_end = tok.encode("<|im_end|>", bos=False).item()

    class AlwaysImEnd(torch.nn.Module):
        """A stand-in model whose next token is always <|im_end|> (what generate needs: config, cache hooks)."""

        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(block_size=128)

        def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
            logits = torch.zeros(*idx.shape, tok.vocab_size)
            logits[..., im_end] = 1.0
            return logits

        def set_kv_cache(self, **kwargs: object) -> None: ...

        def clear_kv_cache(self) -> None: ...

    prompt = tok.encode(PromptStyle.from_name("chatml").apply("Hi"))
    stops = PromptStyle.from_name("chatml").stop_tokens(tok)
    out = generate(AlwaysImEnd(), prompt, 5, temperature=0.0, stop_tokens=stops)
    assert out == []
    stops = PromptStyle.from_name("alpaca").stop_tokens(tok)  # EOS only: <|im_end|> does not stop it
    out = generate(AlwaysImEnd(), prompt, 5, temperature=0.0, stop_tokens=stops)
    assert out == [im_end] * 5


# ---- prompt_style.yaml -------------------------------------------------------------------------------------------


def test_save_and_load_builtin_style(tmp_path: Path) -> None:
    path = save_prompt_style(PromptStyle.from_name("llama3"), tmp_path)
    assert path == tmp_path / "prompt_style.yaml"
    assert path.read_text() == "name: llama3\n"  # by name only, so later template fixes reach old checkpoints
    assert load_prompt_style(tmp_path) == PromptStyle.from_name("llama3")

    custom = PromptStyle.from_name("qwen2.5", system="Réponds en français.")
    save_prompt_style(custom, tmp_path)
    assert load_prompt_style(tmp_path) == custom
    assert set(__import__("yaml").safe_load(path.read_text())) == {"name", "system"}


def test_save_and_load_custom_style(tmp_path: Path) -> None:
    style = PromptStyle(
        name="my-style", template="{system}Q: {prompt}\nA:", system="Be brief.", system_block="[{system}] ",
        stop_strings=("<|end|>",), strip=True,
    )
    save_prompt_style(style, tmp_path)
    loaded = load_prompt_style(tmp_path)
    assert loaded == style
    assert loaded.apply(" 2+2? ") == "[Be brief.] Q: 2+2?\nA:"


def test_load_prompt_style_missing_is_none(tmp_path: Path) -> None:
    assert load_prompt_style(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            "class_path: litgpt.prompts.Alpaca\n",
            r"unknown fields \['class_path'\].*Lit-GPT file: replace it with `name: <style>`",
        ),
        ("name: alpaca\ncolour: red\n", r"unknown fields \['colour'\]; valid fields"),
        ("- alpaca\n", r"must be a mapping with a 'name'"),
        ("", r"must be a mapping with a 'name'"),
        ("name: nope\n", r"names the unknown style 'nope' without a 'template'\. Use one of alpaca"),
        ("name: nope\ntemplate: no slot\n", r"template must contain '\{prompt\}'"),
    ],
)
def test_load_prompt_style_errors(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "prompt_style.yaml").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompt_style(tmp_path)


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_a_system_message_under_a_style_without_a_system_slot_opens_the_first_request(name) -> None:
    style = PROMPT_STYLES[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another."},
                {"role": "assistant", "content": "Blue."}]
    pieces = style._named_segments(messages)
    assert pieces == [(style.apply("Be brief.\n\nName a colour."), False), ("Red.", True),
                      (style.apply("Another."), False), ("Blue.", True)]
